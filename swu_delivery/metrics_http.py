"""The HTTP `/metrics` endpoint, served by aiohttp in the service's event loop.

Before each scrape it reads the outbox gauges through the database thread, so the loop never
blocks on disk. With several workers it binds with SO_REUSEPORT, and whichever worker takes a
scrape answers with every worker's totals (`metrics.registry()`).
"""

from __future__ import annotations

import logging
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from swu_delivery import metrics
from swu_delivery.db import Database

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)


class MetricsServer:
    """GET /metrics on its own host:port."""

    def __init__(self, listen: str, db: Database) -> None:
        self.host, _, port = listen.rpartition(":")
        self.requested_port = int(port)
        self.db = db
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        site = web.TCPSite(runner, self.host, self.requested_port, reuse_port=shared or None)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            await metrics.refresh_outbox(self.db)
        except Exception:
            log.exception("reading the outbox gauges failed")
        body = generate_latest(metrics.registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
