"""Postmark (`POST /email/batch`): up to 500 distinct messages per call, one result per message.

Postmark answers a batch with HTTP 200 and one item per message, in request order, each with its
own `ErrorCode` (0 = accepted with a `MessageID`), so one bad message fails alone. Whole-request
problems (bad token 401, unparseable body 422) and throttling (429) or outages (5xx) come back
as HTTP errors and are classified by the base.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any, ClassVar

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

__all__ = ["PostmarkAdapter"]

MESSAGE_ID_KEY = "swu_message_id"  # Metadata key; Postmark echoes Metadata in every webhook
TAGS_KEY = "swu_tags"  # Metadata key holding every tag when a message has more than one
MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # one message, attachments counted base64-encoded
MAX_BODY_BYTES = 5 * 1024 * 1024  # TextBody and HtmlBody, each
# Per-message ErrorCodes worth another attempt: 100 maintenance, 429 rate limit exceeded.
# Every other non-zero code (300 invalid request, 406 inactive recipient, 405 not allowed to
# send, 411 forbidden attachment type, ...) fails the same way on every retry.
RETRYABLE_CODES = frozenset({100, 429})
# A display name made only of these characters needs no quoting (RFC 5322 atext plus spaces).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")


def _address(box: Mailbox) -> str:
    """`Name <addr>`, quoting the name when it holds specials (commas, dots, quotes...)."""
    name = box.name.strip()
    if not name:
        return box.email
    if not _PLAIN_NAME.fullmatch(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{box.email}>"


def _addresses(boxes: Sequence[Mailbox]) -> str:
    return ", ".join(_address(box) for box in boxes)


def _too_big(text: str, limit: int) -> bool:
    # UTF-8 needs at most 4 bytes a character, so most texts are cleared without encoding.
    return len(text) * 4 > limit and len(text.encode()) > limit


class PostmarkAdapter(HttpAdapter):
    """Packs distinct rendered messages into batches; per-message ErrorCodes become outcomes."""

    kind = "postmark"
    display_name = "Postmark"
    option_keys = frozenset({"message_stream"})
    default_base_url = "https://api.postmarkapp.com"
    # 500 messages and 50 MB (attachments included, base64-encoded) per batch; 50 recipients
    # (To + Cc + Bcc) per message. The 10 MB per-message limit is checked in precheck().
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=500, recipients_per_message=50, bytes_per_call=50 * 1024 * 1024
    )
    retry_after_headers = ("Retry-After",)  # Postmark documents none; honoured if ever sent

    def __init__(self, account: EspAccount) -> None:
        super().__init__(account)
        stream = account.options.get("message_stream", "outbound")
        if not isinstance(stream, str) or not stream:
            raise AdapterError(f"esp {account.name}: message_stream must be a non-empty string")
        self.message_stream = stream

    def auth_headers(self) -> dict[str, str]:
        # Postmark answers ErrorCode 409 "JSON required" without an application/json Accept.
        return {"X-Postmark-Server-Token": self.account.api_key, "Accept": "application/json"}

    def precheck(self, email: OutboundEmail) -> SendOutcome | None:
        outcome = super().precheck(email)
        if outcome is not None:
            return outcome
        size = email.estimated_size()
        if size > MAX_MESSAGE_BYTES:
            return SendOutcome.rejected(
                f"Postmark: message is {size} bytes with attachments base64-encoded; "
                f"the limit is {MAX_MESSAGE_BYTES} per message"
            )
        for field, text in (("HtmlBody", email.html), ("TextBody", email.text)):
            if _too_big(text, MAX_BODY_BYTES):
                return SendOutcome.rejected(f"Postmark: {field} is over {MAX_BODY_BYTES} bytes")
        return None

    def message(self, email: OutboundEmail) -> dict[str, Any]:
        """One Postmark message object."""
        metadata = {k: v for k, v in email.metadata.items() if k.lower() != MESSAGE_ID_KEY}
        payload: dict[str, Any] = {
            "From": _address(email.sender),
            "To": _address(email.to),
            "Subject": email.subject,
            "MessageStream": self.message_stream,
        }
        if email.cc:
            payload["Cc"] = _addresses(email.cc)
        if email.bcc:
            payload["Bcc"] = _addresses(email.bcc)
        if email.reply_to is not None:
            payload["ReplyTo"] = _address(email.reply_to)
        if email.html:
            payload["HtmlBody"] = email.html
        if email.text:
            payload["TextBody"] = email.text
        if email.headers:
            payload["Headers"] = [{"Name": k, "Value": v} for k, v in email.headers.items()]
        if email.tags:
            payload["Tag"] = email.tags[0]  # Postmark allows one tag per message
            if len(email.tags) > 1:
                metadata = {k: v for k, v in metadata.items() if k.lower() != TAGS_KEY}
                metadata[TAGS_KEY] = ",".join(email.tags)
        payload["Metadata"] = {**metadata, MESSAGE_ID_KEY: email.message_id}
        if email.attachments:
            payload["Attachments"] = [
                {
                    "Name": a.filename,
                    "Content": base64.b64encode(a.content).decode(),
                    "ContentType": a.content_type,
                    **({"ContentID": f"cid:{a.content_id}"} if a.content_id else {}),
                }
                for a in email.attachments
            ]
        return payload

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        # Always the batch endpoint, even for one message: its per-item answer is one code path.
        return HttpRequest(path="/email/batch", json=[self.message(email) for email in call])

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        items = response.json()
        if not isinstance(items, list) or len(items) != len(call):
            reason = f"Postmark {response.status}: unexpected batch answer: {response.text(120)}"
            return [SendOutcome.retry(reason)] * len(call)
        return [self._item_outcome(item) for item in items]

    def _item_outcome(self, item: Any) -> SendOutcome:
        item = item if isinstance(item, dict) else {}
        code, message_id = item.get("ErrorCode", 0), item.get("MessageID")
        # ErrorCode may be absent when Postmark accepts a message but delays its delivery.
        if code == 0 and isinstance(message_id, str) and message_id:
            return SendOutcome.sent(message_id)
        reason = f"Postmark ErrorCode {code}: {item.get('Message', '')}".rstrip(": ")
        if code in RETRYABLE_CODES:
            return SendOutcome.retry(reason, rate_limited=code == 429)
        if code == 0:  # "OK" without a MessageID: we cannot tell, so try again
            return SendOutcome.retry(f"Postmark: accepted without a MessageID: {item}")
        return SendOutcome.rejected(reason)

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and "Message" in body:
            return f"ErrorCode {body.get('ErrorCode')}: {body['Message']}"
        return response.text()
