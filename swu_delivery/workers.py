"""Supervises N forked worker processes that serve on shared ports (`serve --workers N`).

The parent forks before any gRPC object exists (grpc's examples/python/multiprocessing): each
child builds its own `Service` and binds the same ports with SO_REUSEPORT, so the kernel spreads
new connections across the workers. Before forking, the parent does what must happen once:

- it turns every port 0 into a concrete free port and keeps a bound (never listening) socket on
  it with SO_REUSEPORT until it exits, so no other program takes the port meanwhile and the
  kernel never routes a connection to the reservation;
- it runs the embedded ESP simulator (`[simulator]`) as its own subprocess and gives its URL to
  the workers, which then do not start one each;
- it re-queues the claims a previous run left behind; a worker must not, as its siblings' claims
  look the same.

Then it forwards SIGTERM/SIGINT to the workers (each drains as with one process), restarts a
worker that died unexpectedly (at most `MAX_RESTARTS` within `RESTART_WINDOW` seconds, then it
stops the others), and exits non-zero if any worker ended abnormally. A worker dies with its
supervisor (PR_SET_PDEATHSIG), so a kill -9 of the supervisor takes the whole service down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from swu_delivery.config import Config, ConfigError

__all__ = ["METRICS_DIR_ENV", "prepare_metrics_dir", "supervise"]

log = logging.getLogger("swu_delivery.workers")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
SIMULATOR_START_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


def prepare_metrics_dir(data_dir: str | Path) -> None:
    """Point prometheus-client's multiprocess mode at a fresh `<data_dir>/prometheus-multiproc`.

    Call before anything imports prometheus_client (it picks its value store on import).
    """
    path = Path(data_dir) / "prometheus-multiproc"
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[METRICS_DIR_ENV] = str(path)


def _reserve(listen: str, reservations: list[socket.socket]) -> str:
    """`listen` with port 0 replaced by a free port held by a SO_REUSEPORT socket."""
    host, _, port = listen.rpartition(":")
    if port != "0":
        return listen
    bare = host.strip("[]") or "0.0.0.0"
    family = socket.getaddrinfo(bare, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, 0))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {listen} ({exc})") from None
    reservations.append(sock)
    return f"{host}:{sock.getsockname()[1]}"


def _concrete_ports(config: Config, reservations: list[socket.socket]) -> Config:
    config = replace(config, listen=_reserve(config.listen, reservations))
    if config.webhooks.listen:
        webhooks = replace(config.webhooks, listen=_reserve(config.webhooks.listen, reservations))
        config = replace(config, webhooks=webhooks)
    if config.metrics.listen:
        metrics = replace(config.metrics, listen=_reserve(config.metrics.listen, reservations))
        config = replace(config, metrics=metrics)
    return config


def _die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)


def _start_simulator(config: Config) -> tuple[Config, subprocess.Popen[str]]:
    from swu_delivery.server import with_simulator_url

    sim = config.simulator
    command = [sys.executable, "-m", "swu_delivery.simulator", "--host", sim.host]
    command += ["--port", str(sim.port), "--max-records", "1000"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches the workers, not it: they drain
        preexec_fn=lambda: _die_with_parent(signal.SIGTERM),  # the parent has no threads yet
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], SIMULATOR_START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    prefix = "esp-simulator listening on "
    if not line.startswith(prefix):
        process.kill()
        process.wait()
        raise ConfigError(f"simulator: did not start ({line.strip() or 'no output'})")
    url = line[len(prefix) :].strip()
    log.info("embedded ESP simulator at %s (pid %d)", url, process.pid)
    config = with_simulator_url(config, url)
    return replace(config, simulator=replace(sim, enabled=False)), process


async def _release_claims(config: Config) -> int:
    from swu_delivery.db import Database
    from swu_delivery.outbox import Outbox

    db = Database(Path(config.data_dir) / "swu.db")
    await db.open()
    try:
        return await Outbox(db, idempotency_ttl=config.idempotency_ttl).release()
    finally:
        await db.close()


def _run_worker(config: Config, index: int, workers: int) -> int:
    """The child's life: serve until SIGTERM/SIGINT; returns its exit status."""
    from swu_delivery.logs import configure_logging
    from swu_delivery.server import serve

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent(signal.SIGTERM)
    configure_logging(config.log_level, config.log_format, worker=index)
    try:
        import uvloop

        uvloop.run(serve(config, workers=workers))
    except ImportError:
        asyncio.run(serve(config, workers=workers))
    except ConfigError as exc:
        print(f"swu-delivery: error: worker {index}: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        log.exception("worker %d failed", index)
        return 1
    return 0


def _fork(config: Config, index: int, workers: int) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = _run_worker(config, index, workers)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    log.info("worker %d started (pid %d)", index, pid)
    return pid


def _mark_dead(pid: int) -> None:
    if not os.environ.get(METRICS_DIR_ENV):
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _Supervisor:
    """The parent's state: which pid is which worker, and whether we are stopping."""

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.failed = False
        self.restarts: list[float] = []

    def forward(self, sig: int, _frame: object) -> None:
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        for index in range(self.workers):
            self.children[_fork(self.config, index, self.workers)] = index
        while self.children:
            pid, status = os.wait()
            if pid not in self.children:
                continue  # not a worker: the simulator subprocess
            index = self.children.pop(pid)
            _mark_dead(pid)
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                log.info("worker %d (pid %d) exited", index, pid)
                continue
            log.error("worker %d (pid %d) died with status %d", index, pid, code)
            self.failed = True
            if not self.stopping and self._may_restart():
                self.children[_fork(self.config, index, self.workers)] = index
            elif not self.stopping:
                log.error("workers keep dying: stopping the others")
                self.forward(signal.SIGTERM, None)
        return 1 if self.failed else 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
        if len(self.restarts) >= MAX_RESTARTS:
            return False
        self.restarts.append(now)
        return True


def supervise(config: Config, workers: int) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; returns the exit status."""
    reservations: list[socket.socket] = []
    simulator: subprocess.Popen[str] | None = None
    try:
        config = _concrete_ports(config, reservations)
        if config.simulator.enabled:
            config, simulator = _start_simulator(config)
        released = asyncio.run(_release_claims(config))
        if released:
            log.info("re-queued %d messages claimed by a previous run", released)
        return _Supervisor(config, workers).run()
    finally:
        if simulator is not None:
            simulator.terminate()
            simulator.wait()
            if simulator.stdout is not None:
                simulator.stdout.close()
        for sock in reservations:
            sock.close()
