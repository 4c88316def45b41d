"""Mailjet Send API v3.1 (`POST /v3.1/send`): up to 50 distinct messages per call.

Each message carries our id as `CustomID` and, with the metadata, in `EventPayload`; Mailjet echoes
both in every webhook event (`CustomID`, `Payload`). The answer lists one result per message, in
request order, and a batch is not atomic: one call can hold sent and refused messages, whatever
the HTTP status (a 400 may carry sent messages too), so outcomes are always read per message.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import orjson

from adapters.base import (
    AdapterError,
    BatchLimits,
    HttpAdapter,
    HttpRequest,
    HttpResponse,
    Mailbox,
    OutboundEmail,
    SendOutcome,
)
from swu_delivery.config import EspAccount

__all__ = ["MailjetAdapter"]

MESSAGE_ID_KEY = "swu_message_id"  # EventPayload key; CustomID carries the same id
TAGS_KEY = "swu_tags"  # EventPayload key for the tags: Send API v3.1 has no tag field


def _mailbox(box: Mailbox) -> dict[str, str]:
    return {"Email": box.email, "Name": box.name} if box.name else {"Email": box.email}


def _attachment(filename: str, content_type: str, content: bytes) -> dict[str, str]:
    return {
        "ContentType": content_type,
        "Filename": filename,
        "Base64Content": base64.b64encode(content).decode(),
    }


class MailjetAdapter(HttpAdapter):
    """Packs distinct messages into one `Messages` array and reads one result per message."""

    kind = "mailjet"
    display_name = "Mailjet"
    option_keys = frozenset({"api_key_public", "custom_campaign"})
    default_base_url = "https://api.mailjet.com"
    # Send API v3.1: 50 messages per call, 50 recipients per message (To + Cc + Bcc), and all
    # attachments of a message (inline included) at most 15 MB.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=50, recipients_per_message=50, bytes_per_call=15 * 1024 * 1024
    )

    def __init__(self, account: EspAccount) -> None:
        super().__init__(account)
        public_key = account.options.get("api_key_public")
        if not isinstance(public_key, str) or not public_key:
            raise AdapterError(
                f"esp {account.name}: api_key_public (Mailjet's API key) is required"
            )
        if not account.api_key:
            raise AdapterError(f"esp {account.name}: the secret key (api_key_env) is required")
        self._public_key = public_key
        campaign = account.options.get("custom_campaign", "")
        if not isinstance(campaign, str):
            raise AdapterError(f"esp {account.name}: custom_campaign must be a string")
        self._campaign = campaign

    def auth_headers(self) -> dict[str, str]:
        pair = f"{self._public_key}:{self.account.api_key}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        return HttpRequest(path="/v3.1/send", json={"Messages": [self._message(e) for e in call]})

    def _message(self, email: OutboundEmail) -> dict[str, Any]:
        payload: dict[str, Any] = {**email.metadata, MESSAGE_ID_KEY: email.message_id}
        if email.tags:
            payload[TAGS_KEY] = list(email.tags)
        message: dict[str, Any] = {
            "From": _mailbox(email.sender),
            "To": [_mailbox(email.to)],
            "Subject": email.subject,
            "CustomID": email.message_id,
            "EventPayload": orjson.dumps(payload).decode(),
        }
        if email.cc:
            message["Cc"] = [_mailbox(b) for b in email.cc]
        if email.bcc:
            message["Bcc"] = [_mailbox(b) for b in email.bcc]
        if email.reply_to is not None:
            message["ReplyTo"] = _mailbox(email.reply_to)
        if email.text:
            message["TextPart"] = email.text
        if email.html:
            message["HTMLPart"] = email.html
        if email.headers:
            message["Headers"] = dict(email.headers)
        if campaign := self._campaign or (email.tags[0] if email.tags else ""):
            message["CustomCampaign"] = campaign
        files = [a for a in email.attachments if not a.content_id]
        inline = [a for a in email.attachments if a.content_id]
        if files:
            message["Attachments"] = [
                _attachment(a.filename, a.content_type, a.content) for a in files
            ]
        if inline:
            message["InlinedAttachments"] = [
                {**_attachment(a.filename, a.content_type, a.content), "ContentID": a.content_id}
                for a in inline
            ]
        return message

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        outcomes = self._per_message(call, response)
        if outcomes is None:
            reason = f"Mailjet {response.status}: no per-message results in {response.text()!r}"
            return [SendOutcome.retry(reason)] * len(call)
        return outcomes

    def classify_error(
        self, call: list[OutboundEmail], response: HttpResponse
    ) -> list[SendOutcome]:
        """Per-message results when the body has them (a partly refused batch), else by status."""
        outcomes = self._per_message(call, response)
        return super().classify_error(call, response) if outcomes is None else outcomes

    def _per_message(
        self, call: list[OutboundEmail], response: HttpResponse
    ) -> list[SendOutcome] | None:
        body = response.json()
        results = body.get("Messages") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(call):
            return None
        return [self._outcome(r if isinstance(r, dict) else {}) for r in results]

    def _outcome(self, result: dict[str, Any]) -> SendOutcome:
        if result.get("Status") == "success":
            to = result.get("To")
            first = to[0] if isinstance(to, list) and to and isinstance(to[0], dict) else {}
            return SendOutcome.sent(str(first.get("MessageUUID") or first.get("MessageID", "")))
        errors = [e for e in result.get("Errors") or () if isinstance(e, dict)]
        statuses = [s for e in errors if isinstance(s := e.get("StatusCode"), int)] or [400]
        detail = "; ".join(map(_describe, errors)) or f"Status {result.get('Status')!r}"
        reason = f"Mailjet {statuses[0]}: {detail}"
        # Retry only when every error is transient; one permanent error will recur as it is.
        if all(s in (408, 429) or s >= 500 for s in statuses):
            return SendOutcome.retry(reason, rate_limited=429 in statuses)
        return SendOutcome.rejected(reason)

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        return _describe(body) if isinstance(body, dict) else response.text()


def _describe(error: dict[str, Any]) -> str:
    """`send-0008 From: "x" is not an authorized sender` from one Mailjet error object."""
    code, message = error.get("ErrorCode") or "", error.get("ErrorMessage") or ""
    related = error.get("ErrorRelatedTo")
    where = ", ".join(map(str, related)) if isinstance(related, list) else ""
    return " ".join(
        part for part in (str(code), f"{where}:" if where else "", str(message)) if part
    )
