"""The standard benchmark of issue 6, end to end from one command; it reports and never asserts.

    .venv/bin/python -m benchmarks.harness --quick          # ~1 minute sanity run (10k)
    .venv/bin/python -m benchmarks.harness                  # 100k messages
    .venv/bin/python -m benchmarks.harness --messages 1000000 --workers 2 --mode stream

In order, in one invocation: floor.py alone (render + JSON µs/msg on one core); the ESP
simulator (SendGrid, optional --latency-ms) and the cost of one aiohttp POST to it; the service
(`swu-delivery serve`, durable SQLite outbox in a temp dir, `--workers N`); then the phases,
each but `stalled` waiting until the simulator has accepted every message it sent:

    main    N messages, SendBatch(500) or SendStream, from --client-procs processes
    paced   SendBatch(500) calls at half the delivered rate of `main`: call latency p50/p99
    naive   one unary Send per email (a baseline of the service used badly)
    stalled the simulator answers nothing, so the service's queue only grows: intake into the
            durable queue with no delivery, and the server's memory with them all queued
            (first a plug of claim_batch * inflight_batches messages fills the dispatcher)
    direct  baseline_direct.py, render + POST with no service, in 1 and 2 processes
            (the service is stopped first, and its database's states counted)

Figures and their meaning: benchmarks/README.md. The JSON result goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from benchmarks import bench_send
from benchmarks.bench_send import Child, percentile
from benchmarks.loadgen import LoadGenerator, LoadPlan, LoadResult
from benchmarks.procs import (
    CpuSample,
    rss_by_process,
    tree_cpu_seconds,
    tree_peak_rss_mb,
    tree_pss_mb,
)
from benchmarks.report import environment, print_report
from benchmarks.stack import (
    KEY_ENV,
    SIM_KEY,
    Server,
    ServiceSettings,
    SimulatorControl,
    start_server,
    start_simulator,
    write_config,
)
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2

HERE = Path(__file__).resolve().parent
BATCH = 500  # SendBatch size of the standard workload
# Defaults of the flags left unset, for --quick and for a full run.
QUICK = {
    "messages": 10_000,
    "stalled_messages": 10_000,
    "naive_messages": 1000,
    "direct_messages": 3000,
    "latency_calls": 20,
    "floor_seconds": 2.0,
    "post_samples": 2000,
}
FULL = {
    "messages": 100_000,
    "stalled_messages": 100_000,
    "naive_messages": 5000,
    "direct_messages": 20_000,
    "latency_calls": 100,
    "floor_seconds": 4.0,
    "post_samples": 5000,
}


@dataclass(kw_only=True)
class Rig:
    """What the phases share: the two subprocesses, the simulator's counter, message numbers."""

    args: argparse.Namespace
    server: Server
    simulator: Child
    control: SimulatorControl
    next_index: int = 0  # message numbers already used, so every phase sends fresh data

    def plan(self, shape: str, messages: int, **kw: Any) -> LoadPlan:
        plan = LoadPlan(
            shape=shape,
            target=self.server.target,
            bench_dir=Path(self.args.bench_dir),
            messages=messages,
            first_index=self.next_index,
            batch_size=BATCH,
            **kw,
        )
        self.next_index += messages
        return plan


# --- one phase -----------------------------------------------------------------------------------


def _send(gen: LoadGenerator, rig: Rig) -> tuple[CpuSample, list[LoadResult]]:
    """Start the load generator's processes together, once every one has connected.

    Returns the CPU sample taken just before the start, and what each process saw.
    """
    before = None
    with contextlib.suppress(threading.BrokenBarrierError):  # a process failed: its result says why
        gen.ready()
        before = CpuSample.take(rig.server.child.pid, rig.simulator.pid)
        gen.go()
    try:
        results = gen.results()
    finally:
        gen.stop()
    errors = [e for r in results for e in r.errors]
    if before is None or (errors and not any(r.accepted for r in results)):
        raise RuntimeError(f"the load generator failed: {(errors or ['no result'])[0]}")
    return before, results


