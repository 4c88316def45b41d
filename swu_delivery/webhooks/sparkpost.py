"""SparkPost event webhooks: check the configured credentials, then read each event of a batch.

SparkPost signs nothing. A webhook authenticates with HTTP Basic credentials (`auth_type`
basic) and/or `custom_headers`, so the account configures `username` (Basic, the secret is the
password) and/or `header` (a header whose value is the secret). A batch is a JSON array of
`{"msys": {"<class>_event": {...}}}`; `[{"msys": {}}]` is the ping sent when a webhook is
created or validated. Our message id comes back in `rcpt_meta.swu_message_id` (transmission
metadata merged with the recipient's), which adapters/sparkpost.py sets in `metadata`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.auth import (
    check_basic_auth,
    check_secret_header,
    header_name,
    option_text,
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

__all__ = ["SparkPostReceiver"]

log = logging.getLogger(__name__)

MESSAGE_ID_KEY = "swu_message_id"  # the metadata key adapters/sparkpost.py sets

# Event `type` -> ours. bounce and out_of_band are refined by `bounce_class` below; anything
# else (sms_status, relay_*, ab_test_*, ingest success/error, new types) is EVENT_TYPE_UNKNOWN.
EVENT_TYPES: dict[str, int] = {
    "injection": ET.EVENT_TYPE_SENT,
    "delivery": ET.EVENT_TYPE_DELIVERED,
    "delay": ET.EVENT_TYPE_DEFERRED,
    "bounce": ET.EVENT_TYPE_BOUNCED,
    "out_of_band": ET.EVENT_TYPE_BOUNCED,  # a bounce after the receiver had accepted it
    "policy_rejection": ET.EVENT_TYPE_REJECTED,  # SparkPost refused it (policy, suppression)
    "generation_rejection": ET.EVENT_TYPE_REJECTED,
    "generation_failure": ET.EVENT_TYPE_FAILED,  # the message could not be generated
    "spam_complaint": ET.EVENT_TYPE_COMPLAINED,
    "open": ET.EVENT_TYPE_OPENED,
    "initial_open": ET.EVENT_TYPE_OPENED,
    "amp_open": ET.EVENT_TYPE_OPENED,
    "amp_initial_open": ET.EVENT_TYPE_OPENED,
    "click": ET.EVENT_TYPE_CLICKED,
    "amp_click": ET.EVENT_TYPE_CLICKED,
    "list_unsubscribe": ET.EVENT_TYPE_UNSUBSCRIBED,
    "link_unsubscribe": ET.EVENT_TYPE_UNSUBSCRIBED,
}

# Bounce classification codes (SparkPost's table: name, category) -> (our type, bounce kind).
# Only the "Hard" invalid-recipient classes are hard bounces. Class 90 ("Hard") is an
# unsubscribe request mailed back, 25 ("Admin") SparkPost's own refusal, 60/80/100 are
# replies rather than failures; every other class (Soft, Block, Undetermined) is soft.
BOUNCE_CLASSES: dict[str, tuple[str, int, int]] = {
    "1": ("Undetermined", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "10": ("Invalid Recipient", ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "20": ("Soft Bounce", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "21": ("DNS Failure", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "22": ("Mailbox Full", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "23": ("Too Large", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "24": ("Timeout", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "25": ("Admin Failure", ET.EVENT_TYPE_REJECTED, 0),
    "30": ("Generic Bounce: No RCPT", ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
    "40": ("Generic Bounce", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "50": ("Mail Block", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "51": ("Spam Block", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "52": ("Spam Content", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "53": ("Prohibited Attachment", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "54": ("Relaying Denied", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "60": ("Auto-Reply", ET.EVENT_TYPE_UNKNOWN, 0),
    "70": ("Transient Failure", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
    "80": ("Subscribe", ET.EVENT_TYPE_UNKNOWN, 0),
    "90": ("Unsubscribe", ET.EVENT_TYPE_UNSUBSCRIBED, 0),
    "100": ("Challenge-Response", ET.EVENT_TYPE_UNKNOWN, 0),
}
NOT_A_COMPLAINT = "not-spam"  # an ARF feedback type saying the opposite of a complaint


class SparkPostReceiver(Receiver):
    """Checks Basic credentials and/or a secret header, then maps each event of the batch."""

    kind = "sparkpost"
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
            option_text(account.name, "username", options["username"])
            if "username" in options
            else ""
        )
        self.header = (
            header_name(account.name, "header", options["header"]) if "header" in options else ""
        )
        if not (self.username or self.header):
            raise ValueError(
                f"esp {account.name}: [esp.webhook] for SparkPost needs username (HTTP Basic) "
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
        batch = parse_json(request.body)
        if not isinstance(batch, list):
            raise BadRequest("body is not a SparkPost batch (a JSON array)")
        received = Received()
        for index, item in enumerate(batch):
            try:
                if (event := _unwrap(item)) is not None:
                    received.events.append(_event(event))
            except ValueError as exc:
                log.warning("esp %s: skipped SparkPost event %d: %s", self.account.name, index, exc)
                received.skipped += 1
        return received


def _unwrap(item: Any) -> Mapping[str, Any] | None:
    """The event inside `{"msys": {"<class>": {...}}}`; None for the empty ping `{"msys": {}}`."""
    msys = item.get("msys") if isinstance(item, dict) else None
    if not isinstance(msys, dict):
        raise ValueError("no msys object")
    if not msys:
        return None
    if len(msys) != 1:
        raise ValueError(f"{len(msys)} event classes in one msys object")
    (event,) = msys.values()
    if not isinstance(event, dict):
        raise ValueError("event class is not an object")
    return event


def _event(event: Mapping[str, Any]) -> ProviderEvent:
    """One SparkPost event in the one event model; ValueError when it cannot be read."""
    name = event.get("type")
    if not isinstance(name, str) or not name:
        raise ValueError("no type")
    raw_time, when = _time(event.get("timestamp"))
    kind, bounce = _classify(name, event)
    recipient = _text(event, "raw_rcpt_to") or _text(event, "rcpt_to")
    url = _text(event, "target_link_url")
    event_id = _text(event, "event_id") or stable_event_id(
        name, _text(event, "transmission_id"), recipient, raw_time, url
    )
    return ProviderEvent(
        type=kind,
        time=when,
        provider_event_id=event_id,
        message_id=_message_id(event),
        provider_type=name,
        recipient=recipient,
        esp_message_id=_text(event, "transmission_id"),
        bounce=bounce,
        reason=_reason(event),
        response=_text(event, "raw_reason") or _text(event, "reason"),
        url=url,
        user_agent=_text(event, "user_agent"),
    )


def _classify(name: str, event: Mapping[str, Any]) -> tuple[int, int]:
    """Our type and bounce kind: bounces by `bounce_class` (unknown classes are soft)."""
    kind = EVENT_TYPES.get(name, ET.EVENT_TYPE_UNKNOWN)
    if kind == ET.EVENT_TYPE_BOUNCED:
        _, kind, bounce = BOUNCE_CLASSES.get(
            _text(event, "bounce_class"), ("", ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)
        )
        return kind, bounce
    if kind == ET.EVENT_TYPE_COMPLAINED and _text(event, "fbtype") == NOT_A_COMPLAINT:
        return ET.EVENT_TYPE_UNKNOWN, 0
    return kind, 0


def _reason(event: Mapping[str, Any]) -> str:
    """The bounce class (`10 Invalid Recipient`) or complaint feedback type, else `reason`."""
    code = _text(event, "bounce_class")
    if code:
        name = BOUNCE_CLASSES.get(code, ("unknown class",))[0]
        return f"bounce class {code} ({name})"
    return _text(event, "fbtype") or _text(event, "reason")


def _message_id(event: Mapping[str, Any]) -> str:
    meta = event.get("rcpt_meta")
    return _text(meta, MESSAGE_ID_KEY) if isinstance(meta, dict) else ""


def _time(raw: Any) -> tuple[str, float]:
    """Webhook `timestamp`: Unix seconds (a number or a digit string); ISO 8601 is accepted too,
    as the Events API and the event samples write it. Returns (raw text, epoch seconds)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str) or raw == "":
        raise ValueError("no timestamp")
    text = str(raw)
    try:
        when = float(text)
    except ValueError:
        when = _iso_time(text)
    if not math.isfinite(when):
        raise ValueError(f"timestamp {text[:40]!r} is not finite")
    return text, when


def _iso_time(text: str) -> float:
    """An ISO 8601 time as epoch seconds; naive times count as UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"timestamp {text[:40]!r} is neither Unix seconds nor ISO 8601") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
