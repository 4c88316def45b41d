"""Resend webhooks: verify the Svix signature, then read the request's one event.

Resend delivers webhooks through Svix. Each request carries `svix-id` (the message id, the same
on every retry), `svix-timestamp` (epoch seconds) and `svix-signature`: a space-separated list
of `v1,<base64 HMAC-SHA256>` over `{svix-id}.{svix-timestamp}.{raw body}`, keyed with the
base64-decoded part of the signing secret after `whsec_`. A request older (or newer) than
`max_age` seconds is refused as a possible replay. Our message id comes back in `data.tags`
under `swu_message_id`, the tag adapters/resend.py sets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
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
    parse_json,
)

__all__ = ["ResendReceiver"]

log = logging.getLogger(__name__)

MESSAGE_ID_TAG = "swu_message_id"  # the tag adapters/resend.py sets
SECRET_PREFIX = "whsec_"
DEFAULT_MAX_AGE = 300.0  # Svix's own libraries allow five minutes either way

# Resend's event `type` -> ours. email.bounced is refined by `bounce.type`; anything else
# (email.scheduled, email.received, contact.*, domain.*, suppression.*) is EVENT_TYPE_UNKNOWN.
EVENT_TYPES: dict[str, int] = {
    "email.sent": ET.EVENT_TYPE_SENT,
    "email.delivered": ET.EVENT_TYPE_DELIVERED,
    "email.delivery_delayed": ET.EVENT_TYPE_DEFERRED,
    "email.bounced": ET.EVENT_TYPE_BOUNCED,
    "email.complained": ET.EVENT_TYPE_COMPLAINED,
    "email.opened": ET.EVENT_TYPE_OPENED,
    "email.clicked": ET.EVENT_TYPE_CLICKED,
    "email.failed": ET.EVENT_TYPE_FAILED,  # Resend could not send it (quota, domain, key)
    "email.suppressed": ET.EVENT_TYPE_REJECTED,  # on the suppression list: never sent
}


class ResendReceiver(Receiver):
    """Checks the Svix signature and timestamp, then maps the request's one event."""

    kind = "resend"
    option_keys: ClassVar[frozenset[str]] = frozenset({"max_age"})

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        self.key = _signing_key(account.name, settings.secret)
        max_age = settings.options.get("max_age", DEFAULT_MAX_AGE)
        if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age <= 0:
            raise ValueError(f"esp {account.name}: [esp.webhook] max_age must be seconds > 0")
        self.max_age = float(max_age)

    async def receive(self, request: WebhookRequest) -> Received:
        msg_id = self._verify(request)
        body = parse_json(request.body)
        if not isinstance(body, dict):
            raise BadRequest("body is not a Resend event (a JSON object)")
        try:
            return Received(events=[_event(body, msg_id)])
        except ValueError as exc:
            log.warning("esp %s: skipped Resend event %s: %s", self.account.name, msg_id, exc)
            return Received(skipped=1)

    def _verify(self, request: WebhookRequest) -> str:
        """The svix-id of a correctly signed, fresh request; or Unauthorized / Forbidden."""
        headers = request.headers
        msg_id = headers.get("svix-id", "")
        stamp = headers.get("svix-timestamp", "")
        given = headers.get("svix-signature", "")
        if not (msg_id and stamp and given):
            raise Unauthorized("missing svix-id, svix-timestamp or svix-signature")
        if not stamp.isascii() or not stamp.isdigit():
            raise Unauthorized("svix-timestamp is not epoch seconds")
        signed = b".".join((msg_id.encode(), stamp.encode(), request.body))
        expected = hmac.new(self.key, signed, hashlib.sha256).digest()
        if not any(hmac.compare_digest(expected, sig) for sig in _v1_signatures(given)):
            raise Unauthorized("no svix-signature matches")
        # Checked only once the signature holds: a forged request learns nothing about the clock.
        if abs(self.clock() - int(stamp)) > self.max_age:
            raise Forbidden(f"svix-timestamp {stamp} is more than {self.max_age:g}s off")
        return msg_id