def run_phase(rig: Rig, plan: LoadPlan, *, wait_for_delivery: bool = True) -> dict[str, Any]:
    """Send `plan`, wait until the simulator accepted all of it, and measure the whole span.

    With `wait_for_delivery=False` the span ends at the last answer.
    """
    base = rig.control.accepted()
    before, results = _send(LoadGenerator(plan), rig)
    accepted = sum(r.accepted for r in results)
    first = min(r.first_send for r in results)
    end = last_answer = max(r.last_answer for r in results)
    if wait_for_delivery:
        end = rig.control.wait_for(base + accepted, rig.server.child, rig.args.timeout)
    used = CpuSample.take(rig.server.child.pid, rig.simulator.pid) - before
    intake = last_answer - first
    span = end - first
    client_cpu = sum(r.cpu_seconds for r in results)
    other_cpu = max(0.0, used.machine - used.server - used.simulator - client_cpu)
    calls = sorted(x for r in results for x in r.latencies)
    per_msg = 1e6 / accepted if accepted else 0.0
    return {
        "messages": plan.messages,
        "accepted": accepted,
        "rejected": sum(r.rejected for r in results),
        "errors": [e for r in results for e in r.errors][:3],
        "intake_seconds": intake,
        "intake_msgs_per_s": accepted / intake if intake > 0 else None,
        "delivered_seconds": span if wait_for_delivery else None,
        "delivered_msgs_per_s": (accepted / span if span > 0 and wait_for_delivery else None),
        "calls": len(calls),
        "call_p50_ms": percentile(calls, 50) * 1e3 if calls else None,
        "call_p99_ms": percentile(calls, 99) * 1e3 if calls else None,
        "call_max_ms": calls[-1] * 1e3 if calls else None,
        "server_cpu_seconds": used.server,
        "server_cpu_us_per_msg": used.server * per_msg,
        "simulator_cpu_us_per_msg": used.simulator * per_msg,
        "client_cpu_us_per_msg": client_cpu * per_msg,
        "machine_busy_cores": used.machine / span if span > 0 else 0.0,
        "other_busy_cores": other_cpu / span if span > 0 else 0.0,
    }


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the phases ----------------------------------------------------------------------------------


def main_phase(rig: Rig) -> dict[str, Any]:
    a = rig.args
    _say(f"main: {a.messages:,} messages, {a.mode}, {a.client_procs} client process(es) ...")
    plan = rig.plan(
        "bulk",
        a.messages,
        stream=a.mode == "stream",
        concurrency=a.concurrency,
        procs=a.client_procs,
    )
    return run_phase(rig, plan)


def paced_phase(rig: Rig, delivered_rate: float) -> dict[str, Any]:
    """SendBatch(500) latency at half the sustained delivered rate of the main phase."""
    rate = delivered_rate / 2
    calls = rig.args.latency_calls
    _say(f"paced: {calls} SendBatch(500) calls at {rate:,.0f} msgs/s ...")
    result = run_phase(rig, rig.plan("paced", calls * BATCH, rate=rate, concurrency=4))
    return {"offered_msgs_per_s": rate, **result}


def naive_phase(rig: Rig) -> dict[str, Any]:
    a = rig.args
    _say(f"naive: {a.naive_messages:,} unary Send calls, {a.naive_concurrency} at a time ...")
    plan = rig.plan("naive", a.naive_messages, concurrency=a.naive_concurrency)
    return {"concurrency": a.naive_concurrency, **run_phase(rig, plan)}


def stalled_phase(rig: Rig) -> dict[str, Any]:
    """Intake alone, and memory with a full queue: the ESP answers nothing meanwhile.

    The dispatcher fills its in-flight batches, which then wait on the ESP, and claims no more;
    every other message stays queued. (Messages scheduled ahead with `send_at` would stay
    queued too, but each idle claim then scans all of them: see benchmarks/README.md.)
    """
    a = rig.args
    plug = a.claim_batch * a.inflight_batches
    _say(f"stalled: ESP answers nothing; a plug of {plug:,}, then {a.stalled_messages:,} ...")
    kw = {"concurrency": a.concurrency, "procs": a.client_procs, "stream": a.mode == "stream"}
    rig.control.stall()
    try:
        # The dispatcher claims and renders `plug` messages, then waits on the ESP; doing that
        # before the clock starts keeps their rendering out of the intake figure.
        run_phase(rig, rig.plan("bulk", plug, **kw), wait_for_delivery=False)
        wait_until_idle(rig.server.child.pid)
        result = run_phase(rig, rig.plan("bulk", a.stalled_messages, **kw), wait_for_delivery=False)
    finally:
        rig.control.unstall()
    result["server_peak_rss_mb"], _ = tree_peak_rss_mb(rig.server.child.pid)
    result["server_pss_mb"] = tree_pss_mb(rig.server.child.pid)
    return {"plug_messages": plug, **result}


