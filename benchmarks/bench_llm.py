"""Benchmark: ARCHITECT and EXECUTOR model calls against direct llama-cpp-python calls.

    python benchmarks/bench_llm.py        # 5 prompts x 6 reps per agent (BENCH_SHORT=1: x 2,
                                          # BENCH_REPS=N or --reps N: x N)
    python benchmarks/bench_llm.py --json # the same, the figures as one JSON object on stdout

Measured path: the whole ``prepare()`` of a real Architect / Executor, initialized on
a temporary data dir (its own journal, bus node and cost ledger) with the shipped
routing policy, calling the model as it does under supervisord: in a real ``trinity
model-server`` process over its ipc socket (``--in-process``: llama.cpp in the agent's
own process, as without the server). That is everything the agent does per call:
decoding the message, the run lookups, building the request, Router.call (route
planning, stored-answer lookup, the provider's call with its per-token counter — on
the agent's own thread, ticking its heartbeats, for the served provider; in the call
thread for the in-process one — answer validation, the ledger row) and building the
outputs.
The commit that follows (a journal transaction) is timed apart and not counted.

Reference: ``llama_cpp.Llama(...).create_chat_completion(...)`` called directly, not
streamed, on its own Llama built with every argument of the provider's loaded one (for
the server: of the embedded provider the server builds for the agents' routing)
(``Llama.__getstate__``: same GGUF, n_ctx, n_threads, n_threads_batch, seed, ...), run
in a fresh thread per call as the agent's waiter runs its provider call, with the
very request the agent built (captured during warm-up):
same messages, the same JSON-schema grammar (``embedded.schema_grammar``), max_tokens,
temperature, seed.

Prompts: the scenario's first five events (one per category) as WITNESS signals
(ARCHITECT); the five tasks ARCHITECT planned for them in warm-up (EXECUTOR). Each
prompt is called once per path in warm-up, then ``reps`` times per path, the two paths
alternating (ABBA: the first path of each pair alternates). Each Llama sees the same
sequence of prompts, so both keep the same KV prefix cache. Every call has a fresh event
id, so the ledger never answers from a stored request. A prompt whose first answer the
agent rejects (its router retries with seed + 1 after a backoff, which the direct call
has no reason to do) is left out of the timed rounds and named in the output.

Same seed and prompt give the same tokens; the token counts and texts of the two
paths are checked. Overhead = (agent - direct) / direct on the median wall times per
call (on median per-token times if any token count differs, which is then said);
also shown: the paired median of agent/direct - 1, the CPU-time overhead (less
sensitive to other processes; the model server's CPU time counted as the agent's),
ms per output token and tokens/s (output tokens / call wall time), and how much of the
agent's call was spent outside the provider.
Target: overhead <= 5 % for each agent; exits 1 when missed. Writes
``reports/bench_llm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from report_rows import figure, write_report

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "bench_llm.json"
TARGET_OVERHEAD = 0.05
# Variables that would send calls to another provider than the embedded one.
PROVIDER_VARS = ("OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRINITY_ROUTING")
RUN_ID = "bench-llm-run"
SHOWN_SETTINGS = ("n_ctx", "n_batch", "n_threads", "n_threads_batch", "seed")
CONFIDENCE = 0.93  # what WITNESS reports for these events is about this; it is one token


@dataclass
class Call:
    wall_s: float
    cpu_s: float
    output_tokens: int
    prompt_tokens: int
    content: str
    provider_s: float | None = None  # agent path: inside EmbeddedProvider.complete
    commit_s: float | None = None    # agent path: the commit after prepare (not counted)


@dataclass
class Series:
    direct: list[Call] = field(default_factory=list)
    agent: list[Call] = field(default_factory=list)


def log(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------


def signals() -> list[dict[str, Any]]:
    """The scenario's first five events (one per category, as a run emits them) as the
    signals WITNESS publishes for them."""
    from trinity.agents.witness.process import SIGNAL_CONTEXT
    from trinity.contract import PATTERNS as CATEGORIES
    from trinity.controller.process.scenario import event_for_cycle

    out = []
    for cycle in range(1, len(CATEGORIES) + 1):
        pattern, event = event_for_cycle(cycle)
        severity = event.get("severity")
        out.append({
            "signal_id": "", "event_id": "", "run_id": RUN_ID, "cycle": cycle,
            "pattern": pattern, "confidence": CONFIDENCE,
            "severity": severity if isinstance(severity, str) else None,
            "detector": "witness", "message": event["message"][:2000],
            **{k: event[k] for k in SIGNAL_CONTEXT if k in event},
        })
    return out


def as_message(stream: str, seq: int, payload: dict[str, Any]) -> Any:
    from trinity.bus.message import Message, encode_payload

    return Message(stream, seq, f"{stream}/bench-{seq}", "bench", int(time.time() * 1000),
                   encode_payload(payload))


# -- the two paths --------------------------------------------------------------------


class AgentPath:
    """A real agent on a temp data dir; ``call`` times one prepare() of a message."""

    def __init__(self, agent: Any, stream: str, id_field: str,
                 reference: Any = None, server_pid: int | None = None) -> None:
        self.agent = agent
        self.stream = stream
        self.id_field = id_field
        self.seq = 0
        self.provider = agent.router.providers["embedded"]
        # The in-process provider whose llama.cpp settings the direct calls copy.
        self.reference = reference if reference is not None else self.provider
        # The model server's process: its CPU time is the call's too.
        self.server = psutil.Process(server_pid) if server_pid else None
        from trinity.agents.models.router import WaitsCooperatively

        self._inside: list[float] = []
        # The method the router calls: a cooperative provider's (the served one, on the
        # agent's thread), else ``complete`` (the in-process one, in the call thread).
        method = ("complete_cooperating" if isinstance(self.provider, WaitsCooperatively)
                  else "complete")
        original = getattr(self.provider, method)

        def timed_complete(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.append(time.perf_counter() - started)

        setattr(self.provider, method, timed_complete)  # one extra Python frame per call

    def _server_cpu(self) -> float:
        if self.server is None:
            return 0.0
        times = self.server.cpu_times()
        return float(times.user + times.system)

    def call(self, payload: dict[str, Any], unique: str) -> tuple[Call, list[Any]]:
        self.seq += 1
        payload = dict(payload)
        payload[self.id_field] = unique
        if self.id_field == "task_id":
            payload["event_id"] = unique.rsplit("/", 1)[0]
        else:
            payload["signal_id"] = unique
        msg = as_message(self.stream, self.seq, payload)
        self._inside.clear()
        cpu0, t0 = time.process_time() + self._server_cpu(), time.perf_counter()
        commit = self.agent.prepare(msg)
        wall = time.perf_counter() - t0
        cpu = time.process_time() + self._server_cpu() - cpu0
        t1 = time.perf_counter()
        with self.agent.journal.transaction() as tx:
            commit(tx)
        commit_s = time.perf_counter() - t1
        rows = [r for r in self.agent.ledger.calls()
                if r["request_id"] == f"{self.agent.name}:{unique}"]
        if not rows or rows[-1]["status"] != "success" or any(
                r["provider"] != "embedded" for r in rows):
            raise SystemExit(f"{self.agent.name}: call {unique} did not end in a successful "
                             f"embedded call: "
                             f"{[(r['provider'], r['status'], r['error']) for r in rows]}")
        stored = self.agent.ledger.answer_for(f"{self.agent.name}:{unique}")
        self.attempts = rows
        return Call(wall, cpu, sum(r["output_tokens"] for r in rows),
                    sum(r["input_tokens"] for r in rows), stored[2],
                    provider_s=sum(self._inside), commit_s=commit_s), list(tx.published)


class DirectPath:
    """llama-cpp-python called directly, with the provider's Llama arguments.

    Each call runs in a fresh thread, as the agent's waiter (BaseProcess.wait_for)
    runs every provider call, unless ``main_thread``: llama.cpp's OpenMP team of the
    main thread is long-lived and, when the CPUs are oversubscribed, its spin-waiting
    at barriers makes a multi-threaded prompt eval several times slower than in a
    fresh thread, which is not what the agent does."""

    def __init__(self, provider: Any, *, main_thread: bool = False) -> None:
        from llama_cpp import Llama

        # Every argument the provider's own Llama was built with (model file, n_ctx,
        # n_threads, n_threads_batch, n_batch, seed, ...), whatever _load passes.
        state = provider._load().__getstate__()
        self.settings = {k: state[k] for k in SHOWN_SETTINGS}
        self.llama = Llama(**state)
        self.main_thread = main_thread

    def call(self, request: Any) -> Call:
        from trinity.agents.models.providers.embedded import schema_grammar

        grammar = schema_grammar(request.schema) if request.schema else None
        box: dict[str, Any] = {}

        def complete() -> None:
            box["result"] = self.llama.create_chat_completion(
                messages=list(request.messages), grammar=grammar,
                max_tokens=request.max_tokens, temperature=request.temperature,
                seed=request.seed)

        cpu0, t0 = time.process_time(), time.perf_counter()
        if self.main_thread:
            complete()
        else:
            worker = threading.Thread(target=complete, name="direct-call")
            worker.start()
            worker.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if "result" not in box:
            raise SystemExit("direct call failed (see the traceback above)")
        result = box["result"]
        usage = result["usage"]
        return Call(wall, cpu, usage["completion_tokens"], usage["prompt_tokens"],
                    result["choices"][0]["message"]["content"] or "")

    def close(self) -> None:
        self.llama.close()


def capture_requests(agent: Any) -> tuple[list[Any], Callable[[], None]]:
    """Record each ChatRequest the agent hands its router (warm-up only)."""
    captured: list[Any] = []
    original = agent.router.call

    def recording(request: Any, ctx: Any, parse: Any) -> Any:
        captured.append(request)
        return original(request, ctx, parse)

    agent.router.call = recording

    def restore() -> None:
        del agent.router.call  # back to the class's method

    return captured, restore


# -- one agent ------------------------------------------------------------------------


def bench_agent(agent_path: AgentPath, payloads: list[dict[str, Any]], reps: int,
                quiet: bool, main_thread: bool
                ) -> tuple[Series, dict[int, str], list[list[Any]]]:
    """Warm-up (one call per prompt per path, capturing the requests), then ``reps``
    alternating rounds. A prompt whose first answer the agent rejects (its router then
    retries with seed + 1 after a backoff; the direct call validates nothing) is left
    out of the timed rounds and reported. Returns the series, the prompts left out
    (index -> why) and the warm-up's published outputs."""
    name = agent_path.agent.name
    direct = DirectPath(agent_path.reference, main_thread=main_thread)
    try:
        captured, restore = capture_requests(agent_path.agent)
        outputs, left_out = [], {}
        for i, payload in enumerate(payloads):
            call, published = agent_path.call(payload, unique_id(name, "warm", i))
            outputs.append(published)
            if len(captured) != i + 1:
                raise SystemExit(f"{name}: expected one router call per message")
            request = captured[i]
            if len(agent_path.attempts) > 1:
                left_out[i] = "; ".join(str(r["error"]) for r in agent_path.attempts[:-1])
            ref = direct.call(request)
            log(quiet, f"  {name} warm-up prompt {i + 1}: agent {call.output_tokens} tokens "
                       f"{call.wall_s:.2f} s, direct {ref.output_tokens} tokens "
                       f"{ref.wall_s:.2f} s" + (f"; left out: {left_out[i]}"
                                                  if i in left_out else ""))
        restore()
        requests = list(captured)
        timed = [i for i in range(len(payloads)) if i not in left_out]
        if len(timed) < 3:
            raise SystemExit(f"{name}: only {len(timed)} of {len(payloads)} prompts answered "
                             f"on the first attempt: {left_out}")
        series = Series()
        for rep in range(reps):
            for n, i in enumerate(timed):
                def run_agent(rep: int = rep, i: int = i) -> None:
                    call, _ = agent_path.call(payloads[i], unique_id(name, rep, i))
                    if len(agent_path.attempts) != 1:
                        raise SystemExit(f"{name}: prompt {i + 1} needed "
                                         f"{len(agent_path.attempts)} attempts this time")
                    series.agent.append(call)

                def run_direct(i: int = i) -> None:
                    series.direct.append(direct.call(requests[i]))

                first, second = ((run_agent, run_direct) if (rep * len(timed) + n) % 2
                                 else (run_direct, run_agent))
                first()
                second()
            log(quiet, f"  {name} round {rep + 1}/{reps}: direct "
                       f"{statistics.median(c.wall_s for c in series.direct):.3f} s, agent "
                       f"{statistics.median(c.wall_s for c in series.agent):.3f} s (medians), "
                       f"load {os.getloadavg()[0]:.1f}")
        return series, left_out, outputs
    finally:
        direct.close()


