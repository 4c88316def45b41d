"""Mailgun webhooks: check the signature block's HMAC, age and token, then read the one event.

Mailgun posts one JSON object per event, `{"signature": {...}, "event-data": {...}}`. The
signature is hex HMAC-SHA256, keyed with the HTTP webhook signing key, over `timestamp + token`
(no separator); for a subaccount's domain a `parent-signature` made the same way with the primary
account's key may come along, and either one verifying is enough. The signature does not cover
`event-data`, so anyone who sees one signed request could attach its signature block to a body
of their own: a request is therefore also refused (403) when its timestamp is more than
`max_age` seconds from now, or when its token was already used within that window. Our message
id comes back in `event-data.user-variables.swu_message_id` (adapters/mailgun.py sends it as
`v:swu_message_id`).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.base import (
    BOUNCE_HARD,
    BOUNCE_SOFT,
    ET,
    BadRequest,
    Forbidden,
    ProviderEvent,
    Received,
    Receiver,
    Unauthorized,
    WebhookRequest,
    constant_time_equal,
    parse_json,
    stable_event_id,
)

__all__ = ["MailgunReceiver", "SeenTokens"]

log = logging.getLogger(__name__)

MESSAGE_ID_VAR = "swu_message_id"  # the user variable adapters/mailgun.py sets
DEFAULT_MAX_AGE = 300.0  # seconds either way; Mailgun warns against too tight a window
DEFAULT_MAX_TOKENS = 100_000  # tokens remembered at most (about 15 MB when full)
MAX_TOKEN_CHARS = 256  # Mailgun's are 50 characters; longer ones are not Mailgun's
MAX_TIMESTAMP_DIGITS = 12  # Unix seconds until the year 33658

EVENT_TYPES: dict[str, int] = {
    "accepted": ET.EVENT_TYPE_SENT,
    "rejected": ET.EVENT_TYPE_REJECTED,  # Mailgun refused the send request
    "delivered": ET.EVENT_TYPE_DELIVERED,
    "failed": ET.EVENT_TYPE_BOUNCED,  # refined by severity and reason, see _failure
    "opened": ET.EVENT_TYPE_OPENED,
    "clicked": ET.EVENT_TYPE_CLICKED,
    "unsubscribed": ET.EVENT_TYPE_UNSUBSCRIBED,
    "complained": ET.EVENT_TYPE_COMPLAINED,
    # stored, list_member_uploaded and anything new: EVENT_TYPE_UNKNOWN
}
BOUNCE_TYPES = {"hard": BOUNCE_HARD, "soft": BOUNCE_SOFT}  # delivery-status.bounce-type


class SeenTokens:
    """Tokens of accepted requests, each kept only while its timestamp is inside the window.

    An older token needs no memory: its timestamp alone gets it refused. When `capacity` tokens
    are kept, the one closest to expiring is forgotten first, so memory stays bounded even under
    a flood of validly signed requests.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []  # a heap; each kept token once

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, token: str, expires: float, now: float) -> bool:
        """Keep `token` until `expires`; False when it is already kept (a replay)."""
        while self._by_expiry and self._by_expiry[0][0] < now:
            del self._expiry[heapq.heappop(self._by_expiry)[1]]
        if token in self._expiry:
            return False
        while len(self._expiry) >= self.capacity:
            del self._expiry[heapq.heappop(self._by_expiry)[1]]
        self._expiry[token] = expires
        heapq.heappush(self._by_expiry, (expires, token))
        return True


