"""Mailjet Event API webhooks: check the Basic credentials, then read one event or a group.

Mailjet signs nothing. Its guide recommends HTTPS with Basic credentials in the endpoint URL
(`https://user:password@host/webhooks/<account>`), so the account configures `username` and
the secret is the password. A request is one event object, or, with grouping on (Event API
`Version` 2), a JSON array of the last second's events of mixed types. Mailjet gives events no
id: each gets `stable_event_id(...)` over what identifies it, so a retried request dedupes. Our
message id comes back as `CustomID` and inside the `Payload` JSON, both set by
adapters/mailjet.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import orjson

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.auth import basic_username, check_basic_auth
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

__all__ = ["MailjetReceiver"]

log = logging.getLogger(__name__)

MESSAGE_ID_KEY = "swu_message_id"  # the EventPayload key adapters/mailjet.py sets

# `event` -> our type. Mailjet's "sent" is sent when the recipient's server accepted the
# message, so it is a delivery, not our SENT (which the delivery lane records on the ESP's
# acceptance). "blocked": Mailjet did not send at all (pre-blocked address, duplicate in a
# campaign, ...). Bounces are refined below; any other name is EVENT_TYPE_UNKNOWN.
EVENT_TYPES: dict[str, int] = {
    "sent": ET.EVENT_TYPE_DELIVERED,
    "open": ET.EVENT_TYPE_OPENED,
    "click": ET.EVENT_TYPE_CLICKED,
    "bounce": ET.EVENT_TYPE_BOUNCED,
    "blocked": ET.EVENT_TYPE_REJECTED,
    "spam": ET.EVENT_TYPE_COMPLAINED,
    "unsub": ET.EVENT_TYPE_UNSUBSCRIBED,
}
# The error table says of this one "Delivery will be re-attempted": not a bounce yet.
RETRIED_ERRORS = frozenset({"greylisted"})


class MailjetReceiver(Receiver):
    """Checks the Basic credentials, then maps each event of the body."""

    kind = "mailjet"
    option_keys: ClassVar[frozenset[str]] = frozenset({"username"})

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        if "username" not in settings.options:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] for Mailjet needs username (the Basic "
                "user name in the endpoint URL Mailjet calls)"
            )
        self.username = basic_username(account.name, "username", settings.options["username"])
        if not settings.secret:
            raise ValueError(
                f"esp {account.name}: [esp.webhook] secret is required (the Basic password): "
                "set secret_env or secret_file"
            )

    async def receive(self, request: WebhookRequest) -> Received:
        check_basic_auth(request.headers, self.username, self.settings.secret)
        body = parse_json(request.body)
        if isinstance(body, dict):
            items: list[Any] = [body]
        elif isinstance(body, list):
            items = body
        else:
            raise BadRequest("body is not a Mailjet event (a JSON object) or a group (an array)")
        received = Received()
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ValueError("not a JSON object")
                received.events.append(_event(item))
            except ValueError as exc:
                received.skipped += 1
                log.warning("esp %s: skipped Mailjet event %d: %s", self.account.name, index, exc)
        return received


def _event(item: Mapping[str, Any]) -> ProviderEvent:
    """One Mailjet event in the one event model; ValueError when it cannot be read."""
    name = item.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("no event")
    raw_time, when = _time(item)
    kind, bounce = _type(name, item)
    recipient = _text(item, "email")
    esp_message_id = _esp_message_id(item)
    message_id = _message_id(item)
    url = _text(item, "url")
    user_agent = _text(item, "agent") or _text(item, "useragent")
    event_id = stable_event_id(
        name, esp_message_id or message_id, recipient, raw_time, url, _text(item, "ip"), user_agent
    )
    return ProviderEvent(
        type=kind,
        time=when,
        provider_event_id=event_id,
        message_id=message_id,
        provider_type=name,
        recipient=recipient,
        esp_message_id=esp_message_id,
        bounce=bounce,
        reason=_reason(name, item),
        response=_text(item, "comment") or _text(item, "smtp_reply"),
        url=url,
        user_agent=user_agent,
    )


def _type(name: str, item: Mapping[str, Any]) -> tuple[int, int]:
    """Our type and bounce kind: `hard_bounce` decides hard or soft; greylisting is deferred."""
    if name != "bounce":
        return EVENT_TYPES.get(name, ET.EVENT_TYPE_UNKNOWN), 0
    if item.get("hard_bounce") is True:
        return ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD
    if _text(item, "error") in RETRIED_ERRORS:
        return ET.EVENT_TYPE_DEFERRED, 0
    return ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT


def _reason(name: str, item: Mapping[str, Any]) -> str:
    """Mailjet's classification: `error_related_to: error` (+ blocking), or the complaint loop."""
    if name == "spam":
        source = _text(item, "source")
        return f"feedback loop {source}" if source else ""
    related, error = _text(item, "error_related_to"), _text(item, "error")
    reason = f"{related}: {error}" if related and error else related or error
    if name == "bounce" and item.get("blocked") is True:
        reason = f"{reason} (Mailjet now blocks the recipient)" if reason else "recipient blocked"
    return reason


def _message_id(item: Mapping[str, Any]) -> str:
    """Ours: `CustomID`, else `swu_message_id` in the `Payload` JSON; "" for other mail."""
    if custom_id := _text(item, "CustomID"):
        return custom_id
    payload = item.get("Payload")
    if isinstance(payload, str) and payload:
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ""
    return _text(payload, MESSAGE_ID_KEY) if isinstance(payload, dict) else ""


def _esp_message_id(item: Mapping[str, Any]) -> str:
    """`Message_GUID` (the MessageUUID the adapter records), else the numeric `MessageID`."""
    if guid := _text(item, "Message_GUID"):
        return guid
    number = item.get("MessageID")
    if isinstance(number, int | str) and not isinstance(number, bool) and number != "":
        return str(number)
    return _text(item, "mj_message_id")  # deprecated string copy; the grouped example has only it


def _time(item: Mapping[str, Any]) -> tuple[int | float, float]:
    """`time`: a Unix timestamp in seconds (raw, and as a float)."""
    raw = item.get("time")
    if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
        raise ValueError(f"time {str(raw)[:40]!r} is not a Unix timestamp")
    return raw, float(raw)


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