def unique_id(agent: str, rep: int | str, i: int) -> str:
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    return (f"bench-{rep}-{i}-{stamp}/t1" if agent == "executor"
            else f"bench-{rep}-{i}-{stamp}")


# -- figures --------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def figures(series: Series, reps: int, prompts: int, left_out: dict[int, str]
            ) -> dict[str, Any]:
    pairs = list(zip(series.direct, series.agent, strict=True))
    tokens_match = all(d.output_tokens == a.output_tokens for d, a in pairs)
    texts_match = all(d.content == a.content for d, a in pairs)

    def path(calls: list[Call]) -> dict[str, Any]:
        return {
            "median_wall_s": round(_med([c.wall_s for c in calls]), 4),
            "median_cpu_s": round(_med([c.cpu_s for c in calls]), 4),
            "median_ms_per_token": round(_med([1000 * c.wall_s / max(c.output_tokens, 1)
                                               for c in calls]), 3),
            "tokens_per_s": round(sum(c.output_tokens for c in calls)
                                  / sum(c.wall_s for c in calls), 2),
            "median_output_tokens": _med([c.output_tokens for c in calls]),
            "median_prompt_tokens": _med([c.prompt_tokens for c in calls]),
            "calls": len(calls),
        }

    direct, agent = path(series.direct), path(series.agent)
    basis = "wall" if tokens_match else "per_token"
    if tokens_match:
        overhead = agent["median_wall_s"] / direct["median_wall_s"] - 1
    else:
        overhead = agent["median_ms_per_token"] / direct["median_ms_per_token"] - 1
    inside = [c.provider_s for c in series.agent if c.provider_s is not None]
    return {
        "prompts": prompts, "reps": reps, "direct": direct, "agent": agent,
        "left_out": {f"prompt {i + 1}": why for i, why in left_out.items()},
        "tokens_match": tokens_match, "texts_match": texts_match, "basis": basis,
        "overhead": round(overhead, 4),
        "paired_median_overhead": round(_med([a.wall_s / d.wall_s - 1 for d, a in pairs]), 4),
        "cpu_overhead": round(agent["median_cpu_s"] / direct["median_cpu_s"] - 1, 4),
        "agent_breakdown_ms": {
            "median_in_provider": round(1000 * _med(inside), 1),
            "median_outside_provider": round(1000 * _med(
                [c.wall_s - (c.provider_s or 0) for c in series.agent]), 2),
            "median_commit_not_counted": round(1000 * _med(
                [c.commit_s or 0 for c in series.agent]), 2),
        },
        "target_met": overhead <= TARGET_OVERHEAD,
    }


