"""grpc.health.v1 states: SERVING while the store is writable, per ESP account while not open.

The store is probed with a real write every `PROBE_SECONDS` through the database thread; a
failed or stuck write turns the overall service ("" and the API services) NOT_SERVING until a
probe succeeds again. Accounts are named `swu.delivery.esp.<account>`. Once shutdown has begun
(`enter_graceful_shutdown`), the servicer ignores every later change, so draining stays
NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Any

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from swu_delivery import metrics
from swu_delivery.breaker import Breaker, BreakerState
from swu_delivery.db import Database, transaction

__all__ = ["PROBE_SECONDS", "HealthReporter", "esp_service_name"]

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
PROBE_TIMEOUT = 5.0  # a write stuck this long counts as failed
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def esp_service_name(account: str) -> str:
    return f"swu.delivery.esp.{account}"


def _probe_write(conn: sqlite3.Connection, now: float) -> None:
    """Write one row, as intake does: proves the database and its WAL take writes."""
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY, at REAL)")
        conn.execute("INSERT OR REPLACE INTO health_probe (id, at) VALUES (1, ?)", (now,))


class HealthReporter:
    """Keeps the health servicer's states in line with the store and the ESP circuits."""

    def __init__(
        self, servicer: health_aio.HealthServicer, db: Database, services: Iterable[str]
    ) -> None:
        self.servicer = servicer
        self.db = db
        self.services = ("", *services)
        self.writable: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._updates: set[asyncio.Task[None]] = set()

    async def start(self, accounts: Iterable[str]) -> None:
        await self.probe()
        for account in accounts:
            await self.servicer.set(esp_service_name(account), SERVING)
            metrics.BREAKER_STATE.labels(account).set(0)
        self._task = asyncio.create_task(self._run(), name="swu-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def probe(self) -> bool:
        """One write probe; sets the overall states when writability changed."""
        try:
            await asyncio.wait_for(self.db.run(_probe_write, time.time()), PROBE_TIMEOUT)
            writable = True
        except Exception as exc:
            writable = False
            if self.writable is not False:
                log.error("store not writable, health NOT_SERVING: %s", exc)
        if writable != self.writable:
            if writable and self.writable is False:
                log.info("store writable again, health SERVING")
            self.writable = writable
            for name in self.services:
                await self.servicer.set(name, SERVING if writable else NOT_SERVING)
        return writable

    def watch(self, breakers: Mapping[str, Breaker]) -> None:
        """Follow each account's circuit: its gauge, and NOT_SERVING while it is open."""
        loop = asyncio.get_running_loop()
        for account, breaker in breakers.items():
            gauge = metrics.BREAKER_STATE.labels(account)
            name = esp_service_name(account)

            def changed(
                _: Breaker,
                old: BreakerState,
                new: BreakerState,
                gauge: Any = gauge,
                name: str = name,
            ) -> None:
                gauge.set(metrics.BREAKER_VALUES[new.value])
                status = NOT_SERVING if new is BreakerState.OPEN else SERVING
                task = loop.create_task(self.servicer.set(name, status))  # in order of changes
                self._updates.add(task)
                task.add_done_callback(self._updates.discard)

            breaker.subscribe(changed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            await self.probe()
