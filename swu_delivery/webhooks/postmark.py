"""Postmark webhooks: check the configured credentials, then read the one event of the request.

Postmark signs nothing. Its webhooks carry HTTP Basic credentials (`HttpAuth`, or
`https://user:password@host/...` in the URL) and/or custom headers (`HttpHeaders`), so the
account configures `username` (Basic, the secret is the password) and/or `header` (a header
whose value is the secret). Each request is one JSON object with a `RecordType`; our message id
comes back in `Metadata.swu_message_id`, which adapters/postmark.py sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.auth import (
    basic_username,
    check_basic_auth,
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

__all__ = ["PostmarkReceiver"]

log = logging.getLogger(__name__)

MESSAGE_ID_KEY = "swu_message_id"  # the Metadata key adapters/postmark.py sets

# RecordType -> (our type, the field holding its ISO 8601 time). Bounce and SubscriptionChange
# are refined below; any other RecordType is EVENT_TYPE_UNKNOWN.
RECORD_TYPES: dict[str, tuple[int, str]] = {
    "Delivery": (ET.EVENT_TYPE_DELIVERED, "DeliveredAt"),
    "Bounce": (ET.EVENT_TYPE_BOUNCED, "BouncedAt"),
    "SpamComplaint": (ET.EVENT_TYPE_COMPLAINED, "BouncedAt"),
    "Open": (ET.EVENT_TYPE_OPENED, "ReceivedAt"),
    "Click": (ET.EVENT_TYPE_CLICKED, "ReceivedAt"),
    "SubscriptionChange": (ET.EVENT_TYPE_UNSUBSCRIBED, "ChangedAt"),
}
TIME_FIELDS = ("DeliveredAt", "BouncedAt", "ReceivedAt", "ChangedAt")

# Bounce `Type` (the Bounce API's bounce-type table) -> (our type, bounce kind). Only a
# mailbox that does not exist or an invalid address is hard; the others are passing, or blame
# the sender or content, so the address must not be suppressed. Types that are no delivery
# failure at all (auto-replies, address-change notices, ...) are EVENT_TYPE_UNKNOWN.
BOUNCE_TYPES: dict[str, tuple[int, int]] = {
    "HardBounce": (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "BadEmailAddress": (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "Transient": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "SoftBounce": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "DnsError": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "Blocked": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),  # ISP block: content or blacklisting
    "DMARCPolicy": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "SpamNotification": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "VirusNotification": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "Unknown": (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),  # an NDR Postmark could not classify
    "SpamComplaint": (ET.EVENT_TYPE_COMPLAINED, 0),
    "Unsubscribe": (ET.EVENT_TYPE_UNSUBSCRIBED, 0),
    "ManuallyDeactivated": (ET.EVENT_TYPE_REJECTED, 0),  # Postmark will not send to it
    "Unconfirmed": (ET.EVENT_TYPE_REJECTED, 0),
    "SMTPApiError": (ET.EVENT_TYPE_REJECTED, 0),  # SMTP send to an inactive recipient
    "TemplateRenderingFailed": (ET.EVENT_TYPE_FAILED, 0),
}
BOUNCE_CODES = {1: "HardBounce", 2: "Transient", 4096: "SoftBounce", 100000: "BadEmailAddress"}

# SubscriptionChange with SuppressSending: the recipient's (or the customer's) unsubscribe is
# ManualSuppression; the other reasons repeat a bounce or complaint as a suppression.
SUPPRESSION_REASONS: dict[str, tuple[int, int]] = {
    "HardBounce": (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "SpamComplaint": (ET.EVENT_TYPE_COMPLAINED, 0),
}


class PostmarkReceiver(Receiver):
    """Checks Basic credentials and/or a secret header, then maps the request's one event."""

    kind = "postmark"
    option_keys: ClassVar[frozenset[str]] = frozenset({"username", "header"})

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        options = settings.options
        self.username = (
            basic_username(account.name, "username", options["username"])
            if "username" in options
            else ""
        )
        self.header = (
            header_name(account.name, "header", options["header"]) if "header" in options else ""
        )
        if not (self.username or self.header):
            raise ValueError(
                f"esp {account.name}: [esp.webhook] for Postmark needs username (HTTP Basic) "
                "and/or header (a custom header carrying the secret)"
            )
        if not settings.secret:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] secret is required (the Basic password "
                "or header value): set secret_env or secret_file"
            )

    async def receive(self, request: WebhookRequest) -> Received:
        if self.username:
            check_basic_auth(request.headers, self.username, self.settings.secret)
        if self.header:
            check_secret_header(request.headers, self.header, self.settings.secret)
        body = parse_json(request.body)
        if not isinstance(body, dict):
            raise BadRequest("body is not a Postmark event (a JSON object)")
        try:
            return Received(events=[_event(body)])
        except ValueError as exc:
            log.warning("esp %s: skipped Postmark event: %s", self.account.name, exc)
            return Received(skipped=1)