def print_table(report: dict[str, Any]) -> None:
    settings = ", ".join(f"{k} {v}" for k, v in report["llama_settings"].items())
    print(f"\nbench-llm: {report['model']} ({Path(report['model_path']).name}), {settings}; "
          f"{report['cpus']} CPUs, load avg {report['load_avg_before']} -> "
          f"{report['load_avg_after']}")
    if max(report["load_avg_before"], report["load_avg_after"]) > report["cpus"]:
        print(f"note: load average above {report['cpus']} (other processes): the CPUs were "
              "oversubscribed, wall times are noisier than CPU times")
    print("measured: whole Architect/Executor prepare() (router, provider streaming, "
          "validation, ledger row)")
    print(f"reference: {report['reference']}")
    head = (f"\n{'agent':<10}{'path':<8}{'calls':>6}{'out tok':>8}{'in tok':>7}"
            f"{'median s':>10}{'ms/tok':>8}{'tok/s':>7}{'cpu s':>8}")
    print(head)
    for name in ("architect", "executor"):
        fig = report["agents"][name]
        for label in ("direct", "agent"):
            p = fig[label]
            print(f"{name:<10}{label:<8}{p['calls']:>6}{p['median_output_tokens']:>8g}"
                  f"{p['median_prompt_tokens']:>7g}{p['median_wall_s']:>10.3f}"
                  f"{p['median_ms_per_token']:>8.2f}{p['tokens_per_s']:>7.1f}"
                  f"{p['median_cpu_s']:>8.3f}")
    print()
    for name in ("architect", "executor"):
        fig = report["agents"][name]
        b = fig["agent_breakdown_ms"]
        print(f"{name}: tokens {'match' if fig['tokens_match'] else 'DIFFER'} on every pair, "
              f"texts {'match' if fig['texts_match'] else 'DIFFER'}; agent call = "
              f"{b['median_in_provider']:.1f} ms in the provider + "
              f"{b['median_outside_provider']:.2f} ms around it (median; commit "
              f"{b['median_commit_not_counted']:.2f} ms, not counted)")
        for prompt, why in fig["left_out"].items():
            print(f"{name}: {prompt} left out (its first answer is rejected, the router "
                  f"retries after a backoff; the direct call checks nothing): {why[:160]}")
    for name in ("architect", "executor"):
        fig = report["agents"][name]
        what = "median wall" if fig["basis"] == "wall" else "median per-token time"
        print(f"{name:<10} overhead {100 * fig['overhead']:+.2f} % on {what} "
              f"(paired median {100 * fig['paired_median_overhead']:+.2f} %, CPU time "
              f"{100 * fig['cpu_overhead']:+.2f} %)  (target <= "
              f"{100 * TARGET_OVERHEAD:g} %)  {'OK' if fig['target_met'] else 'MISSED'}")


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per agent: its call against the direct call, on the basis the overhead is on."""
    out = []
    for name in ("architect", "executor"):
        fig = report["agents"][name]
        wall = fig["basis"] == "wall"
        key, unit = ("median_wall_s", "s") if wall else ("median_ms_per_token", "ms/token")
        what = "median call" if wall else "median time per output token"
        out.append(figure(f"llm: {name} {what}", fig["agent"][key], unit,
                          reference=(f"direct llama-cpp-python {what}", fig["direct"][key], unit),
                          ratio=1 + fig["overhead"],
                          target=f"<= {1 + TARGET_OVERHEAD:g} x reference",
                          met=fig["target_met"]))
    return out


# -- main -----------------------------------------------------------------------------


def start_model_server(data_dir: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """``trinity model-server`` for the bench's data dir, once it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({"TRINITY_DATA_DIR": str(data_dir), "TRINITY_RUN_DIR": str(run_dir)})
    proc = subprocess.Popen([str(Path(sys.executable).parent / "trinity"), "model-server"],
                            env=env, cwd=data_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_file = data_dir / "logs" / "24h_test" / "trinity.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log_file.exists() and "model server listening" in log_file.read_text():
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"the model server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the model server did not listen within 60 s")


