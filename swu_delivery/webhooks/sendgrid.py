"""SendGrid's Signed Event Webhook: check the ECDSA signature, then read the array of events.

SendGrid signs `X-Twilio-Email-Event-Webhook-Timestamp` + the raw body with ECDSA P-256 /
SHA-256 and sends the DER signature, base64, in `X-Twilio-Email-Event-Webhook-Signature`. The
verification key is the one SendGrid shows under Mail Settings (base64 of a DER
SubjectPublicKeyInfo), configured as the webhook secret. Our message id comes back as the
top-level field `swu_message_id`, because SendGrid copies `custom_args` into every event.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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
    stable_event_id,
)

__all__ = ["SendGridReceiver"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MESSAGE_ID_FIELD = "swu_message_id"  # the custom_args key adapters/sendgrid.py sets
DEFAULT_MAX_AGE = 300.0  # seconds; SendGrid documents no window, 5 minutes is the usual one

EVENT_TYPES: dict[str, int] = {
    "processed": ET.EVENT_TYPE_SENT,
    "deferred": ET.EVENT_TYPE_DEFERRED,
    "delivered": ET.EVENT_TYPE_DELIVERED,
    "bounce": ET.EVENT_TYPE_BOUNCED,  # `type` says bounce or blocked; see _bounce
    "dropped": ET.EVENT_TYPE_REJECTED,  # SendGrid refused to send (suppressed, invalid, ...)
    "open": ET.EVENT_TYPE_OPENED,
    "click": ET.EVENT_TYPE_CLICKED,
    "spamreport": ET.EVENT_TYPE_COMPLAINED,
    "unsubscribe": ET.EVENT_TYPE_UNSUBSCRIBED,
    "group_unsubscribe": ET.EVENT_TYPE_UNSUBSCRIBED,
    # group_resubscribe, account_status_change and anything new: EVENT_TYPE_UNKNOWN
}

# SendGrid's bounce and block classifications. Only "Invalid Address" says the mailbox does not
# exist; the others blame the sender, the content or a passing state of the mailbox, so the
# address must not be suppressed. "Unclassified" (or none) leaves it to `type`.
HARD_CLASSIFICATIONS = frozenset({"Invalid Address"})
SOFT_CLASSIFICATIONS = frozenset(
    {"Mailbox Unavailable", "Technical", "Content", "Reputation", "Frequency or Volume"}
)


class SendGridReceiver(Receiver):
    """Verifies SendGrid's signature and freshness, then maps each event of the array."""

    kind = "sendgrid"
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
        self.public_key = _public_key(account.name, settings.secret)
        self.max_age = _max_age(account.name, settings.options.get("max_age", DEFAULT_MAX_AGE))

    async def receive(self, request: WebhookRequest) -> Received:
        self._authenticate(request)
        body = parse_json(request.body)
        if not isinstance(body, list):
            raise BadRequest("body is not a JSON array of events")
        received = Received()
        for index, item in enumerate(body):
            try:
                received.events.append(_event(item))
            except ValueError as exc:
                log.warning("esp %s: skipped SendGrid event %d: %s", self.account.name, index, exc)
                received.skipped += 1
        return received

    def _authenticate(self, request: WebhookRequest) -> None:
        """Signature first (401), then the signed timestamp's age (403)."""
        signature = request.headers.get(SIGNATURE_HEADER, "")
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not signature or not timestamp:
            raise Unauthorized(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
        try:
            der = base64.b64decode(signature, validate=True)
            signed = timestamp.encode("ascii") + request.body
            self.public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except (binascii.Error, UnicodeEncodeError, ValueError, InvalidSignature):
            raise Unauthorized("signature does not verify") from None
        if self.max_age and not _fresh(timestamp, self.clock(), self.max_age):
            raise Forbidden(f"timestamp {timestamp[:20]!r} is outside ±{self.max_age:g}s")


def _public_key(account: str, secret: str) -> ec.EllipticCurvePublicKey:
    """The verification key from its base64 DER (as SendGrid shows it) or from PEM."""
    where = f"esp {account}: [esp.webhook] secret (SendGrid's verification key)"
    if not secret:
        raise ValueError(f"{where} is required: set secret_env or secret_file")
    try:
        if secret.lstrip().startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(secret.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(secret, validate=True))
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{where} is not a base64 DER or PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{where} is not an ECDSA P-256 public key")
    return key


def _max_age(account: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"esp {account}: [esp.webhook] max_age must be seconds >= 0 (0: off)")
    return float(value)


def _fresh(timestamp: str, now: float, max_age: float) -> bool:
    """Whether the signed Unix time is within max_age of now, either way (clocks drift)."""
    if not timestamp.isdigit():
        return False
    return abs(now - int(timestamp)) <= max_age


def _event(item: Any) -> ProviderEvent:
    """One SendGrid event in the one event model; ValueError when it cannot be read."""
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    name = item.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("no event name")
    when = _time(item.get("timestamp"))
    kind = EVENT_TYPES.get(name, ET.EVENT_TYPE_UNKNOWN)
    recipient = _text(item, "email")
    esp_message_id = _text(item, "sg_message_id")
    return ProviderEvent(
        type=kind,
        time=when,
        provider_event_id=_text(item, "sg_event_id")
        or stable_event_id(name, when, recipient, esp_message_id, _text(item, "url")),
        message_id=_text(item, MESSAGE_ID_FIELD),
        provider_type=name,
        recipient=recipient,
        esp_message_id=esp_message_id,
        bounce=_bounce(item) if kind == ET.EVENT_TYPE_BOUNCED else 0,
        reason=_text(item, "bounce_classification" if name == "bounce" else "reason"),
        # a bounce's `reason` is the receiving server's reply; elsewhere it is `response`
        response=_text(item, "reason" if name == "bounce" else "response"),
        url=_text(item, "url") if kind == ET.EVENT_TYPE_CLICKED else "",
        user_agent=_text(item, "useragent"),
    )


def _bounce(item: Mapping[str, Any]) -> int:
    """Hard or soft: the classification when it is a known one, else bounce (hard) / blocked."""
    classification = item.get("bounce_classification")
    if classification in HARD_CLASSIFICATIONS:
        return BOUNCE_HARD
    if classification in SOFT_CLASSIFICATIONS:
        return BOUNCE_SOFT
    return BOUNCE_SOFT if item.get("type") == "blocked" else BOUNCE_HARD


def _time(value: Any) -> float:
    """The event's `timestamp`: Unix seconds, a number (or, in one documented case, a string)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str) and value.isdigit():
        return float(value)
    raise ValueError(f"timestamp {value!r} is not a Unix time")


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
