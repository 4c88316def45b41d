"""Pytest fixtures that run the ESP simulator as a real subprocess on a free loopback port.

One simulator process serves the whole session (``esp_simulator_process``); the function-scoped
``esp_simulator`` fixture resets its records, counters and faults before every test, so tests
stay independent without paying a process start each. Tests that need their own start-up flags
use ``run_simulator(*flags)`` as a context manager.

The handle speaks to the simulator's /_sim/ admin API with urllib (synchronous and simple)::

    sim.url                                   base URL, e.g. http://127.0.0.1:40123
    sim.requests(provider=None, status=None)  recorded requests, oldest first
    sim.health()                              {"status": "ok"}
    sim.stats()                               exact counts per provider, status and second
    sim.faults()                              current rates, latency, seed and rules
    sim.set_faults(**settings)                replace them (omitted: start-up values)
    sim.add_rule(**rule)                      append a scripted rule
    sim.reset()                               forget records and restore start-up faults
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

LISTENING = "esp-simulator listening on "
START_TIMEOUT_S = 20.0

# The simulator is on loopback; never route admin calls through an HTTP proxy from the env.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SimulatorHandle:
    """A running simulator: its URL and its admin API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else orjson.dumps(payload)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(request, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            with exc:  # say why, and close the socket the error holds
                exc.add_note(exc.read().decode(errors="replace"))
            raise
        return orjson.loads(body) if body else None

    def requests(self, provider: str | None = None, status: int | None = None) -> list[Any]:
        query = {k: v for k, v in (("provider", provider), ("status", status)) if v is not None}
        path = "/_sim/requests" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        return list(self._call("GET", path)["requests"])

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_sim/health"))

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_sim/stats"))

    def faults(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_sim/faults"))

    def set_faults(self, **settings: Any) -> dict[str, Any]:
        return dict(self._call("PUT", "/_sim/faults", settings))

    def add_rule(self, **rule: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/_sim/faults/rules", rule))

    def reset(self) -> None:
        self._call("DELETE", "/_sim/requests")
        self._call("PUT", "/_sim/faults", {})


def _read_listening_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    if not line.startswith(LISTENING):
        raise RuntimeError(f"the ESP simulator did not start (first line: {line!r})")
    return line[len(LISTENING) :].strip()


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def run_simulator(*flags: str) -> Iterator[SimulatorHandle]:
    """Start ``python -m swu_delivery.simulator --port 0 *flags``; SIGTERM (then kill) on exit."""
    command = [sys.executable, "-m", "swu_delivery.simulator", "--port", "0", *flags]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            try:
                url = _read_listening_line(process)
            except RuntimeError as exc:
                _stop(process)
                stderr.seek(0)
                raise RuntimeError(f"{exc}\n{stderr.read()}") from None
            yield SimulatorHandle(url)
        finally:
            if process.poll() is None:
                _stop(process)
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture(scope="session")
def esp_simulator_process() -> Iterator[SimulatorHandle]:
    """The session's one simulator process, with default flags."""
    with run_simulator() as handle:
        yield handle


@pytest.fixture
def esp_simulator(esp_simulator_process: SimulatorHandle) -> SimulatorHandle:
    """The shared simulator, with no records and its start-up faults."""
    esp_simulator_process.reset()
    return esp_simulator_process
