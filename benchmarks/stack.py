"""The system under test: the ESP simulator and the service, each started as a subprocess."""

from __future__ import annotations

import http.client
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks.bench_send import Child

KEY_ENV = "SWU_BENCH_SENDGRID_KEY"
SIM_KEY = "sim-key"  # the simulator's default accepted key
SENDER = "orders@shop.example.com"
PROVIDER = "sendgrid"
STALL_MS = 3_000_000.0  # longer than any stalled phase, shorter than the ESP timeout


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """The delivery settings the service runs with (flags of the harness)."""

    claim_batch: int
    max_inflight_batches: int
    esp_max_concurrency: int
    idle_poll: float
    log_level: str


@dataclass(frozen=True, kw_only=True)
class Server:
    """The running service: its process, its gRPC target and how many workers it really runs."""

    child: Child
    target: str
    workers: int
    workers_note: str  # why fewer workers run than were asked for; empty when none


def start_simulator(workdir: Path, env: dict[str, str], latency_ms: float) -> tuple[Child, str]:
    """The ESP simulator on a free port, keeping few records and no bodies so it stays small."""
    argv = [sys.executable, "-m", "swu_delivery", "esp-simulator", "--port", "0"]
    argv += ["--no-record-bodies", "--max-records", "1000", "--latency-ms", str(latency_ms)]
    child = Child("esp-simulator", argv, workdir / "simulator.log", env)
    return child, child.wait_for_line("esp-simulator listening on ")


def write_config(path: Path, data_dir: Path, sim_url: str, s: ServiceSettings) -> Path:
    """One SendGrid account at the simulator; no webhook server (it would need a fixed port).

    The ESP timeout is long because the stalled phase holds ESP calls open on purpose; the grace
    period is short because stopping the service then cuts those calls.
    """
    path.write_text(
        f"""\
listen = "127.0.0.1:0"
data_dir = "{data_dir}"
grace_seconds = 3
log_level = "{s.log_level}"

[webhooks]
listen = ""

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
timeout = 3600
max_concurrency = {s.esp_max_concurrency}
"""
    )
    return path


def free_port() -> int:
    """A loopback port free right now; workers sharing one port cannot each pick port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(config: Path, workdir: Path, env: dict[str, str], workers: int) -> tuple[Child, str]:
    argv = [sys.executable, "-m", "swu_delivery", "serve", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}"]
    child = Child("swu-delivery", argv, workdir / f"service-w{workers}.log", env)
    return child, child.wait_for_line("swu-delivery listening on ")


def start_server(config: Path, workdir: Path, env: dict[str, str], workers: int) -> Server:
    """`swu-delivery serve`, with `--workers N` when N > 1.

    A service that refuses `--workers` (it exits before listening and names the flag) is
    started again with one process, and the note says so; any other failure is raised.
    """
    try:
        child, target = _launch(config, workdir, env, workers)
    except RuntimeError as exc:
        if workers == 1 or "--workers" not in str(exc):
            raise
        reason = str(exc).strip().splitlines()[-1]
        note = f"asked for {workers} workers; the service refused ({reason}), so 1 ran"
        print(f"NOTE: {note}", file=sys.stderr, flush=True)
        child, target = _launch(config, workdir, env, 1)
        return Server(child=child, target=target, workers=1, workers_note=note)
    return Server(child=child, target=target, workers=workers, workers_note="")


class SimulatorControl:
    """The simulator's admin API: its exact count of accepted recipients, and its latency."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        self._conn.request(method, path, body=data)
        response = self._conn.getresponse()
        raw = response.read()
        if response.status >= 300:
            raise RuntimeError(f"simulator {method} {path}: {response.status} {raw[:200]!r}")
        return orjson.loads(raw)

    def accepted(self) -> int:
        stats = self._call("GET", "/_sim/stats")
        return int(stats["providers"].get(PROVIDER, {}).get("accepted_recipients", 0))

    def stall(self) -> None:
        """Answer nothing for STALL_MS: the service's ESP calls hang, so its queue only grows."""
        self._call("PUT", "/_sim/faults", {"latency_ms": STALL_MS})

    def unstall(self) -> None:
        """Back to the start-up settings (for new requests; stalled ones keep waiting)."""
        self._call("PUT", "/_sim/faults", {})

    def wait_for(
        self, count: int, server: Child | None, timeout: float, poll: float = 0.05
    ) -> float:
        """time.monotonic() at the first poll that sees `count` accepted; raises on timeout."""
        deadline = time.monotonic() + timeout
        while (seen := self.accepted()) < count:
            if server is not None and server.proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulator saw {seen} of {count} after {timeout:g}s")
            time.sleep(poll)
        return time.monotonic()

    def close(self) -> None:
        self._conn.close()