class MailgunReceiver(Receiver):
    """Verifies the signature block (HMAC, age, unused token), then maps the event."""

    kind = "mailgun"
    option_keys: ClassVar[frozenset[str]] = frozenset({"max_age", "max_tokens"})

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        if not settings.secret:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] secret (Mailgun's HTTP webhook signing key)"
                " is required: set secret_env or secret_file"
            )
        self.key = settings.secret.encode()
        options = settings.options
        self.max_age = _positive(account.name, "max_age", options.get("max_age", DEFAULT_MAX_AGE))
        tokens = options.get("max_tokens", DEFAULT_MAX_TOKENS)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] max_tokens must be an integer >= 1"
            )
        self.seen = SeenTokens(tokens)

    async def receive(self, request: WebhookRequest) -> Received:
        body = parse_json(request.body)  # the signature is inside: nothing to check before
        if not isinstance(body, dict):
            raise BadRequest("body is not a Mailgun webhook (a JSON object)")
        self._authenticate(body.get("signature"))
        try:
            return Received(events=[_event(body.get("event-data"))])
        except ValueError as exc:
            log.warning("esp %s: skipped Mailgun event: %s", self.account.name, exc)
            return Received(skipped=1)

    def _authenticate(self, block: Any) -> None:
        """HMAC first (401), then the timestamp's age and the token's first use (403).

        No await between the token check and its recording, so two copies of one request
        racing on the event loop cannot both pass.
        """
        timestamp, token, given = _signature_block(block)
        expected = hmac.new(self.key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
        # Every given signature is compared, so the time taken says nothing about which matched.
        if not any([constant_time_equal(expected, signature.lower()) for signature in given]):
            raise Unauthorized("signature does not verify")
        now, signed_at = self.clock(), int(timestamp)
        if abs(now - signed_at) > self.max_age:
            raise Forbidden(f"timestamp {timestamp} is outside ±{self.max_age:g}s of now")
        if not self.seen.add(token, signed_at + self.max_age, now):
            raise Forbidden("token already used: a replayed request")


def _positive(account: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"esp {account}: [esp.webhook] {key} must be seconds > 0")
    return float(value)


def _signature_block(block: Any) -> tuple[str, str, list[str]]:
    """(timestamp, token, [signature, parent-signature]) as signed, or Unauthorized."""
    if not isinstance(block, dict):
        raise Unauthorized("no signature object in the body")
    timestamp = block.get("timestamp")
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        timestamp = str(timestamp)  # documented as an int, sent as a string
    if (
        not (isinstance(timestamp, str) and timestamp.isascii() and timestamp.isdigit())
        or len(timestamp) > MAX_TIMESTAMP_DIGITS
    ):
        raise Unauthorized("signature timestamp is not a Unix time")
    token = block.get("token")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise Unauthorized("signature token is missing or malformed")
    given = [block.get(name) for name in ("signature", "parent-signature")]
    signatures = [value for value in given if isinstance(value, str) and value]
    if not signatures:
        raise Unauthorized("no signature in the signature object")
    return timestamp, token, signatures


def _event(data: Any) -> ProviderEvent:
    """Mailgun's `event-data` in the one event model; ValueError when it cannot be read."""
    if not isinstance(data, dict):
        raise ValueError("no event-data object")
    name = _text(data, "event")
    if not name:
        raise ValueError("no event name")
    when = data.get("timestamp")
    if isinstance(when, bool) or not isinstance(when, int | float) or when <= 0:
        raise ValueError(f"timestamp {when!r} is not a Unix time")
    kind, bounce = EVENT_TYPES.get(name, ET.EVENT_TYPE_UNKNOWN), 0
    if name == "failed":
        kind, bounce = _failure(data)
    recipient = _text(data, "recipient")
    esp_message_id = _text(_dict(_dict(data, "message"), "headers"), "message-id").strip("<>")
    url = _text(data, "url") if kind == ET.EVENT_TYPE_CLICKED else ""
    event_id = _text(data, "id")
    return ProviderEvent(
        type=kind,
        time=float(when),
        # Mailgun's id is only "guaranteed to be unique within a day": with the event's own
        # timestamp it stays unique for good, and a redelivery still gets the same key.
        provider_event_id=f"{event_id}@{float(when)!r}"
        if event_id
        else stable_event_id(name, when, recipient, esp_message_id, url),
        message_id=_text(_dict(data, "user-variables"), MESSAGE_ID_VAR),
        provider_type=name,
        recipient=recipient,
        esp_message_id=esp_message_id,
        bounce=bounce,
        reason=_reason(data),
        response=_response(_dict(data, "delivery-status")),
        url=url,
        user_agent=_text(_dict(data, "client-info"), "user-agent"),
    )


def _failure(data: Mapping[str, Any]) -> tuple[int, int]:
    """A `failed` event's type and bounce kind, from its severity and reason.

    temporary: Mailgun "will re-attempt delivery", so the attempt is only DEFERRED. Dropped
    without an attempt because the address is on a suppression list (`suppress-bounce`,
    `-unsubscribe`, `-complaint`): REJECTED, as SendGrid's `dropped`. Given up after the retry
    limit (`old`): a soft bounce, the mailbox was never refused. Other permanent failures
    bounced, hard or soft as `delivery-status.bounce-type` says; without one, hard only for
    reason `bounce` (which Mailgun puts on its own bounce list), so no unknown reason
    suppresses an address.
    """
    reason = _text(data, "reason")
    if reason == "old":
        return ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT
    if _text(data, "severity") == "temporary":
        return ET.EVENT_TYPE_DEFERRED, 0
    if reason.startswith("suppress-"):
        return ET.EVENT_TYPE_REJECTED, 0
    declared = BOUNCE_TYPES.get(_text(_dict(data, "delivery-status"), "bounce-type"))
    return ET.EVENT_TYPE_BOUNCED, declared or (BOUNCE_HARD if reason == "bounce" else BOUNCE_SOFT)


def _reason(data: Mapping[str, Any]) -> str:
    """Mailgun's classification of a failure or a rejection: `reason: description`."""
    if data.get("event") == "rejected":
        source, details = _dict(data, "reject"), _dict(data, "reject")
    else:
        source, details = data, _dict(data, "delivery-status")
    reason, description = _text(source, "reason"), _text(details, "description")
    return f"{reason}: {description}" if reason and description else reason or description


def _response(status: Mapping[str, Any]) -> str:
    """The remote server's reply as `code text`, e.g. `550 5.5.0 Requested action not taken`."""
    code = status.get("code")
    known = isinstance(code, int | str) and not isinstance(code, bool) and code not in (0, "0", "")
    text = _text(status, "message") or _text(status, "description")
    return f"{code if known else ''} {text}".strip()


def _dict(item: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A nested object, or {} (Mailgun sends `[]` for empty user-variables)."""
    value = item.get(key)
    return value if isinstance(value, dict) else {}


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
