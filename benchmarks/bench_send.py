"""End-to-end benchmark of swu-delivery on the standard workload; run by hand, never by the tests.

Starts the ESP simulator and the service (`swu-delivery serve`) as subprocesses on free loopback
ports with a fresh data directory, creates the `order_shipped` template through the gRPC API,
sends N messages built from `make_data(i)` of the shared bench directory (SendBatch of 1000, or
SendStream), waits until every message is SENT, and prints what it cost:

    accept     msgs/s of the accept phase, and the latency of each SendBatch call
    delivery   msgs/s from the first send to the last SENT; accept→SENT latency per message
    cpu        the service's CPU (user + sys, its worker processes included) per message, and
               its ratio to the floor that `floor.py` measures in the same run
    memory     the service's peak RSS (VmHWM)

    .venv/bin/python benchmarks/bench_send.py --messages 10000
    .venv/bin/python benchmarks/bench_send.py --messages 10000 --stream --json

See benchmarks/README.md for what each figure means and the figures measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any

import aiohttp
import orjson

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.client import DEFAULT_CHANNEL_OPTIONS, AsyncClient, email

TEMPLATE_ID = "order_shipped"
SENDER = "orders@shop.example.com"
KEY_ENV = "SWU_BENCH_SENDGRID_KEY"
SIM_KEY = "sim-key"  # the simulator's default accepted key
SENT = delivery_pb2.MESSAGE_STATE_SENT
FAILED = delivery_pb2.MESSAGE_STATE_FAILED
EV_SENT = delivery_pb2.EVENT_TYPE_SENT
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_SECONDS = 0.1  # delivery times come from the db, so polling can be lazy
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FLOOR_LINE = re.compile(r"floor: ([0-9.]+) us CPU/msg")
# One connection per caller, as separate client services would have (grpc shares by default).
CALLER_CHANNEL_OPTIONS = (*DEFAULT_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


# --- processes --------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, found through the parent ids in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents.setdefault(int(_proc_stat(int(entry.name))[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid`, its reaped children and its live descendants."""
    total = 0
    for p in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError):
            fields = _proc_stat(p)
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid`: its peak resident set, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Child:
    """A subprocess that announces its address on one stdout line; stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.pid = self.proc.pid

    def wait_for_line(self, prefix: str) -> str:
        """The rest of the first stdout line starting with `prefix`; later output is drained."""
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        found: list[str] = []

        def read() -> None:
            for line in stdout:
                if not found and line.startswith(prefix):
                    found.append(line[len(prefix) :].strip())

        threading.Thread(target=read, name=f"{self.name}-stdout", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        if not found:
            raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
        return found[0]

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:g}s; killed", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def start_simulator(workdir: Path, env: dict[str, str]) -> tuple[Child, str]:
    """The ESP simulator on a free port, recording no bodies so that it stays small."""
    argv = [sys.executable, "-m", "swu_delivery", "esp-simulator", "--port", "0"]
    argv += ["--no-record-bodies", "--max-records", "1000"]
    child = Child("esp-simulator", argv, workdir / "simulator.log", env)
    return child, child.wait_for_line("esp-simulator listening on ")


def start_service(config: Path, workdir: Path, env: dict[str, str]) -> tuple[Child, str]:
    """`swu-delivery serve` with `config`; returns it and its HOST:PORT."""
    argv = [sys.executable, "-m", "swu_delivery", "serve", "--config", str(config)]
    child = Child("swu-delivery", argv, workdir / "service.log", env)
    return child, child.wait_for_line("swu-delivery listening on ")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The service configuration the benchmark runs with."""

    claim_batch: int
    max_inflight_batches: int
    esp_max_concurrency: int
    idle_poll: float
    log_level: str


def write_config(path: Path, data_dir: Path, sim_url: str, s: Settings) -> Path:
    path.write_text(
        f"""\
listen = "127.0.0.1:0"
data_dir = "{data_dir}"
grace_seconds = 10
log_level = "{s.log_level}"

[delivery]
default_esp = "sg"
max_attempts = 5
retry_base = 0.5
retry_max = 5.0
claim_batch = {s.claim_batch}
max_inflight_batches = {s.max_inflight_batches}
idle_poll = {s.idle_poll}

[[esp]]
name = "sg"
kind = "sendgrid"
base_url = "{sim_url}"
api_key_env = "{KEY_ENV}"
sender = "{SENDER}"
sender_name = "Acme & Co"
timeout = 30
max_concurrency = {s.esp_max_concurrency}
"""
    )
    return path


# --- the workload -----------------------------------------------------------------------------


def load_floor_module(bench_dir: Path) -> ModuleType:
    """floor.py of the bench directory, imported by path (it is not a package)."""
    spec = importlib.util.spec_from_file_location("swu_bench_floor", bench_dir / "floor.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {bench_dir / 'floor.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def template_contents(bench_dir: Path) -> dict[str, dict[str, str]]:
    return {
        "en": {
            "subject": (bench_dir / "order_shipped.subject.txt").read_text().strip(),
            "html": (bench_dir / "order_shipped.html").read_text(),
            "text": (bench_dir / "order_shipped.text.txt").read_text(),
        }
    }


def build_emails(floor: ModuleType, n: int) -> list[delivery_pb2.Email]:
    """The N messages, built before the clock starts so the client's own work is not timed."""
    out = []
    for i in range(n):
        data = floor.make_data(i)
        out.append(email(TEMPLATE_ID, data["user"]["email"], data))
    return out


def measure_render_floor(bench_dir: Path, seconds: float) -> float:
    """floor.py's µs of CPU per message (render + JSON body), run alone as a subprocess."""
    argv = [sys.executable, str(bench_dir / "floor.py"), "--seconds", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout
    match = FLOOR_LINE.search(out)
    if match is None:
        raise RuntimeError(f"unexpected floor.py output: {out!r}")
    return float(match.group(1))


async def measure_post_floor(url: str, body: bytes, samples: int, concurrency: int) -> float:
    """µs of this process's CPU per aiohttp POST of `body` to the simulator's SendGrid endpoint."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {SIM_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def post_many(count: int) -> None:
            for _ in range(count):
                async with session.post(url + "/v3/mail/send", data=body) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        raise RuntimeError(f"simulator answered {resp.status}")

        await asyncio.gather(*(post_many(10) for _ in range(concurrency)))  # warm the pool
        per_task = max(1, samples // concurrency)
        cpu0 = time.process_time()
        await asyncio.gather(*(post_many(per_task) for _ in range(concurrency)))
        return (time.process_time() - cpu0) / (per_task * concurrency) * 1e6


def run_like_service(coro: Coroutine[Any, Any, float]) -> float:
    """Run `coro` on uvloop when it is installed, as the service does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def sample_body(floor: ModuleType) -> bytes:
    """One SendGrid v3 body for message 0, built as floor.py builds it."""
    s, h, t = floor.templates()
    ctx = floor.make_data(0)
    return orjson.dumps(
        {
            "personalizations": [{"to": [{"email": ctx["user"]["email"]}]}],
            "from": {"email": SENDER, "name": "Acme & Co"},
            "subject": s.render(ctx),
            "content": [
                {"type": "text/plain", "value": t.render(ctx)},
                {"type": "text/html", "value": h.render(ctx)},
            ],
        }
    )


@dataclass(kw_only=True)
class AcceptResult:
    started: float = 0.0  # time.time() of the first call
    seconds: float = 0.0
    call_latencies: list[float] = field(default_factory=list)  # SendBatch calls only
    rejected: list[str] = field(default_factory=list)


Batch = tuple[int, list[delivery_pb2.Email]]  # (its position in the whole send, its emails)


def deal_batches(emails: list[delivery_pb2.Email], callers: int, size: int) -> list[list[Batch]]:
    """Whole batches dealt round-robin to `callers`, each with its global position."""
    batches = [(k, emails[i : i + size]) for k, i in enumerate(range(0, len(emails), size))]
    return [batches[c::callers] for c in range(min(callers, len(batches)))]


class Pacer:
    """Holds batch k until `k * size / rate` seconds after the start; rate 0 never waits."""

    def __init__(self, rate: float, size: int) -> None:
        self.interval = size / rate if rate > 0 else 0.0
        self.start = time.perf_counter()

    async def wait(self, k: int) -> None:
        delay = self.start + k * self.interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def _batch_caller(
    target: str, batches: list[Batch], pacer: Pacer, result: AcceptResult
) -> None:
    async with AsyncClient(target, channel_options=CALLER_CHANNEL_OPTIONS) as client:
        for k, batch in batches:
            await pacer.wait(k)
            t0 = time.perf_counter()
            results = await client.send_batch(batch)
            result.call_latencies.append(time.perf_counter() - t0)
            result.rejected.extend(r.error.message for r in results if not r.message_id)


async def _stream_caller(
    target: str, batches: list[Batch], pacer: Pacer, window: int, result: AcceptResult
) -> None:
    async def paced() -> AsyncIterator[delivery_pb2.Email]:
        for k, batch in batches:
            await pacer.wait(k)
            for item in batch:
                yield item

    size = len(batches[0][1])
    async with AsyncClient(target, channel_options=CALLER_CHANNEL_OPTIONS) as client:
        report = await client.send_bulk(paced(), batch_size=size, concurrency=window, stream=True)
        result.rejected.extend(r.message for r in report.rejected)


async def create_template(target: str, bench_dir: Path) -> None:
    async with AsyncClient(target) as client:
        await client.create_template(TEMPLATE_ID, template_contents(bench_dir))


async def accept_all(
    target: str, emails: list[delivery_pb2.Email], args: argparse.Namespace
) -> AcceptResult:
    """Send every message with `args.concurrency` concurrent callers; time the accept phase."""
    result = AcceptResult()
    shares = deal_batches(emails, args.concurrency, args.batch_size)
    pacer = Pacer(args.rate, args.batch_size)
    if args.stream:
        window = args.stream_window
        calls = [_stream_caller(target, s, pacer, window, result) for s in shares]
    else:
        calls = [_batch_caller(target, s, pacer, result) for s in shares]
    result.started = time.time()
    pacer.start = t0 = time.perf_counter()
    await asyncio.gather(*calls)
    result.seconds = time.perf_counter() - t0
    return result


# --- delivery, from the service's database ------------------------------------------------------


@contextlib.contextmanager
def read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def wait_until_delivered(db_path: Path, service: Child, timeout: float) -> None:
    """Poll until no message is queued (one probe of the partial index, not a count)."""
    deadline = time.monotonic() + timeout
    with read_only(db_path) as conn:
        while conn.execute("SELECT 1 FROM messages WHERE state = 1 LIMIT 1").fetchone():
            if service.proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"messages still queued after {timeout:g}s")
            time.sleep(POLL_SECONDS)


@dataclass(frozen=True, kw_only=True)
class Delivery:
    sent: int
    failed: int
    first_sent: float  # time.time() of the first SENT event
    last_sent: float
    latencies: list[float]  # seconds from created_at (accept) to the SENT event, per message
    failure_reasons: list[str]


def delivery_figures(db_path: Path) -> Delivery:
    with read_only(db_path) as conn:
        counts = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state"))
        latencies = [
            row[0]
            for row in conn.execute(
                "SELECT e.time - m.created_at FROM events e JOIN messages m ON m.id = e.message_id"
                " WHERE e.type = ?",
                (EV_SENT,),
            )
        ]
        first, last = conn.execute(
            "SELECT min(time), max(time) FROM events WHERE type = ?", (EV_SENT,)
        ).fetchone()
        reasons = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT reason FROM messages WHERE state = ? LIMIT 5", (FAILED,)
            )
        ]
    return Delivery(
        sent=counts.get(SENT, 0),
        failed=counts.get(FAILED, 0),
        first_sent=first or 0.0,
        last_sent=last or 0.0,
        latencies=sorted(latencies),
        failure_reasons=reasons,
    )


# --- the run ------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..100) of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(q / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    bench_dir = Path(args.bench_dir).resolve()
    floor = load_floor_module(bench_dir)
    summary: dict[str, Any] = {"messages": args.messages, "bench_dir": str(bench_dir)}

    render_floor = 0.0
    if args.floor_seconds > 0:
        print(f"measuring floor.py for {args.floor_seconds:g}s ...", flush=True)
        render_floor = measure_render_floor(bench_dir, args.floor_seconds)

    workdir = Path(tempfile.mkdtemp(prefix="swu-bench-"))
    if not args.keep:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    env = {**os.environ, KEY_ENV: SIM_KEY, "PYTHONUNBUFFERED": "1"}
    simulator, sim_url = start_simulator(workdir, env)
    stack.callback(simulator.stop)

    post_floor = 0.0
    if args.post_samples > 0:
        body = sample_body(floor)
        post_floor = run_like_service(measure_post_floor(sim_url, body, args.post_samples, 64))

    settings = Settings(
        claim_batch=args.claim_batch,
        max_inflight_batches=args.inflight_batches,
        esp_max_concurrency=args.esp_concurrency,
        idle_poll=args.idle_poll,
        log_level=args.log_level,
    )
    data_dir = workdir / "data"
    config = write_config(workdir / "swu.toml", data_dir, sim_url, settings)
    service, target = start_service(config, workdir, env)
    stack.callback(service.stop)
    summary["config"] = {
        **asdict(settings),
        "batch_size": args.batch_size,
        "callers": args.concurrency,
        "rpc": "SendStream" if args.stream else "SendBatch",
        "offered_rate": args.rate or "unlimited",
        **({"stream_window": args.stream_window} if args.stream else {}),
        "service_pid": service.pid,
        "simulator_pid": simulator.pid,
        "workdir": str(workdir),
    }
    print(f"service {target} (pid {service.pid}), simulator {sim_url} (pid {simulator.pid})")
    print(f"config: {orjson.dumps(summary['config']).decode()}", flush=True)

    asyncio.run(create_template(target, bench_dir))
    emails = build_emails(floor, args.messages)

    svc_cpu0, sim_cpu0, me_cpu0 = (
        tree_cpu_seconds(service.pid),
        tree_cpu_seconds(simulator.pid),
        time.process_time(),
    )
    accepted = asyncio.run(accept_all(target, emails, args))
    if accepted.rejected:
        raise RuntimeError(f"{len(accepted.rejected)} rejected, e.g. {accepted.rejected[0]}")
    accept_cpu = tree_cpu_seconds(service.pid) - svc_cpu0
    me_accept_cpu = time.process_time() - me_cpu0
    wait_until_delivered(data_dir / "swu.db", service, args.timeout)
    svc_cpu = tree_cpu_seconds(service.pid) - svc_cpu0
    sim_cpu = tree_cpu_seconds(simulator.pid) - sim_cpu0
    me_cpu = time.process_time() - me_cpu0
    rss = peak_rss_mb(service.pid)
    delivered = delivery_figures(data_dir / "swu.db")

    n = args.messages
    e2e = delivered.last_sent - accepted.started
    svc_us = svc_cpu / n * 1e6
    calls = sorted(accepted.call_latencies)
    summary.update(
        accept_seconds=accepted.seconds,
        accept_msgs_per_s=n / accepted.seconds,
        accept_call_p50_ms=percentile(calls, 50) * 1e3 if calls else None,
        accept_call_p99_ms=percentile(calls, 99) * 1e3 if calls else None,
        accept_call_max_ms=calls[-1] * 1e3 if calls else None,
        service_cpu_accept_us_per_msg=accept_cpu / n * 1e6,
        e2e_seconds=e2e,
        e2e_msgs_per_s=n / e2e if e2e > 0 else 0.0,
        delivery_msgs_per_s=(
            delivered.sent / (delivered.last_sent - delivered.first_sent)
            if delivered.last_sent > delivered.first_sent
            else 0.0
        ),
        sent=delivered.sent,
        failed=delivered.failed,
        failure_reasons=delivered.failure_reasons,
        latency_p50_ms=percentile(delivered.latencies, 50) * 1e3,
        latency_p99_ms=percentile(delivered.latencies, 99) * 1e3,
        latency_max_ms=(delivered.latencies[-1] * 1e3) if delivered.latencies else 0.0,
        service_cpu_seconds=svc_cpu,
        service_cpu_us_per_msg=svc_us,
        service_peak_rss_mb=rss,
        simulator_cpu_seconds=sim_cpu,
        simulator_cpu_us_per_msg=sim_cpu / n * 1e6,
        client_cpu_seconds=me_cpu,
        client_cpu_accept_seconds=me_accept_cpu,
        floor_render_us_per_msg=render_floor or None,
        floor_post_us_per_msg=post_floor or None,
        ratio_to_render_floor=svc_us / render_floor if render_floor else None,
        ratio_to_floor_plus_post=(
            svc_us / (render_floor + post_floor) if render_floor and post_floor else None
        ),
        mean_busy_cores=(svc_cpu + sim_cpu + me_cpu) / e2e if e2e > 0 else 0.0,
    )
    if delivered.sent != n:
        print(f"WARNING: {delivered.sent} of {n} SENT; failures: {delivered.failure_reasons}")
    return summary


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def print_summary(s: dict[str, Any]) -> None:
    n = s["messages"]
    rows = [
        ("messages", f"{n:,} ({s['sent']:,} SENT, {s['failed']:,} FAILED)"),
        (
            "accept",
            f"{s['accept_msgs_per_s']:,.0f} msgs/s ({s['accept_seconds']:.2f} s); "
            f"{s['config']['rpc']} call p50 {_fmt(s['accept_call_p50_ms'], '.1f', ' ms')}, "
            f"p99 {_fmt(s['accept_call_p99_ms'], '.1f', ' ms')}, "
            f"max {_fmt(s['accept_call_max_ms'], '.1f', ' ms')}",
        ),
        (
            "end-to-end",
            f"{s['e2e_msgs_per_s']:,.0f} msgs/s ({s['e2e_seconds']:.2f} s from the first send "
            f"to the last SENT); first→last SENT {s['delivery_msgs_per_s']:,.0f} msgs/s",
        ),
        (
            "accept→SENT",
            f"p50 {s['latency_p50_ms']:,.0f} ms, p99 {s['latency_p99_ms']:,.0f} ms, "
            f"max {s['latency_max_ms']:,.0f} ms",
        ),
        (
            "service CPU",
            f"{s['service_cpu_us_per_msg']:.0f} µs/msg ({s['service_cpu_seconds']:.2f} s; "
            f"accept phase alone {s['service_cpu_accept_us_per_msg']:.0f} µs/msg)",
        ),
        (
            "floor",
            f"render+JSON {_fmt(s['floor_render_us_per_msg'], '.0f', ' µs')}, "
            f"aiohttp POST {_fmt(s['floor_post_us_per_msg'], '.0f', ' µs')}",
        ),
        (
            "ratio",
            f"{_fmt(s['ratio_to_render_floor'], '.2f', '×')} the render floor, "
            f"{_fmt(s['ratio_to_floor_plus_post'], '.2f', '×')} floor + POST (target ≤ 1.3×)",
        ),
        ("service RSS", f"peak {s['service_peak_rss_mb']:.0f} MiB (VmHWM)"),
        (
            "simulator CPU",
            f"{s['simulator_cpu_us_per_msg']:.0f} µs/msg ({s['simulator_cpu_seconds']:.2f} s)",
        ),
        (
            "client CPU",
            f"{s['client_cpu_seconds']:.2f} s in this process ({s['client_cpu_accept_seconds']:.2f}"
            " s of it sending, the rest polling the db); "
            f"mean busy cores {s['mean_busy_cores']:.2f}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000, help="emails per SendBatch / chunk")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent callers (channels)")
    p.add_argument("--stream", action="store_true", help="SendStream instead of SendBatch")
    p.add_argument("--stream-window", type=int, default=2, help="chunks in flight per stream")
    p.add_argument("--rate", type=float, default=0.0, help="offered msgs/s; 0: as fast as possible")
    p.add_argument(
        "--bench-dir",
        default=os.environ.get("SWU_BENCH_DIR", "/work/shared/bench"),
        help="floor.py and order_shipped.* (env SWU_BENCH_DIR)",
    )
    p.add_argument("--claim-batch", type=int, default=500)
    p.add_argument("--inflight-batches", type=int, default=8)
    p.add_argument("--esp-concurrency", type=int, default=64, help="ESP account max_concurrency")
    p.add_argument("--idle-poll", type=float, default=0.05)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--floor-seconds", type=float, default=4.0, help="0 skips floor.py")
    p.add_argument("--post-samples", type=int, default=5000, help="0 skips the POST floor")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for delivery")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs)")
    p.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = p.parse_args(argv)
    if not 1 <= args.batch_size <= 1000:
        p.error("--batch-size: 1..1000")
    if args.messages < 1 or args.concurrency < 1:
        p.error("--messages and --concurrency must be at least 1")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so every child is stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    with contextlib.ExitStack() as stack:
        try:
            summary = run(args, stack)
        except KeyboardInterrupt:
            print("interrupted; stopping the service and the simulator", file=sys.stderr)
            return 130
    print_summary(summary)
    if args.json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0 if summary["sent"] == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