def served_reference(provider: Any) -> Any:
    """The embedded provider the server builds for ``provider``'s calls."""
    from trinity.agents.models.providers.embedded import EmbeddedProvider
    from trinity.agents.models.serve import call_threads

    spec = provider.spec
    return EmbeddedProvider(model=spec["model"], model_path=spec["model_path"],
                            n_ctx=spec["n_ctx"], n_threads=call_threads(spec["n_threads"]))


def run(reps: int, quiet: bool, main_thread: bool, served: bool = True) -> dict[str, Any]:
    from trinity.agents.architect import Architect
    from trinity.agents.executor import Executor
    from trinity.contract import EXECUTION, IMPROVEMENT
    from trinity.settings import Settings

    for var in PROVIDER_VARS:  # the shipped policy, falling through to `embedded`
        os.environ.pop(var, None)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    run_dir = Path(tempfile.mkdtemp(prefix="bl", dir="/tmp"))
    settings = Settings.from_env({"TRINITY_DATA_DIR": str(data_dir),
                                  "TRINITY_RUN_DIR": str(run_dir),
                                  "TRINITY_MODEL_SERVER": "on" if served else "off"})
    load_before = os.getloadavg()
    agents: list[Any] = []
    server = start_model_server(data_dir, run_dir) if served else None
    reference: Any = None
    try:
        architect = Architect(settings)
        architect.initialize()
        agents.append(architect)
        with architect.journal.transaction() as tx:  # the run the controller would record
            tx.conn.execute(
                "INSERT INTO runs(run_id, started_ms, status, config) VALUES (?, ?, ?, ?)",
                (RUN_ID, int(time.time() * 1000), "running",
                 json.dumps({"budget_usd": settings.budget_usd,
                             "budget_mode": settings.budget_mode})))
        executor = Executor(settings)
        executor.initialize()
        agents.append(executor)

        if served:
            reference = served_reference(architect.router.providers["embedded"])
        log(quiet, f"ARCHITECT: 5 prompts x {reps} reps per path"
                   + (" (the agent's calls in the model server)" if served else ""))
        server_pid = server.pid if server is not None else None
        arch_path = AgentPath(architect, IMPROVEMENT, "event_id", reference, server_pid)
        arch_series, arch_left, outputs = bench_agent(arch_path, signals(), reps, quiet,
                                                          main_thread)
        tasks = [json.loads(m.payload) for published in outputs for m in published
                 if m.stream == EXECUTION]
        if len(tasks) != 5:
            raise SystemExit(f"ARCHITECT planned {len(tasks)} tasks for 5 signals, expected 5")
        log(quiet, f"EXECUTOR: the 5 planned tasks x {reps} reps per path")
        exec_path = AgentPath(executor, EXECUTION, "task_id", reference, server_pid)
        exec_series, exec_left, _ = bench_agent(exec_path, tasks, reps, quiet, main_thread)
        provider = arch_path.reference
        return {
            "model": provider.model, "model_path": str(provider.model_path),
            "served": served,
            "llama_settings": {k: v for k, v in provider._llama.__getstate__().items()
                               if k in SHOWN_SETTINGS},
            "policy": architect.policy.source, "cpus": os.cpu_count(),
            "load_avg_before": round(load_before[0], 2),
            "load_avg_after": round(os.getloadavg()[0], 2),
            "measured": "Architect/Executor.prepare() on a temp data dir, the model "
                        + ("in a model server process" if served else "in the agent's process"),
            "reference": "Llama.create_chat_completion, not streamed, same request, in "
                         + ("the main thread" if main_thread else "a fresh thread per call"),
            "agents": {"architect": figures(arch_series, reps, 5, arch_left),
                       "executor": figures(exec_series, reps, 5, exec_left)},
            "target_overhead": TARGET_OVERHEAD,
        }
    finally:
        for agent in agents:
            agent.shutdown()
        if reference is not None:
            reference.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    short = os.environ.get("BENCH_SHORT", "") not in ("", "0")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS") or
                                                   (2 if short else 6)),
                    help="timed calls per prompt and path (5 prompts per agent)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON only")
    ap.add_argument("--in-process", action="store_true",
                    help="the agents load the model themselves instead of calling a model "
                         "server")
    ap.add_argument("--direct-in-main-thread", action="store_true",
                    help="run the reference calls on the main thread (diagnosis only)")
    args = ap.parse_args()
    report = run(args.reps, args.json, args.direct_in_main_thread, not args.in_process)
    ok = all(fig["target_met"] for fig in report["agents"].values())
    report["target_met"] = ok
    write_report(REPORT, report, table_rows(report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