def _event(item: Mapping[str, Any]) -> ProviderEvent:
    """One Postmark record in the one event model; ValueError when it cannot be read."""
    record = item.get("RecordType")
    if not isinstance(record, str) or not record:
        raise ValueError("no RecordType")
    kind, time_field = RECORD_TYPES.get(record, (ET.EVENT_TYPE_UNKNOWN, ""))
    raw_time, when = _time(item, time_field)
    bounce = 0
    if record == "Bounce":
        kind, bounce = _bounce(item)
    elif record == "SubscriptionChange":
        kind, bounce = _subscription_change(item)
    recipient = _text(item, "Recipient") or _text(item, "Email")
    esp_message_id = _text(item, "MessageID")
    url = _text(item, "OriginalLink")
    event_id = item.get("ID")  # Bounce and SpamComplaint records have one
    if not isinstance(event_id, int | str) or isinstance(event_id, bool) or event_id == "":
        event_id = stable_event_id(
            record, esp_message_id, recipient, raw_time, url, item.get("SuppressSending")
        )
    return ProviderEvent(
        type=kind,
        time=when,
        provider_event_id=str(event_id),
        message_id=_message_id(item),
        provider_type=record,
        recipient=recipient,
        esp_message_id=esp_message_id,
        bounce=bounce,
        reason=_reason(item),
        response=_text(item, "Details"),
        url=url,
        user_agent=_text(item, "UserAgent"),
    )


def _bounce(item: Mapping[str, Any]) -> tuple[int, int]:
    """A Bounce record's type and kind, by its `Type` (or, without one, its `TypeCode`)."""
    code = item.get("TypeCode")
    name = _text(item, "Type") or (BOUNCE_CODES.get(code, "") if isinstance(code, int) else "")
    return BOUNCE_TYPES.get(name, (ET.EVENT_TYPE_UNKNOWN, 0))


def _subscription_change(item: Mapping[str, Any]) -> tuple[int, int]:
    """Suppressed: unsubscribed (or the bounce/complaint behind it); reactivated: unknown."""
    if item.get("SuppressSending") is not True:
        return ET.EVENT_TYPE_UNKNOWN, 0
    reason = _text(item, "SuppressionReason")
    return SUPPRESSION_REASONS.get(reason, (ET.EVENT_TYPE_UNSUBSCRIBED, 0))


def _reason(item: Mapping[str, Any]) -> str:
    """Postmark's classification: `Type: Description` of a bounce, or a suppression reason."""
    if "SuppressionReason" in item:
        origin = _text(item, "Origin")
        reason = _text(item, "SuppressionReason")
        return f"{reason} (by {origin})" if reason and origin else reason
    kind, description = _text(item, "Type"), _text(item, "Description")
    return f"{kind}: {description}" if kind and description else kind or description


def _message_id(item: Mapping[str, Any]) -> str:
    metadata = item.get("Metadata")
    return _text(metadata, MESSAGE_ID_KEY) if isinstance(metadata, dict) else ""


def _time(item: Mapping[str, Any], field: str) -> tuple[str, float]:
    """The record's ISO 8601 timestamp (raw, and as epoch seconds); naive times count as UTC."""
    fields = (field,) if field else TIME_FIELDS
    raw = next((item[f] for f in fields if isinstance(item.get(f), str)), None)
    if raw is None:
        raise ValueError(f"no timestamp ({' or '.join(fields)})")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"timestamp {raw[:40]!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return raw, parsed.timestamp()


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
