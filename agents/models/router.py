"""The router: picks the provider for each model call and records every attempt.

A request is tried along its route (from the policy): up to ``max_attempts`` per
provider with backoff, then the next provider (a fallback). Providers without key or
host, cooling down after repeated failures, or paid while the budget forbids it, are
skipped. Each attempt — answer, error, timeout, invalid output — is one row in the
cost ledger, written before the next attempt starts. A request that was already
answered (a message replayed after a crash) reuses the stored answer: no new call.

A provider may send more than one request for one attempt (the openai provider
negotiating a server's structured-output form, or sending a wrong answer back once
for repair). It reports each request it set aside to the router, which writes a row
for each, in order, before the attempt's own: a request that reached a server is a
row, priced from its tokens. Only the attempt's final outcome counts towards the
provider's cool-down.

How a call waits depends on the provider. One whose wait is its own loop (the model
server's socket, polled every 50 ms; the instant provider, which does not wait) is
*cooperative*: it runs on the caller's thread and calls ``tick`` between polls, which
keeps the process beating and cancels the call when the process is asked to stop. Any
other provider (a client library blocking in its own I/O, llama.cpp in C) is handed to
the ``waiter``, which runs it on a call thread and beats meanwhile. The hand-off costs
~0.15-0.2 ms of CPU per call (two thread wake-ups), more than a quick answer itself.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from trinity.agents.models.policy import RoutingPolicy
from trinity.agents.models.providers.base import ChatRequest, Completion, Provider, TokenUsage
from trinity.clock import now_ms
from trinity.errors import AllModelsFailed, ModelError, ModelTimeout
from trinity.stores.costs import (
    ERROR,
    FALLBACK,
    PRIMARY,
    RETRY,
    SUCCESS,
    TIMEOUT,
    CallRecord,
    CostLedger,
    new_call_id,
    price_usd,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# Runs one provider call; BaseProcess supplies one that keeps heartbeats going.
Waiter = Callable[[Callable[[], Completion], float, threading.Event], Completion]
# Called by a cooperative provider while it waits (at least every 50 ms), with the call's
# cancel flag; BaseProcess supplies one that beats and sets the flag on a stop request.
Ticker = Callable[[threading.Event], None]


class ReportEarlier(Protocol):
    """Receives a request a provider sent and set aside within one attempt: why
    (``error``), its answer if one came (its tokens are paid for), when it was sent and
    how long it took."""

    def __call__(self, error: ModelError, completion: Completion | None, *, ts_ms: int,
                 latency_ms: float) -> None: ...


@runtime_checkable
class ReportsEarlierRequests(Protocol):
    """A provider that may send more than one request for one call."""

    def complete_reporting(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event,
        report_earlier: ReportEarlier | None,
    ) -> Completion: ...


@runtime_checkable
class WaitsCooperatively(Protocol):
    """A provider that waits in its own loop and can run on the caller's thread: it
    calls ``tick`` between its polls (at least every 50 ms while waiting), enforces its
    own deadline, and honours ``cancel`` (set by ``tick`` or by anyone else)."""

    def complete_cooperating(
        self, request: ChatRequest, *, timeout_s: float, cancel: threading.Event,
        tick: Callable[[], None],
    ) -> Completion: ...


def run_inline(
    fn: Callable[[], Completion], timeout_s: float, cancel: threading.Event
) -> Completion:
    return fn()


def no_tick(cancel: threading.Event) -> None:
    """The ticker of a caller with nothing to do while a call waits."""


@dataclass
class ProviderHealth:
    consecutive_failures: int = 0
    cooldown_until: float = 0.0


@dataclass(frozen=True)
class CallContext:
    """What a request serves: written to every ledger row of its attempts."""

    agent: str
    request_id: str
    run_id: str | None = None
    event_id: str | None = None
    task_id: str | None = None
    pattern: str | None = None
    severity: str | None = None
    sim_elapsed_s: float | None = None


@dataclass
class Routed(Generic[T]):
    value: T
    provider: str
    model: str
    attempts: list[CallRecord] = field(default_factory=list)
    reused: bool = False
    skipped: dict[str, str] = field(default_factory=dict)


class Router:
    def __init__(
        self,
        policy: RoutingPolicy,
        providers: dict[str, Provider],
        ledger: CostLedger,
        *,
        budget_usd: float,
        budget_mode: str = "warn",
        waiter: Waiter = run_inline,
        ticker: Ticker = no_tick,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.providers = providers
        self.ledger = ledger
        self.budget_usd = budget_usd
        self.budget_mode = budget_mode
        self.waiter = waiter
        self.ticker = ticker
        self.sleep = sleep
        self.monotonic = monotonic
        self.health = {name: ProviderHealth() for name in providers}
        # Checked once, by object: a runtime protocol check costs ~12 us on every call.
        self._reporting: dict[int, ReportsEarlierRequests] = {
            id(p): p for p in providers.values() if isinstance(p, ReportsEarlierRequests)}
        self._cooperative: dict[int, WaitsCooperatively] = {
            id(p): p for p in providers.values() if isinstance(p, WaitsCooperatively)}
        # Attempts made (and perhaps paid) whose ledger write failed (a locked ledger, a
        # full disk), by request: written before anything else is done for the request
        # again, so its retry reuses the answer instead of paying for a second call.
        self._unrecorded: dict[str, list[tuple[CallRecord, str | None]]] = {}
        # An unknown price is a config error, now; a provider that cannot be used (no
        # key, no host) is not priced, nor is the price table loaded for it (17 MB).
        for provider in providers.values():
            if provider.price_model and provider.unavailable_reason() is None:
                price_usd(provider.price_model, provider.price_provider,
                          input_tokens=1, output_tokens=1)

    # -- choosing -----------------------------------------------------------

    def plan_route(self, ctx: CallContext) -> tuple[list[Provider], dict[str, str]]:
        """The providers to try, in order, and why the others were skipped."""
        route = self.policy.route_for(ctx.agent, ctx.pattern, ctx.severity)
        over_budget: bool | None = None
        usable: list[Provider] = []
        skipped: dict[str, str] = {}
        now = self.monotonic()
        for name in route.chain:
            provider = self.providers[name]
            reason = provider.unavailable_reason()
            if reason is None and self.health[name].cooldown_until > now:
                reason = f"cooling down for {self.health[name].cooldown_until - now:.0f} s"
            if reason is None and provider.price_model and (
                    route.within_budget or self.budget_mode == "enforce"):
                if over_budget is None:
                    over_budget = self.ledger.spent_usd(ctx.run_id) >= self.budget_usd
                if over_budget:
                    reason = f"budget ${self.budget_usd:.2f} spent"
            if reason is None:
                usable.append(provider)
            else:
                skipped[name] = reason
        return usable, skipped

    # -- calling ------------------------------------------------------------

    def call(
        self,
        request: ChatRequest,
        ctx: CallContext,
        parse: Callable[[Completion], T],
    ) -> Routed[T]:
        """Answer ``request`` along its route; ``parse`` turns an answer into the result
        (raising InvalidModelOutput for one that is unusable, which counts as a failed
        attempt). Raises AllModelsFailed when no provider produced a usable answer, and
        the ledger's error when an attempt cannot be recorded (the attempt is kept and
        recorded first when the request comes again)."""
        self._record_unrecorded(ctx.request_id)
        stored = self.ledger.answer_for(ctx.request_id)
        if stored is not None:
            answered_by, model, content = stored
            value = parse(Completion(content, TokenUsage(0, 0), model))
            return Routed(value, answered_by, model, reused=True)
        usable, skipped = self.plan_route(ctx)
        attempts: list[CallRecord] = []
        errors: list[str] = []
        for index, provider in enumerate(usable):
            for attempt in range(1, self.policy.call.max_attempts + 1):
                if attempt > 1:
                    self.sleep(self.policy.call.backoff(attempt - 1))
                route = PRIMARY if index == 0 and attempt == 1 else (
                    RETRY if attempt > 1 else FALLBACK)
                # A retry samples afresh: the same seed would give the same bad answer.
                tried = request if attempt == 1 else dataclasses.replace(
                    request, seed=request.seed + attempt - 1)
                records, parsed = self._attempt(provider, tried, ctx, route,
                                                len(attempts) + 1, parse)
                attempts.extend(records)
                if parsed is not None:
                    return Routed(parsed[0], provider.name, records[-1].model, attempts,
                                  skipped=skipped)
                errors.append(f"{provider.name}: {records[-1].error}")
                if self.health[provider.name].cooldown_until > self.monotonic():
                    break  # cooling down now: straight to the next provider
        detail = "; ".join(errors) or "no usable provider (" + ", ".join(
            f"{k}: {v}" for k, v in skipped.items()) + ")"
        raise AllModelsFailed(
            f"{ctx.agent} request {ctx.request_id}: every provider failed: {detail}", attempts)

    def _record_unrecorded(self, request_id: str) -> None:
        """Write the attempts of ``request_id`` whose ledger write failed, oldest first
        (raises the ledger's error again if it still cannot take them)."""
        pending = self._unrecorded.get(request_id)
        while pending:
            record, answer = pending[0]
            self.ledger.record(record, answer=answer)
            pending.pop(0)
        self._unrecorded.pop(request_id, None)

    def _attempt(
        self,
        provider: Provider,
        request: ChatRequest,
        ctx: CallContext,
        route: str,
        number: int,
        parse: Callable[[Completion], T],
    ) -> tuple[list[CallRecord], tuple[T] | None]:
        """One attempt on ``provider``: its ledger rows (the requests the provider set
        aside, then the final one) and the parsed answer, if there is one."""
        cancel = threading.Event()
        timeout_s = self.policy.call.timeout_s
        earlier: list[tuple[ModelError, Completion | None, int, float]] = []

        def report_earlier(error: ModelError, completion: Completion | None, *, ts_ms: int,
                           latency_ms: float) -> None:
            earlier.append((error, completion, ts_ms, latency_ms))

        reporting = self._reporting.get(id(provider))

        def complete() -> Completion:
            if reporting is not None:
                return reporting.complete_reporting(request, timeout_s=timeout_s,
                                                    cancel=cancel, report_earlier=report_earlier)
            return provider.complete(request, timeout_s=timeout_s, cancel=cancel)

        cooperative = self._cooperative.get(id(provider))
        started = time.perf_counter()
        ts = now_ms()
        completion: Completion | None = None
        parsed: tuple[T] | None = None
        error: ModelError | None = None
        try:
            if cooperative is not None:
                ticker = self.ticker
                completion = cooperative.complete_cooperating(
                    request, timeout_s=timeout_s, cancel=cancel,
                    tick=lambda: ticker(cancel))
            else:
                completion = self.waiter(complete, timeout_s, cancel)
            parsed = (parse(completion),)
        except ModelError as exc:
            error = exc
        latency_ms = (time.perf_counter() - started) * 1000
        # The first request of the attempt keeps its route; the provider's later ones
        # are retries on the same provider. The final request's time is what is left.
        records: list[tuple[CallRecord, str | None]] = []
        aside_ms_total = 0.0
        for aside, aside_completion, aside_ts, aside_ms in list(earlier):
            records.append((self._record(
                provider, ctx, route if not records else RETRY, number + len(records),
                aside_ts, aside_ms, aside_completion, aside), None))
            aside_ms_total += aside_ms
        final = self._record(provider, ctx, route if not records else RETRY,
                             number + len(records), ts + round(aside_ms_total),
                             max(latency_ms - aside_ms_total, 0.0), completion, error)
        records.append((final, completion.content if error is None and completion else None))
        for i, (record, answer) in enumerate(records):
            try:
                self.ledger.record(record, answer=answer)
            except sqlite3.Error:
                self._unrecorded.setdefault(ctx.request_id, []).extend(records[i:])
                raise
        health = self.health[provider.name]
        if error is None:
            health.consecutive_failures = 0
        else:
            log.warning("model call failed (%s, attempt %d, %s): %s", provider.name,
                        final.attempt, final.route, error)
            health.consecutive_failures += 1
            if health.consecutive_failures >= self.policy.call.cooldown_after:
                health.cooldown_until = self.monotonic() + self.policy.call.cooldown_s
                health.consecutive_failures = 0
                log.warning("provider %s cooling down for %.0f s", provider.name,
                            self.policy.call.cooldown_s)
        return [record for record, _ in records], parsed

    def _record(
        self, provider: Provider, ctx: CallContext, route: str, number: int, ts_ms: int,
        latency_ms: float, completion: Completion | None, error: ModelError | None,
    ) -> CallRecord:
        """The ledger row of one request: priced from its tokens when an answer came."""
        usage = completion.usage if completion is not None else TokenUsage(0, 0, estimated=True)
        cost = 0.0
        if provider.price_model and completion is not None:
            cost = float(price_usd(provider.price_model, provider.price_provider,
                                   input_tokens=usage.input_tokens,
                                   output_tokens=usage.output_tokens,
                                   cached_tokens=usage.cached_tokens))
        status = SUCCESS if error is None else (TIMEOUT if isinstance(error, ModelTimeout)
                                                else ERROR)
        return CallRecord(
            call_id=new_call_id(), request_id=ctx.request_id, attempt=number, route=route,
            ts_ms=ts_ms, sim_elapsed_s=ctx.sim_elapsed_s, run_id=ctx.run_id, agent=ctx.agent,
            provider=provider.name, provider_kind=provider.kind,
            model=completion.model if completion is not None else provider.model,
            local=provider.local, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens, tokens_estimated=usage.estimated,
            cost_usd=cost, latency_ms=round(latency_ms, 3), status=status,
            error_class=error.error_class if error is not None else None,
            error=str(error)[:500] if error is not None else None,
            event_id=ctx.event_id, task_id=ctx.task_id,
        )

    def close(self) -> None:
        for provider in self.providers.values():
            provider.close()
