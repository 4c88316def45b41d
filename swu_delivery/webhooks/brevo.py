"""Brevo transactional webhooks: check the configured credentials, then read the event(s).

Brevo signs nothing. A webhook authenticates with what Brevo's "Secure webhook calls" guide
offers: username and password in the URL (sent as HTTP Basic), a bearer token (`auth: {type:
"bearer", token}` on the webhook), or custom `headers` — so the account configures `username`
(Basic, the secret is the password), `auth = "bearer"` (the secret is the token) and/or `header`
(a header whose value is the secret). A request is one event object, or an array of them when
the webhook is `batched`. Our id comes back inside the echoed `X-Mailin-custom` JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import orjson

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.auth import (
    basic_username,
    check_basic_auth,
    check_bearer_token,
    check_secret_header,
    header_name,
)
from swu_delivery.webhooks.base import (
    BOUNCE_HARD,
    BOUNCE_SOFT,
    ET,
    BadRequest,
    ProviderEvent,
    Received,
    Receiver,
    WebhookRequest,
    parse_json,
    stable_event_id,
)

__all__ = ["BrevoReceiver"]

log = logging.getLogger(__name__)

CUSTOM_FIELD = "X-Mailin-custom"  # the header adapters/brevo.py sets, echoed in every event
MESSAGE_ID_KEY = "swu_message_id"  # our id inside its JSON
AUTH_SCHEMES = ("basic", "bearer")
# ts_epoch is documented in milliseconds, yet the documented example holds seconds; no real
# date in seconds reaches 1e11 (year 5138) and none in milliseconds stays below it (1973).
MILLISECONDS_FROM = 1e11

# Brevo event -> (our type, bounce kind). proxy_open / unique_proxy_open (a mail client's
# privacy proxy fetching the images, not a reader) and anything new: EVENT_TYPE_UNKNOWN.
EVENT_TYPES: dict[str, tuple[int, int]] = {
    "request": (ET.EVENT_TYPE_SENT, 0),
    "deferred": (ET.EVENT_TYPE_DEFERRED, 0),
    "delivered": (ET.EVENT_TYPE_DELIVERED, 0),
    "soft_bounce": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "hard_bounce": (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "invalid_email": (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),  # the address itself is invalid
    "blocked": (ET.EVENT_TYPE_REJECTED, 0),  # Brevo refused: the recipient is blocklisted
    "error": (ET.EVENT_TYPE_FAILED, 0),
    "spam": (ET.EVENT_TYPE_COMPLAINED, 0),
    "complaint": (ET.EVENT_TYPE_COMPLAINED, 0),  # the docs' anchor for "Spam"; seen live
    "opened": (ET.EVENT_TYPE_OPENED, 0),
    "unique_opened": (ET.EVENT_TYPE_OPENED, 0),  # "First Opening"
    "click": (ET.EVENT_TYPE_CLICKED, 0),
    "unsubscribed": (ET.EVENT_TYPE_UNSUBSCRIBED, 0),
    "unsubscribe": (ET.EVENT_TYPE_UNSUBSCRIBED, 0),
}
# Events whose `reason` is the receiving server's reply rather than Brevo's own description.
MTA_REASON_EVENTS = frozenset({"soft_bounce", "hard_bounce", "deferred"})


class BrevoReceiver(Receiver):
    """Checks Basic, bearer or secret-header credentials, then maps each event of the body."""

    kind = "brevo"
    option_keys: ClassVar[frozenset[str]] = frozenset({"username", "auth", "header"})

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        self.username, self.scheme = _scheme(account.name, settings.options)
        options = settings.options
        self.header = (
            header_name(account.name, "header", options["header"]) if "header" in options else ""
        )
        if not (self.scheme or self.header):
            raise ValueError(
                f"esp {account.name}: [esp.webhook] for Brevo needs username (HTTP Basic), "
                'auth = "bearer" (a bearer token) and/or header (a custom header)'
            )
        if not settings.secret:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] secret is required (the Basic password, "
                "bearer token or header value): set secret_env or secret_file"
            )

    async def receive(self, request: WebhookRequest) -> Received:
        if self.scheme == "basic":
            check_basic_auth(request.headers, self.username, self.settings.secret)
        elif self.scheme == "bearer":
            check_bearer_token(request.headers, self.settings.secret)
        if self.header:
            check_secret_header(request.headers, self.header, self.settings.secret)
        body = parse_json(request.body)
        if isinstance(body, dict):
            body = [body]
        if not isinstance(body, list):
            raise BadRequest("body is not a Brevo event or an array of them")
        received = Received()
        for index, item in enumerate(body):
            try:
                received.events.append(_event(item))
            except ValueError as exc:
                log.warning("esp %s: skipped Brevo event %d: %s", self.account.name, index, exc)
                received.skipped += 1
        return received


def _scheme(account: str, options: Mapping[str, Any]) -> tuple[str, str]:
    """(username, "basic" | "bearer" | "") from the `username` and `auth` options."""
    username = (
        basic_username(account, "username", options["username"]) if "username" in options else ""
    )
    scheme = options.get("auth", "basic" if username else "")
    if scheme not in ("", *AUTH_SCHEMES):
        raise ValueError(f'esp {account}: [esp.webhook] auth must be "basic" or "bearer"')
    if scheme == "basic" and not username:
        raise ValueError(f'esp {account}: [esp.webhook] auth = "basic" needs username')
    if scheme == "bearer" and username:
        raise ValueError(
            f'esp {account}: [esp.webhook] auth = "bearer" takes no username '
            "(both would use the Authorization header)"
        )
    return username, str(scheme)


def _event(item: Any) -> ProviderEvent:
    """One Brevo event in the one event model; ValueError when it cannot be read."""
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    name = item.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("no event name")
    raw_time, when = _time(item)
    kind, bounce = EVENT_TYPES.get(name, (ET.EVENT_TYPE_UNKNOWN, 0))
    recipient = _text(item, "email")
    esp_message_id = _text(item, "message-id")
    url = _text(item, "link")
    reason = _text(item, "reason").strip()
    mta = name in MTA_REASON_EVENTS
    return ProviderEvent(
        type=kind,
        time=when,
        # Brevo's `id` is the webhook's id, not the event's: no event id is documented.
        provider_event_id=stable_event_id(name, esp_message_id, recipient, raw_time, url),
        message_id=_message_id(item),
        provider_type=name,
        recipient=recipient,
        esp_message_id=esp_message_id,
        bounce=bounce,
        reason="" if mta else reason,
        response=reason if mta else "",
        url=url,
    )


def _message_id(item: Mapping[str, Any]) -> str:
    """`swu_message_id` from the echoed X-Mailin-custom JSON (any case of the name); or ""."""
    custom = item.get(CUSTOM_FIELD)
    if custom is None:
        lowered = CUSTOM_FIELD.lower()
        custom = next((v for k, v in item.items() if k.lower() == lowered), None)
    if isinstance(custom, str):
        try:
            custom = orjson.loads(custom)
        except orjson.JSONDecodeError:
            return ""
    return _text(custom, MESSAGE_ID_KEY) if isinstance(custom, dict) else ""


def _time(item: Mapping[str, Any]) -> tuple[object, float]:
    """(raw, epoch seconds): ts_epoch (UTC, ms — or s, see MILLISECONDS_FROM), else ts_event."""
    for key in ("ts_epoch", "ts_event"):
        value = item.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            seconds = value / 1000 if value >= MILLISECONDS_FROM else value
            return value, float(seconds)
    raise ValueError("no ts_epoch or ts_event Unix time")


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
