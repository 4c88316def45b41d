"""The webhook HTTP server: `POST /webhooks/<account name>`, one endpoint per ESP account.

Each account whose `[[esp]]` table has an `[esp.webhook]` sub-table gets an endpoint served by
its kind's receiver. The receiver authenticates the request before anything is stored; a
request that fails gets 401/403 and changes nothing. Bodies over `max_body_bytes` get 413;
unreadable ones 400. Accepted events are stored deduplicated (swu_delivery/events.py) and the
answer says how many were new: `{"stored": n, "duplicates": n, "skipped": n}`. A failure of
ours answers 500, so the provider delivers the request again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import aiohttp
import orjson
from aiohttp import web

from swu_delivery.config import EspAccount, WebhooksConfig
from swu_delivery.events import EventStore
from swu_delivery.webhooks import receiver_class
from swu_delivery.webhooks.base import Receiver, WebhookError, WebhookRequest

__all__ = ["WebhookServer", "build_receivers"]

log = logging.getLogger(__name__)


def build_receivers(accounts: tuple[EspAccount, ...], http: WebhookServer) -> dict[str, Receiver]:
    """A receiver per account with an [esp.webhook] table; ValueError names a bad one."""
    receivers: dict[str, Receiver] = {}
    for account in accounts:
        if account.webhook is None:
            continue
        cls = receiver_class(account.kind)
        receivers[account.name] = cls(
            account, account.webhook, http=http.client_session, clock=time.time
        )
    return receivers


def _json(status: int, body: Mapping[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class WebhookServer:
    """The aiohttp app, its runner, and the client session receivers share."""

    def __init__(self, config: WebhooksConfig, events: EventStore) -> None:
        self.config = config
        self.events = events
        self.receivers: dict[str, Receiver] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def client_session(self) -> aiohttp.ClientSession:
        """One outgoing HTTP session for all receivers (certificates, confirmations)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def start(self, receivers: dict[str, Receiver], *, reuse_port: bool = False) -> None:
        """Serve on `config.listen`; `reuse_port` when worker processes share the port."""
        self.receivers = receivers
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/webhooks/{account}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = self.config.listen.rpartition(":")
        site = web.TCPSite(self._runner, host, int(port), reuse_port=reuse_port or None)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through its server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["account"]
        receiver = self.receivers.get(name)
        if receiver is None:
            return _json(404, {"error": f"no webhook endpoint for account {name!r}"})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            log.warning("webhook %s: body over %d bytes refused", name, self.config.max_body_bytes)
            return _json(413, {"error": "body too large"})
        incoming = WebhookRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
        )
        try:
            received = await receiver.receive(incoming)
        except WebhookError as exc:
            log.warning("webhook %s: %d %s", name, exc.status, exc)
            return _json(exc.status, {"error": str(exc)})
        except Exception:
            log.exception("webhook %s: the receiver failed", name)
            return _json(500, {"error": "internal error"})
        try:
            result = await self.events.store(name, received.events)
        except Exception:
            log.exception("webhook %s: storing %d events failed", name, len(received.events))
            return _json(500, {"error": "internal error"})
        if received.skipped:
            log.warning("webhook %s: skipped %d unreadable events", name, received.skipped)
        if received.reply:
            return web.Response(status=200, body=received.reply)
        return _json(
            200,
            {
                "stored": result.stored,
                "duplicates": result.duplicates,
                "skipped": received.skipped,
            },
        )