def _signing_key(account: str, secret: str) -> bytes:
    """The HMAC key: the base64 after `whsec_` (the prefix is optional, as in Svix's libraries)."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError(
            f"esp {account}: [esp.webhook] secret must be Resend's signing secret "
            "(whsec_ followed by base64): set secret_env or secret_file"
        )
    return key


def _v1_signatures(header: str) -> list[bytes]:
    """The decoded `v1` signatures of the header; other versions and bad base64 are ignored."""
    found = []
    for entry in header.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def _event(body: Mapping[str, Any], msg_id: str) -> ProviderEvent:
    """The request's event in the one event model; ValueError when it cannot be read."""
    name = body.get("type")
    if not isinstance(name, str) or not name:
        raise ValueError("no type")
    data = body.get("data")
    data = data if isinstance(data, dict) else {}
    kind = EVENT_TYPES.get(name, ET.EVENT_TYPE_UNKNOWN)
    bounce = _bounce_kind(data) if kind == ET.EVENT_TYPE_BOUNCED else 0
    click = _object(data, "click")
    return ProviderEvent(
        type=kind,
        time=_time(_text(click, "timestamp") or body.get("created_at")),
        provider_event_id=msg_id,
        message_id=_message_id(data.get("tags")),
        provider_type=name,
        recipient=_recipient(data),
        esp_message_id=_text(data, "email_id"),
        bounce=bounce,
        reason=_reason(data),
        response=_response(data),
        url=_text(click, "link"),
        user_agent=_text(click, "userAgent"),
    )


def _bounce_kind(data: Mapping[str, Any]) -> int:
    """Only a Permanent bounce is hard; Transient, Undetermined and unknown ones are soft."""
    kind = _text(_object(data, "bounce"), "type")
    return BOUNCE_HARD if kind.lower() == "permanent" else BOUNCE_SOFT


def _reason(data: Mapping[str, Any]) -> str:
    """Resend's classification: `type/subType: message`, or a failure or suppression reason."""
    if bounce := _object(data, "bounce"):
        kind = "/".join(p for p in (_text(bounce, "type"), _text(bounce, "subType")) if p)
        message = _text(bounce, "message")
        return f"{kind}: {message}" if kind and message else kind or message
    if suppressed := _object(data, "suppressed"):
        kind, message = _text(suppressed, "type"), _text(suppressed, "message")
        return f"{kind}: {message}" if kind and message else kind or message
    return _text(_object(data, "failed"), "reason")


def _response(data: Mapping[str, Any]) -> str:
    """The receiving server's SMTP replies (`bounce.diagnosticCode`, a list), one per line."""
    codes = _object(data, "bounce").get("diagnosticCode")
    if isinstance(codes, str):
        return codes
    return "\n".join(c for c in codes if isinstance(c, str)) if isinstance(codes, list) else ""


def _message_id(tags: Any) -> str:
    """Our tag, whether `tags` is the documented name->value object or a list of {name, value}."""
    if isinstance(tags, dict):
        return _text(tags, MESSAGE_ID_TAG)
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and tag.get("name") == MESSAGE_ID_TAG:
                return _text(tag, "value")
    return ""


def _recipient(data: Mapping[str, Any]) -> str:
    to = data.get("to")
    if isinstance(to, str):
        return to
    return next((a for a in to if isinstance(a, str)), "") if isinstance(to, list) else ""


def _time(raw: Any) -> float:
    """An ISO 8601 time as epoch seconds; naive times count as UTC."""
    if not isinstance(raw, str) or not raw:
        raise ValueError("no created_at")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"time {raw[:40]!r} is not ISO 8601") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _object(item: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = item.get(key)
    return value if isinstance(value, dict) else {}


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