def wait_until_idle(pid: int, timeout: float = 15.0) -> None:
    """Until the process tree uses under a fifth of a core over a quarter second (or timeout)."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = tree_cpu_seconds(pid)
        if now - before < 0.05:
            return
        before = now


def direct_baseline(rig: Rig, sim_url: str, procs: int) -> dict[str, Any]:
    """baseline_direct.py against the same simulator, checked against the simulator's count."""
    a = rig.args
    _say(f"direct: {a.direct_messages:,} messages, {procs} process(es) ...")
    argv = [sys.executable, str(HERE / "baseline_direct.py"), "--url", sim_url]
    argv += ["--messages", str(a.direct_messages), "--procs", str(procs)]
    argv += ["--bench-dir", str(a.bench_dir)]
    base, sim0 = rig.control.accepted(), tree_cpu_seconds(rig.simulator.pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"baseline_direct.py failed:\n{out.stderr[-2000:]}{out.stdout}")
    result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    sim_cpu = tree_cpu_seconds(rig.simulator.pid) - sim0
    result["simulator_accepted"] = rig.control.accepted() - base
    result["simulator_cpu_us_per_msg"] = sim_cpu / a.direct_messages * 1e6
    return result


# --- the run -------------------------------------------------------------------------------------


def measure_floor(
    bench_dir: Path, render_us: float, sim_url: str, post_samples: int
) -> dict[str, Any]:
    """floor.py's render + JSON µs/msg, plus the client CPU of one aiohttp POST to the simulator.

    floor.py ran before anything else started; the POST runs on uvloop, as the service's do.
    """
    body = bench_send.sample_body(bench_send.load_floor_module(bench_dir))
    coro = bench_send.measure_post_floor(sim_url, body, post_samples, 64)
    post = bench_send.run_like_service(coro)
    return {"render_us": render_us, "post_us": post, "plus_post_us": render_us + post}


def settings(args: argparse.Namespace) -> ServiceSettings:
    """The service's delivery settings, from the flags."""
    return ServiceSettings(
        claim_batch=args.claim_batch,
        max_inflight_batches=args.inflight_batches,
        esp_max_concurrency=args.esp_concurrency,
        idle_poll=args.idle_poll,
        log_level=args.log_level,
    )


def run_config(args: argparse.Namespace, server: Server, workdir: Path) -> dict[str, Any]:
    """The settings of this run, as the JSON result records them."""
    return {
        **asdict(settings(args)),
        "workers_requested": args.workers,
        "workers": server.workers,
        "workers_note": server.workers_note,
        "rpc": "SendStream" if args.mode == "stream" else "SendBatch",
        "batch_size": BATCH,
        "client_procs": args.client_procs,
        "concurrency_per_client": args.concurrency,
        "simulator_latency_ms": args.latency_ms,
        "workdir": str(workdir),
    }


def ledger_states(data_dir: Path) -> dict[str, int]:
    """Messages per state in every swu.db under the data dir (read after the service stopped)."""
    counts: dict[str, int] = {}
    for db in data_dir.rglob("swu.db"):
        with bench_send.read_only(db) as conn:
            for state, n in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
                name = delivery_pb2.MessageState.Name(state).removeprefix("MESSAGE_STATE_")
                counts[name] = counts.get(name, 0) + n
    return counts


def run_phases(rig: Rig, result: dict[str, Any]) -> None:
    """main, then paced, naive and stalled against the running service; figures into `result`."""
    args, pid = rig.args, rig.server.child.pid
    main = result["main"] = main_phase(rig)
    result["server_peak_rss_mb"], result["server_processes"] = tree_peak_rss_mb(pid)
    result["server_pss_mb"] = tree_pss_mb(pid)
    floor = result["floor"]
    result["ratio_to_floor"] = main["server_cpu_us_per_msg"] / floor["render_us"]
    result["ratio_to_floor_plus_post"] = main["server_cpu_us_per_msg"] / floor["plus_post_us"]
    if args.latency_calls > 0 and main["delivered_msgs_per_s"]:
        result["paced"] = paced_phase(rig, main["delivered_msgs_per_s"])
    if args.naive_messages > 0:
        result["naive"] = naive_phase(rig)
    if args.stalled_messages > 0:
        result["stalled"] = stalled_phase(rig)
    result["server_rss_by_process"] = rss_by_process(pid)


