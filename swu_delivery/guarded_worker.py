"""A long-lived worker process that runs one call at a time under a memory and a time limit.

The worker is a one-process `ProcessPoolExecutor` started with the "spawn" context, never plain
fork: the parent is a grpc.aio server, whose threads do not survive a fork. Spawn (rather than
forkserver) keeps the worker a direct child of the service, so a watchdog thread in the worker
notices when the service dies, even by SIGKILL, and exits instead of lingering as an orphan
that holds the service's stdout and resource-tracker pipes open.

The worker runs with RLIMIT_AS set, so a call that allocates too much gets MemoryError or dies;
a call that outlives its timeout gets the worker SIGKILLed, and the next call starts a fresh one.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

__all__ = ["GuardedWorker", "WorkerCrashed", "WorkerTimeout"]

T = TypeVar("T")


class WorkerTimeout(Exception):
    """The call outlived its timeout; the worker was killed."""


class WorkerCrashed(Exception):
    """The worker died during the call (typically out of memory)."""


PARENT_POLL_SECONDS = 0.5


def _init_worker(memory_bytes: int, parent_pid: int) -> None:
    _limit_memory(memory_bytes)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as the service that started this worker is gone (re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _limit_memory(memory_bytes: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        memory_bytes = min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, hard))


def _start(module: str) -> int:
    """Import the task's module up front, so that start-up never counts against a timeout."""
    importlib.import_module(module)
    return os.getpid()


class GuardedWorker:
    """Runs `fn(*args)` in the worker; one call at a time, so a timeout times that call only."""

    def __init__(self, *, memory_bytes: int, timeout: float) -> None:
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._pid = 0

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """The result of `fn(*args)`; raises WorkerTimeout or WorkerCrashed."""
        with self._lock:
            try:
                pool = self._ensure_started(fn.__module__)
                return pool.submit(fn, *args).result(timeout=self.timeout)
            except TimeoutError:
                self._kill()
                raise WorkerTimeout(f"took longer than {self.timeout:g}s") from None
            except BrokenProcessPool:
                self._discard()
                raise WorkerCrashed("the worker process died") from None

    def close(self) -> None:
        """Stop the worker (it is started again on the next run)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def _ensure_started(self, module: str) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.memory_bytes, os.getpid()),
            )
            try:
                self._pid = self._pool.submit(_start, module).result()
            except BaseException:
                self._discard()
                raise
        return self._pool

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have died on its own
            os.kill(self._pid, signal.SIGKILL)
        self._discard()

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
