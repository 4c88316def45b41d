"""What every webhook receiver implements: authenticate a provider's request, then normalize it.

One receiver per ESP kind. The webhook server (swu_delivery/webhooks/server.py) hands each
request for an account's endpoint to that account's receiver as a `WebhookRequest`; the receiver
first verifies it the provider's way (raising `Unauthorized` or `Forbidden`, before anything is
stored), then turns the body into `ProviderEvent`s in the one event model. Events that cannot be
read are skipped and counted, so one bad event in a body of many does not lose the others; a
body that cannot be read at all is a `BadRequest`.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount, WebhookSettings

__all__ = [
    "BOUNCE_HARD",
    "BOUNCE_SOFT",
    "BadRequest",
    "Forbidden",
    "ProviderEvent",
    "Received",
    "Receiver",
    "Unauthorized",
    "Unavailable",
    "WebhookError",
    "WebhookRequest",
    "constant_time_equal",
    "parse_json",
    "stable_event_id",
]

ET = delivery_pb2.EventType  # EVENT_TYPE_DELIVERED, EVENT_TYPE_BOUNCED, ...
BOUNCE_HARD = delivery_pb2.BOUNCE_TYPE_HARD
BOUNCE_SOFT = delivery_pb2.BOUNCE_TYPE_SOFT


class WebhookError(Exception):
    """A request the endpoint refuses; `status` is the HTTP answer, the message is logged."""

    status: ClassVar[int] = 400


class BadRequest(WebhookError):
    """The body is not what the provider sends (not JSON, wrong shape)."""

    status = 400


class Unauthorized(WebhookError):
    """Credentials or signature missing or wrong."""

    status = 401


class Forbidden(WebhookError):
    """Authenticated, but not allowed: stale timestamp, replayed token, foreign topic."""

    status = 403


class Unavailable(WebhookError):
    """Something the check depends on could not be reached (a signing certificate, a
    subscription confirmation): 503, so the provider delivers the request again later."""

    status = 503


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One HTTP request to an account's webhook endpoint, as received."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes  # the raw body: signatures are computed over these exact bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderEvent:
    """One provider event in the one event model."""

    type: int  # a delivery_pb2.EventType value
    time: float  # when it happened, epoch seconds, from the provider's timestamp
    provider_event_id: str  # the provider's id, or stable_event_id(...) when it has none
    message_id: str  # ours, read back from what the adapter injected; "" when absent
    provider_type: str  # the provider's own event name, e.g. "dropped"
    recipient: str = ""
    esp_message_id: str = ""
    bounce: int = 0  # BOUNCE_HARD or BOUNCE_SOFT for EVENT_TYPE_BOUNCED
    reason: str = ""  # the provider's description
    response: str = ""  # the remote server's (or the ESP's) response text
    url: str = ""  # the clicked link
    user_agent: str = ""


@dataclass(slots=True)
class Received:
    """What a receiver made of one request."""

    events: list[ProviderEvent] = field(default_factory=list)
    skipped: int = 0  # events in the body that could not be read (logged, not stored)
    reply: bytes = b""  # body of the 200 answer, when the provider expects one


class Receiver(ABC):
    """Authenticates and normalizes the webhook requests of one ESP account."""

    kind: ClassVar[str]  # the ESP kind it serves, as in `[[esp]] kind`
    option_keys: ClassVar[frozenset[str]] = frozenset()  # its keys in [esp.webhook]

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        """`http` gives a shared client session (for fetching certificates, confirming
        subscriptions); `clock` is the current epoch time, injectable for replay tests."""
        if unknown := sorted(set(settings.options) - self.option_keys):
            own = ", ".join(sorted(self.option_keys)) or "none"
            raise ValueError(
                f"esp {account.name}: unknown key {unknown[0]!r} in [esp.webhook] for kind "
                f"{self.kind!r} (its own keys: {own}, plus secret_env/secret_file)"
            )
        self.account = account
        self.settings = settings
        self.http = http
        self.clock = clock

    @abstractmethod
    async def receive(self, request: WebhookRequest) -> Received:
        """Verify `request` (raise Unauthorized/Forbidden/BadRequest), then normalize it."""


def parse_json(body: bytes) -> Any:
    """The body as JSON, or BadRequest."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare secrets and signatures without leaking where they differ."""
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


def stable_event_id(*parts: object) -> str:
    """An id for a provider event that has none: a digest of what identifies it, so a
    redelivery of the same event gets the same id and is deduplicated."""
    digest = hashlib.blake2b(orjson.dumps([str(p) for p in parts]), digest_size=16)
    return "swu:" + digest.hexdigest()
