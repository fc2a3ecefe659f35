"""The router against real faults (acceptance 3).

The route is [``flaky`` — an OpenAI-compatible endpoint on the fault server, priced as
gpt-5 — then ``embedded``]. A provider that times out, answers 500, returns a body
that is not JSON, answers outside the schema, or refuses the connection is retried
and then falls back; every attempt is one ledger row (written once: the fault
server's request count equals the rows for it), and totals equal the sum of the rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from genai_prices import Usage, calc_price

from tests.agents.models.servers import (
    BAD_CONTENT,
    HTTP_500,
    NOT_JSON,
    OK,
    SLOW,
    Fault,
    FaultServer,
)
from tests.conftest import modules_imported
from trinity.agents.delegates import schema_of
from trinity.agents.models.policy import parse_policy
from trinity.agents.models.providers.base import ChatRequest, Completion, Provider
from trinity.agents.models.providers.embedded import EmbeddedProvider
from trinity.agents.models.providers.instant import ENABLE_VAR, InstantProvider
from trinity.agents.models.providers.openai_api import OpenAIProvider
from trinity.agents.models.router import CallContext, Routed, Router
from trinity.clock import ManualClock
from trinity.errors import AllModelsFailed, InvalidModelOutput
from trinity.process import BaseProcess
from trinity.settings import Settings
from trinity.stores.costs import CostLedger, summarize

# The call timeout of the timeout case; it bounds the embedded fallback's answer too
# (the prompt is in its KV cache after the warm-up: ~8 tokens to generate). The other
# cases use a long one, so a busy machine cannot turn them into timeouts.
TIMEOUT_S = 3.0
LONG_TIMEOUT_S = 60.0


class YesNo(msgspec.Struct, forbid_unknown_fields=True):
    answer: Literal["yes", "no"]


REQUEST = ChatRequest(
    messages=({"role": "system", "content": "Answer in JSON."},
              {"role": "user", "content": "Is water wet? Answer yes or no."}),
    schema=schema_of(YesNo), max_tokens=48, temperature=0.2, seed=3)


def parse(completion: Completion) -> str:
    try:
        return msgspec.json.decode(completion.content, type=YesNo).answer
    except msgspec.DecodeError as exc:
        raise InvalidModelOutput(f"not a YesNo: {exc}") from None


def gpt5_usd(input_tokens: int, output_tokens: int) -> float:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(calc_price(usage, model_ref="gpt-5", provider_id="openai").total_price)


def policy(*, chain: tuple[str, ...] = ("flaky", "embedded"),
           timeout_s: float = LONG_TIMEOUT_S,
           cooldown_after: int = 10, cooldown_s: float = 60.0,
           routes: list[dict[str, Any]] | None = None) -> Any:
    return parse_policy({
        "call": {"timeout_s": timeout_s, "max_attempts": 2, "backoff_s": [0.5, 2.0],
                 "cooldown_after": cooldown_after, "cooldown_s": cooldown_s},
        "providers": {"flaky": {"kind": "openai", "model": "gpt-5", "price_model": "gpt-5"},
                      "dead": {"kind": "openai", "model": "gpt-5", "price_model": "gpt-5"},
                      "embedded": {"kind": "embedded"}},
        "routes": routes or [{"chain": list(chain)}],
    }, "test policy")


def paid(base_url: str, name: str = "flaky") -> OpenAIProvider:
    return OpenAIProvider(name, model="gpt-5", api_key="sk-test", base_url=base_url,
                          price_model="gpt-5", price_provider="openai")


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedProvider]:
    provider = EmbeddedProvider("embedded", n_threads=1)
    provider.complete(REQUEST, timeout_s=60, cancel=threading.Event())  # load, warm up
    yield provider
    provider.close()


@pytest.fixture
def ledger(short_dir: Path) -> Iterator[CostLedger]:
    costs = CostLedger(short_dir / "trinity_costs.db")
    yield costs
    costs.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(pol: Any, providers: dict[str, Provider], ledger: CostLedger, *,
                budget_usd: float = 10.0, budget_mode: str = "warn",
                monotonic: Callable[[], float] = time.monotonic,
                sleeps: list[float] | None = None) -> Router:
    """A router that records its backoff waits instead of sleeping them."""
    waits = sleeps if sleeps is not None else []
    return Router(pol, providers, ledger, budget_usd=budget_usd, budget_mode=budget_mode,
                  sleep=waits.append, monotonic=monotonic)


def rows_of(ledger: CostLedger, request_id: str) -> list[dict[str, Any]]:
    return [r for r in ledger.calls() if r["request_id"] == request_id]


def assert_totals_are_the_rows(ledger: CostLedger) -> None:
    rows = ledger.calls()
    totals = summarize(rows)
    assert totals["total_calls"] == len(rows)
    assert len({r["call_id"] for r in rows}) == len(rows)
    assert totals["total_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows),
                                                     abs=1e-6)
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert totals["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert sum(g["calls"] for g in totals["by_provider"].values()) == len(rows)
    assert sum(totals["by_status"].values()) == len(rows)
    assert sum(totals["by_route"].values()) == len(rows)
    spent = sum(ledger.spent_usd(run) for run in {r["run_id"] for r in rows})
    assert spent == pytest.approx(totals["total_cost_usd"], abs=1e-6)


# -- each fault: retry, fallback, one row per attempt -----------------------------------

# fault, ledger status and error class of the flaky rows, tokens the server billed
CASES: list[tuple[str, str, str, tuple[int, int]]] = [
    (SLOW, "timeout", "timeout", (0, 0)),
    (HTTP_500, "error", "http_error", (0, 0)),
    (NOT_JSON, "error", "invalid_output", (0, 0)),
    (BAD_CONTENT, "error", "invalid_output", (1000, 500)),
    ("refused", "error", "unavailable", (0, 0)),
]


@pytest.mark.parametrize(("fault", "status", "error_class", "billed"), CASES,
                         ids=[c[0] for c in CASES])
def test_fault_is_retried_then_answered_by_the_fallback(
    faults: FaultServer, refused: str, embedded: EmbeddedProvider, ledger: CostLedger,
    fault: str, status: str, error_class: str, billed: tuple[int, int],
) -> None:
    if fault == "refused":
        flaky = paid(f"{refused}/v1")
    else:
        flaky = paid(faults.base_url)
        faults.program(default=Fault(fault, delay_s=TIMEOUT_S + 3))
    sleeps: list[float] = []
    timeout_s = TIMEOUT_S if fault == SLOW else LONG_TIMEOUT_S
    router = make_router(policy(timeout_s=timeout_s), {"flaky": flaky, "embedded": embedded},
                         ledger, sleeps=sleeps)
    ctx = CallContext("executor", f"req-{fault}", run_id="run-1", event_id="ev-1")
    try:
        routed = router.call(REQUEST, ctx, parse)
    finally:
        flaky.close()

    assert routed.value in ("yes", "no")
    assert (routed.provider, routed.reused) == ("embedded", False)
    assert sleeps == [0.5]  # the backoff before the retry, not slept here
    rows = rows_of(ledger, ctx.request_id)
    assert [(r["provider"], r["route"], r["status"], r["error_class"], r["attempt"])
            for r in rows] == [
        ("flaky", "primary", status, error_class, 1),
        ("flaky", "retry", status, error_class, 2),
        ("embedded", "fallback", "success", None, 3),
    ]
    assert [r["call_id"] for r in rows] == [a.call_id for a in routed.attempts]
    assert len({r["call_id"] for r in rows}) == 3
    assert all((r["run_id"], r["event_id"], r["agent"]) == ("run-1", "ev-1", "executor")
               for r in rows)
    # One row per real call: the server saw exactly the attempts the ledger has.
    assert len(faults.hits) == (0 if fault == "refused" else 2)
    # The faulty attempts cost what the server billed (a bad answer is still paid for).
    for row in rows[:2]:
        assert (row["input_tokens"], row["output_tokens"]) == billed
        assert row["cost_usd"] == pytest.approx(gpt5_usd(*billed), abs=1e-12)
        assert row["local"] == 0 and row["error"]
    if fault == SLOW:
        assert all(TIMEOUT_S * 1000 <= r["latency_ms"] < (TIMEOUT_S + 2) * 1000
                   for r in rows[:2])
    last = rows[2]
    assert last["input_tokens"] > 20 and last["output_tokens"] > 2
    assert (last["cost_usd"], last["local"], last["tokens_estimated"]) == (0.0, 1, 0)
    assert ledger.answer_for(ctx.request_id) is not None

    totals = summarize(rows)
    assert totals["requests"] == 1 and totals["total_calls"] == 3
    assert totals["by_route"] == {"primary": 1, "retry": 1, "fallback": 1}
    assert totals["total_cost_usd"] == pytest.approx(2 * gpt5_usd(*billed), abs=1e-6)
    assert totals["by_provider"]["flaky"]["calls"] == 2
    assert totals["by_provider"]["embedded"]["successes"] == 1
    assert_totals_are_the_rows(ledger)

    # The same request again (a replayed message): the stored answer, no call, no row.
    hits = len(faults.hits)
    again = router.call(REQUEST, ctx, parse)
    assert (again.value, again.provider, again.reused) == (routed.value, "embedded", True)
    assert again.attempts == []
    assert len(rows_of(ledger, ctx.request_id)) == 3 and len(ledger.calls()) == 3
    assert len(faults.hits) == hits


def test_every_attempt_is_in_all_models_failed_and_the_ledger(
    faults: FaultServer, refused: str, ledger: CostLedger
) -> None:
    faults.program(default=Fault(HTTP_500))
    flaky, dead = paid(faults.base_url), paid(f"{refused}/v1", "dead")
    router = make_router(policy(chain=("flaky", "dead")), {"flaky": flaky, "dead": dead},
                         ledger)
    ctx = CallContext("architect", "req-all-fail", run_id="run-1")
    try:
        with pytest.raises(AllModelsFailed) as caught:
            router.call(REQUEST, ctx, parse)
        attempts = caught.value.attempts
        assert [(a.provider, a.route, a.error_class) for a in attempts] == [
            ("flaky", "primary", "http_error"), ("flaky", "retry", "http_error"),
            ("dead", "fallback", "unavailable"), ("dead", "retry", "unavailable"),
        ]
        assert "HTTP 500" in str(caught.value) and "cannot reach" in str(caught.value)
        rows = rows_of(ledger, ctx.request_id)
        assert [r["call_id"] for r in rows] == [a.call_id for a in attempts]
        assert ledger.answer_for(ctx.request_id) is None
        assert len(faults.hits) == 2

        # Not answered, so not reused: a second try makes (and records) new calls.
        with pytest.raises(AllModelsFailed) as again:
            router.call(REQUEST, ctx, parse)
    finally:
        flaky.close()
        dead.close()
    assert len(again.value.attempts) == 4
    rows = rows_of(ledger, ctx.request_id)
    assert len(rows) == 8 and len({r["call_id"] for r in rows}) == 8
    assert len(faults.hits) == 4
    totals = summarize(rows)
    assert (totals["requests"], totals["total_calls"], totals["success_rate"]) == (1, 8, 0.0)
    assert totals["by_status"] == {"success": 0, "error": 8, "timeout": 0}
    assert_totals_are_the_rows(ledger)


# -- cool-down ------------------------------------------------------------------------


def test_cooling_provider_is_skipped_until_the_cooldown_passes(
    faults: FaultServer, embedded: EmbeddedProvider, ledger: CostLedger
) -> None:
    faults.program(default=Fault(HTTP_500))
    flaky = paid(faults.base_url)
    clock = Clock()
    router = make_router(policy(cooldown_after=3, cooldown_s=60.0),
                         {"flaky": flaky, "embedded": embedded}, ledger, monotonic=clock)

    def ask(n: int) -> Routed[str]:
        return router.call(REQUEST, CallContext("executor", f"req-cool-{n}"), parse)

    def trail(n: int) -> list[tuple[str, str, str]]:
        return [(r["provider"], r["route"], r["status"])
                for r in rows_of(ledger, f"req-cool-{n}")]

    try:
        # Two failures (primary, retry), then the fallback answers.
        assert ask(1).provider == "embedded"
        assert trail(1) == [("flaky", "primary", "error"), ("flaky", "retry", "error"),
                            ("embedded", "fallback", "success")]
        # The third consecutive failure starts the cool-down: no retry, straight on.
        assert ask(2).provider == "embedded"
        assert trail(2) == [("flaky", "primary", "error"), ("embedded", "fallback", "success")]
        assert len(faults.hits) == 3
        # Cooling down: skipped, no call, no row for it.
        faults.program(default=Fault(OK, prompt_tokens=200, completion_tokens=10))
        skipped = ask(3)
        assert skipped.provider == "embedded"
        assert skipped.skipped == {"flaky": "cooling down for 60 s"}
        assert trail(3) == [("embedded", "primary", "success")]
        clock.now += 59.0
        assert ask(4).skipped.keys() == {"flaky"}
        assert trail(4) == [("embedded", "primary", "success")]
        assert len(faults.hits) == 3
        # Cool-down over: the provider is tried again (and now answers).
        clock.now += 2.0
        back = ask(5)
    finally:
        flaky.close()
    assert (back.provider, back.skipped) == ("flaky", {})
    assert trail(5) == [("flaky", "primary", "success")]
    assert len(faults.hits) == 4
    (row,) = rows_of(ledger, "req-cool-5")
    assert row["cost_usd"] == pytest.approx(gpt5_usd(200, 10), abs=1e-12) and row["cost_usd"] > 0
    assert_totals_are_the_rows(ledger)


# -- budget ---------------------------------------------------------------------------


def test_paid_provider_is_skipped_once_the_budget_is_spent(
    faults: FaultServer, embedded: EmbeddedProvider, ledger: CostLedger
) -> None:
    faults.program(default=Fault(OK, prompt_tokens=1000, completion_tokens=500))
    one_call = gpt5_usd(1000, 500)
    assert one_call > 0
    flaky = paid(faults.base_url)
    routes = [{"agents": ["architect"], "chain": ["flaky", "embedded"], "within_budget": True},
              {"chain": ["flaky", "embedded"]}]
    providers: dict[str, Provider] = {"flaky": flaky, "embedded": embedded}
    budget = one_call * 0.9  # one paid call spends it
    warn = make_router(policy(routes=routes), providers, ledger, budget_usd=budget)
    enforce = make_router(policy(routes=routes), providers, ledger, budget_usd=budget,
                          budget_mode="enforce")

    def ask(router: Router, agent: str, request_id: str, run_id: str = "run-b") -> Routed[str]:
        return router.call(REQUEST, CallContext(agent, request_id, run_id=run_id), parse)

    try:
        first = ask(warn, "architect", "b-1")
        assert (first.provider, first.skipped) == ("flaky", {})
        assert ledger.spent_usd("run-b") == pytest.approx(one_call, abs=1e-12)
        # Spent: the within_budget route skips the paid provider ...
        second = ask(warn, "architect", "b-2")
        assert second.provider == "embedded"
        assert second.skipped == {"flaky": f"budget ${budget:.2f} spent"}
        # ... a route without within_budget still uses it in "warn" mode ...
        third = ask(warn, "executor", "b-3")
        assert (third.provider, third.skipped) == ("flaky", {})
        # ... and "enforce" skips it on every route.
        fourth = ask(enforce, "executor", "b-4")
        assert fourth.provider == "embedded" and fourth.skipped.keys() == {"flaky"}
        # The budget is per run: another run has spent nothing yet.
        other = ask(enforce, "executor", "b-5", run_id="run-c")
        assert other.provider == "flaky"
    finally:
        flaky.close()
    assert len(faults.hits) == 3
    rows = ledger.calls()
    assert [(r["request_id"], r["provider"], r["route"]) for r in rows] == [
        ("b-1", "flaky", "primary"), ("b-2", "embedded", "primary"),
        ("b-3", "flaky", "primary"), ("b-4", "embedded", "primary"),
        ("b-5", "flaky", "primary"),
    ]
    assert ledger.spent_usd("run-b") == pytest.approx(2 * one_call, abs=1e-12)
    assert ledger.spent_usd("run-c") == pytest.approx(one_call, abs=1e-12)
    totals = summarize(rows)
    assert totals["total_cost_usd"] == pytest.approx(3 * one_call, abs=1e-6)
    assert totals["by_provider"]["flaky"]["calls"] == 3
    assert_totals_are_the_rows(ledger)


# -- prices checked at start ---------------------------------------------------------


def test_an_unknown_price_is_a_config_error_for_a_usable_provider_only(
        ledger: CostLedger) -> None:
    from trinity.errors import ConfigError

    def cloud(api_key: str | None) -> OpenAIProvider:
        return OpenAIProvider("flaky", model="gpt-5", api_key=api_key,
                              base_url="http://127.0.0.1:9", price_model="no-such-model-xyz",
                              price_provider="openai")

    with pytest.raises(ConfigError, match="no price for model 'no-such-model-xyz'"):
        make_router(policy(chain=("flaky",)), {"flaky": cloud("sk-test")}, ledger)
    # Without a key it is never called: not priced (and the price table not loaded).
    router = make_router(policy(chain=("flaky",)), {"flaky": cloud(None)}, ledger)
    assert router.providers["flaky"].unavailable_reason()


def test_a_model_agent_without_cloud_configuration_loads_no_cloud_client() -> None:
    """The embedded default: openai, ollama, httpx and genai-prices stay unimported (about
    35 MB of memory in each model agent)."""
    code = ("from trinity.agents.models.policy import build_providers, load_policy; "
            "from trinity.agents.models.router import Router; "
            "from trinity.stores.costs import CostLedger; "
            "import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp()); "
            "Router(load_policy(None), build_providers(load_policy(None), {}), "
            "CostLedger(d / 'c.db'), budget_usd=1.0, budget_mode='warn')")
    assert modules_imported(code, ("openai", "ollama", "httpx", "genai_prices")) == []


def test_a_paid_call_the_ledger_cannot_take_is_recorded_when_its_request_comes_again(
    faults: FaultServer, short_dir: Path
) -> None:
    """A locked ledger (or a full disk) after a paid answer: the call is not lost and not
    paid twice. The router raises the ledger's error (the message is retried), keeps the
    attempt, and writes it before anything else when the request comes again; its answer
    then serves the request."""
    import sqlite3

    path = short_dir / "trinity_costs.db"
    ledger = CostLedger(path, busy_timeout_ms=200)
    faults.program(default=Fault(OK))
    flaky = paid(faults.base_url)
    router = make_router(policy(chain=("flaky",)), {"flaky": flaky}, ledger)
    ctx = CallContext("architect", "architect:ev-locked", run_id="run-1", event_id="ev-locked")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            router.call(REQUEST, ctx, parse)
        assert len(faults.hits) == 1
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # still locked
            router.call(REQUEST, ctx, parse)
        assert len(faults.hits) == 1  # not called again while it cannot be recorded
        holder.execute("ROLLBACK")
        again = router.call(REQUEST, ctx, parse)
    finally:
        holder.close()
        flaky.close()
    assert again.reused and again.provider == "flaky" and again.value in ("yes", "no")
    assert len(faults.hits) == 1
    rows = rows_of(ledger, ctx.request_id)
    assert [(r["provider"], r["status"], r["attempt"]) for r in rows] == [
        ("flaky", "success", 1)]
    assert rows[0]["cost_usd"] > 0
    ledger.close()


# -- where a call waits -------------------------------------------------------------------


def test_a_cooperative_provider_is_called_on_the_caller_s_thread_and_others_by_the_waiter(
        ledger: CostLedger, faults: FaultServer) -> None:
    """The instant provider (cooperative: it never waits) answers on the router's own
    thread, with the ticker given and no waiter; the openai provider (its client blocks
    in its own I/O) is handed to the waiter, as before."""
    instant = InstantProvider("instant", env={ENABLE_VAR: "1"}, source="test policy")
    caller = threading.get_ident()
    waited: list[int] = []

    def waiter(fn: Callable[[], Completion], timeout_s: float,
               cancel: threading.Event) -> Completion:
        waited.append(threading.get_ident())
        return fn()

    pol = parse_policy({
        "call": {"timeout_s": LONG_TIMEOUT_S, "max_attempts": 1},
        "providers": {"flaky": {"kind": "openai", "model": "gpt-5", "price_model": "gpt-5"},
                      "instant": {"kind": "instant"}},
        "routes": [{"chain": ["instant"]}]}, "test policy")
    router = Router(pol, {"instant": instant, "flaky": paid(faults.base_url)}, ledger,
                    budget_usd=10.0, waiter=waiter)
    got = router.call(REQUEST, CallContext(agent="architect", request_id="r-instant"), parse)
    assert got.provider == "instant" and got.value == "yes"
    assert waited == []
    assert [r["status"] for r in rows_of(ledger, "r-instant")] == ["success"]

    routed = Router(parse_policy({
        "call": {"timeout_s": LONG_TIMEOUT_S, "max_attempts": 1},
        "providers": {"flaky": {"kind": "openai", "model": "gpt-5", "price_model": "gpt-5"}},
        "routes": [{"chain": ["flaky"]}]}, "test policy"),
        {"flaky": paid(faults.base_url)}, ledger, budget_usd=10.0, waiter=waiter)
    got = routed.call(REQUEST, CallContext(agent="architect", request_id="r-paid"), parse)
    assert got.provider == "flaky"
    assert waited == [caller]


def test_a_process_s_tick_beats_when_a_beat_is_due_and_cancels_on_a_stop(
        short_dir: Path) -> None:
    """What a cooperative call does between its polls on an agent's thread
    (``BaseProcess.tick_during_call``): a heartbeat once one is due, not on every tick;
    after a stop request, the call's cancel flag."""

    class Beating(BaseProcess):
        beats = 0

        def send_heartbeat(self) -> None:
            self.beats += 1

    clock = ManualClock()
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(short_dir),
                                  "TRINITY_HEARTBEAT_INTERVAL": "1.0"})
    process = Beating(settings, clock=clock)
    cancel = threading.Event()
    for _ in range(3):
        process.tick_during_call(cancel)
    assert process.beats == 1
    clock.advance(0.5)
    process.tick_during_call(cancel)
    assert process.beats == 1
    clock.advance(0.6)
    process.tick_during_call(cancel)
    assert process.beats == 2 and not cancel.is_set()
    process.stopping = True
    process.tick_during_call(cancel)
    assert cancel.is_set()