def stop_server(server: Server) -> dict[str, Any]:
    """SIGTERM (then SIGKILL after 15 s); how long it took and whether it had to be killed."""
    t0 = time.monotonic()
    server.child.stop()
    killed = server.child.proc.returncode == -signal.SIGKILL
    return {"seconds": time.monotonic() - t0, "killed": killed}


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    """The whole benchmark; children and the temp dir are cleaned up by `stack`."""
    bench_dir = Path(args.bench_dir)
    result: dict[str, Any] = {"environment": environment(), "messages": args.messages}
    _say(f"floor.py for {args.floor_seconds:g}s, alone ...")
    render_us = bench_send.measure_render_floor(bench_dir, args.floor_seconds)

    workdir = Path(tempfile.mkdtemp(prefix="swu-harness-"))
    if not args.keep:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    env = {**os.environ, KEY_ENV: SIM_KEY, "PYTHONUNBUFFERED": "1"}
    simulator, sim_url = start_simulator(workdir, env, args.latency_ms)
    stack.callback(simulator.stop)
    result["floor"] = measure_floor(bench_dir, render_us, sim_url, args.post_samples)

    config = write_config(workdir / "swu.toml", workdir / "data", sim_url, settings(args))
    server = start_server(config, workdir, env, args.workers)
    stack.callback(server.child.stop)
    control = SimulatorControl(sim_url)
    stack.callback(control.close)
    result["config"] = run_config(args, server, workdir)
    _say(
        f"service {server.target} (pid {server.child.pid}), simulator {sim_url} "
        f"(pid {simulator.pid}); py-spy can attach to either"
    )
    asyncio.run(bench_send.create_template(server.target, bench_dir))
    rig = Rig(args=args, server=server, simulator=simulator, control=control)
    run_phases(rig, result)

    result["server_stop"] = stop_server(server)  # the direct baselines run alone
    result["ledger_states"] = ledger_states(workdir / "data")
    if args.direct_messages > 0:
        result["direct"] = [direct_baseline(rig, sim_url, procs) for procs in (1, 2)]
    return result


def default_out(args: argparse.Namespace) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    size = "quick" if args.quick else f"{args.messages}"
    return HERE / "results" / f"{stamp}-{args.mode}-w{args.workers}-{size}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description=doc.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a sanity run")
    p.add_argument(
        "--messages",
        type=int,
        help=f"main phase (default {FULL['messages']:,}; --quick {QUICK['messages']:,})",
    )
    p.add_argument("--mode", choices=["batch", "stream"], default="batch")
    p.add_argument("--workers", type=int, default=1, help="serve --workers N (when N > 1)")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--concurrency", type=int, default=4, help="calls in flight per client process")
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency per request")
    p.add_argument("--latency-calls", type=int, help="paced SendBatch calls (0 skips the phase)")
    p.add_argument("--naive-messages", type=int, help="unary Send baseline size (0 skips it)")
    p.add_argument("--naive-concurrency", type=int, default=1, help="sequential Send loops")
    p.add_argument("--stalled-messages", type=int, help="intake-alone phase size (0 skips it)")
    p.add_argument("--direct-messages", type=int, help="direct asyncio baseline size (0 skips)")
    p.add_argument("--floor-seconds", type=float)
    p.add_argument("--post-samples", type=int)
    p.add_argument("--claim-batch", type=int, default=500)
    p.add_argument("--inflight-batches", type=int, default=8)
    p.add_argument("--esp-concurrency", type=int, default=64, help="ESP account max_concurrency")
    p.add_argument("--idle-poll", type=float, default=0.05)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--bench-dir", default=os.environ.get("SWU_BENCH_DIR", "/work/shared/bench"))
    p.add_argument("--timeout", type=float, help="seconds to wait for one phase's delivery")
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/…)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.messages < 1 or args.workers < 1 or args.client_procs < 1 or args.concurrency < 1:
        p.error("--messages, --workers, --client-procs and --concurrency must be at least 1")
    args.bench_dir = str(Path(args.bench_dir).resolve())
    args.timeout = args.timeout or 120 + args.messages / 500
    args.out = args.out or default_out(args)
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every child is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    with contextlib.ExitStack() as stack:
        try:
            result = run(args, stack)
        except KeyboardInterrupt:
            _say("interrupted; stopping the service and the simulator")
            return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print_report(result)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
