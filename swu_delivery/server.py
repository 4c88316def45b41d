"""Assembles the service from its parts, serves gRPC, and shuts down gracefully on SIGTERM.

Shutdown order: health NOT_SERVING and intake refuses new sends (UNAVAILABLE); the delivery lane
stops claiming and lets in-flight ESP calls finish within the grace period; the gRPC server
stops; what was not sent stays queued for the next start.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio  # = health.aio, which mypy cannot see
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters import create_adapter
from adapters.base import Adapter, AdapterError
from swu_delivery._proto.swu.delivery.v1 import (
    delivery_pb2,
    delivery_pb2_grpc,
    suppression_pb2,
    suppression_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)
from swu_delivery.config import SIMULATOR_ACCOUNT, Config, ConfigError
from swu_delivery.db import Database
from swu_delivery.dispatch import Dispatcher
from swu_delivery.events import EventHub, EventStore
from swu_delivery.health import HealthReporter
from swu_delivery.intake import Intake
from swu_delivery.interceptors import RequestMetrics
from swu_delivery.ledger import Ledger
from swu_delivery.logs import configure_logging
from swu_delivery.metrics_http import MetricsServer
from swu_delivery.outbox import Outbox
from swu_delivery.ratelimit import AccountLimiter, account_limits
from swu_delivery.sandbox import TemplateEngine
from swu_delivery.servicers import DeliveryServicer, SuppressionServicer, TemplateServicer
from swu_delivery.suppressions import SuppressionStore
from swu_delivery.templates import TemplateCache, TemplateStore
from swu_delivery.webhooks.server import WebhookServer, build_receivers
from swu_delivery.workers import supervise

__all__ = ["Service", "run", "serve", "with_simulator_url"]

log = logging.getLogger("swu_delivery")

SERVICE_NAMES = (
    delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
    template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
    suppression_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name,
)
HOUSEKEEPING_SECONDS = 3600.0
WATCH_POLL = 0.3  # seconds: how soon WatchEvents sees events another worker recorded
GC_GEN0_THRESHOLD = 50_000  # allocations between young-generation collections (default 700)


def _server_options(config: Config) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class Service:
    """The running service: its parts, built once from a Config, started and stopped together."""

    def __init__(self, config: Config, *, workers: int = 1) -> None:
        self.config = config
        self.workers = workers  # processes sharing the outbox and each account's limits
        self.db = Database(Path(config.data_dir) / "swu.db")
        self.engine = TemplateEngine(config.render)
        self.cache = TemplateCache(self.db, self.engine)
        self.store = TemplateStore(self.db, self.engine, self.cache)
        self.hub = EventHub()
        self.events = EventStore(self.db, self.hub, poll=1.0 if workers == 1 else WATCH_POLL)
        self.outbox = Outbox(
            self.db, idempotency_ttl=config.idempotency_ttl, on_record=self.hub.notify
        )
        self.ledger = Ledger(self.db)
        self.suppressions = SuppressionStore(self.db)
        self.webhooks: WebhookServer | None = None
        self.adapters: dict[str, Adapter] = {}
        self.dispatcher: Dispatcher | None = None
        self.intake: Intake | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.health_reporter = HealthReporter(self.health, self.db, SERVICE_NAMES)
        self.metrics: MetricsServer | None = None
        self.port = 0
        self._simulator: Any = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def _start_simulator(self) -> None:
        from swu_delivery.simulator import SimulatorConfig, start_simulator

        sim = self.config.simulator
        self._simulator, url = await start_simulator(
            SimulatorConfig(host=sim.host, port=sim.port, max_records=1000)
        )
        self.config = with_simulator_url(self.config, url)
        log.info("embedded ESP simulator at %s", url)

    async def start(self) -> None:
        await self.db.open()
        if self.workers == 1:  # with several, the supervisor did it before forking
            released = await self.outbox.release()  # claims of a previous run
            if released:
                log.info("re-queued %d messages claimed by a previous run", released)
        if self.config.simulator.enabled:
            await self._start_simulator()
        for account in self.config.esps:
            try:
                adapter = create_adapter(account)
            except AdapterError as exc:
                raise ConfigError(str(exc)) from None
            if self.workers > 1:  # this process's share of the account's limits
                adapter.limiter = AccountLimiter(account_limits(account), workers=self.workers)
            await adapter.start()
            self.adapters[account.name] = adapter
        self.dispatcher = Dispatcher(
            outbox=self.outbox,
            cache=self.cache,
            engine=self.engine,
            adapters=self.adapters,
            config=self.config.delivery,
        )
        self.intake = Intake(
            outbox=self.outbox,
            store=self.store,
            cache=self.cache,
            engine=self.engine,
            on_accepted=self.dispatcher.wake,
        )
        server = grpc.aio.server(
            options=_server_options(self.config), interceptors=[RequestMetrics()]
        )
        delivery_pb2_grpc.add_DeliveryServiceServicer_to_server(
            DeliveryServicer(
                intake=self.intake,
                ledger=self.ledger,
                cache=self.cache,
                store=self.store,
                engine=self.engine,
                events=self.events,
            ),
            server,
        )
        template_pb2_grpc.add_TemplateServiceServicer_to_server(
            TemplateServicer(self.store), server
        )
        suppression_pb2_grpc.add_SuppressionServiceServicer_to_server(
            SuppressionServicer(self.suppressions), server
        )
        _add_health(server, self.health)
        _add_reflection(server)
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise ConfigError(f"listen: cannot bind {self.config.listen} ({exc})") from None
        await server.start()
        self.server = server
        await self.health_reporter.start(self.adapters)
        self.health_reporter.watch(self.dispatcher.breakers)
        await self._start_webhooks()
        await self._start_metrics()
        self.dispatcher.start()
        self._housekeeping = asyncio.create_task(self._housekeep())

    async def _start_webhooks(self) -> None:
        if not self.config.webhooks.listen:
            return
        webhooks = WebhookServer(self.config.webhooks, self.events)
        try:
            receivers = build_receivers(self.config.esps, webhooks)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            await webhooks.start(receivers, reuse_port=self.workers > 1)
        except OSError as exc:
            listen = self.config.webhooks.listen
            raise ConfigError(f"webhooks.listen: cannot bind {listen} ({exc})") from None
        self.webhooks = webhooks
        log.info("webhook endpoints for %s", ", ".join(sorted(receivers)) or "no account")

    async def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        metrics = MetricsServer(self.config.metrics.listen, self.db)
        try:
            await metrics.start()
        except (OSError, ValueError) as exc:
            listen = self.config.metrics.listen
            raise ConfigError(f"metrics.listen: cannot bind {listen} ({exc})") from None
        self.metrics = metrics

    async def _housekeep(self) -> None:
        while True:
            try:
                pruned = await self.outbox.prune_idempotency_keys()
                if pruned:
                    log.info("pruned %d expired idempotency keys", pruned)
            except Exception:
                log.exception("housekeeping failed")
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def stop(self) -> None:
        """Graceful: refuse new sends, finish in-flight ESP calls, stop serving."""
        grace = self.config.grace_seconds
        await self.health.enter_graceful_shutdown()
        await self.health_reporter.stop()
        if self.intake is not None:
            self.intake.draining = True
        if self.dispatcher is not None:
            await self.dispatcher.stop(grace)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.server is not None:
            await self.server.stop(grace=min(grace, 5.0))
        for adapter in self.adapters.values():
            await adapter.close()
        if self._simulator is not None:
            await self._simulator.cleanup()
        await self.db.close()
        self.engine.close()


def _add_health(server: grpc.aio.Server, servicer: health_aio.HealthServicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def _add_reflection(server: grpc.aio.Server) -> None:
    names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


def with_simulator_url(config: Config, url: str) -> Config:
    """`config` with the simulator account pointed at `url` (unless it names its own)."""
    esps = tuple(
        replace(a, base_url=url) if a.name == SIMULATOR_ACCOUNT and not a.base_url else a
        for a in config.esps
    )
    return replace(config, esps=esps)


async def serve(config: Config, *, workers: int = 1) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    service = Service(config, workers=workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    tune_gc()
    if service.webhooks is not None:
        webhook_host = config.webhooks.listen.rpartition(":")[0]
        print(f"swu-delivery webhooks on {webhook_host}:{service.webhooks.port}", flush=True)
    if service.metrics is not None:
        metrics_host = config.metrics.listen.rpartition(":")[0]
        print(f"swu-delivery metrics on {metrics_host}:{service.metrics.port}", flush=True)
    host = config.listen.rpartition(":")[0]
    print(f"swu-delivery listening on {host}:{service.port}", flush=True)
    log.info("serving on %s:%d, data in %s", host, service.port, config.data_dir)
    await stop.wait()
    log.info("shutting down: draining in-flight deliveries")
    await service.stop()
    log.info("stopped")


def tune_gc() -> None:
    """Keep the cyclic collector off the hot path.

    Delivery allocates many short-lived objects (protobufs, dicts, aiohttp requests) that
    reference counting frees; with the default gen-0 threshold of 700 the collector ran often
    and its full collections, each tens of milliseconds on a loaded heap, stalled the event
    loop (about a fifth of service CPU in benchmarks/bench_send.py). Objects alive after
    start-up are frozen out of collections; the thresholds make collections rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)


def run(config: Config, *, workers: int = 1) -> int:
    """Blocking entry point for `swu-delivery serve`; returns the exit status.

    With `workers` > 1 the caller first sets PROMETHEUS_MULTIPROC_DIR
    (`workers.prepare_metrics_dir`), before prometheus_client is imported.
    """
    configure_logging(config.log_level, config.log_format)
    if workers > 1:
        return supervise(config, workers)
    try:
        import uvloop

        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))
    return 0
