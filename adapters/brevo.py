"""Brevo (ex-Sendinblue) transactional email (`POST /v3/smtp/email`): one message per call.

Our id travels in the `X-Mailin-custom` header as JSON with the metadata; Brevo echoes that header
and the `tags` in every transactional webhook event. `messageVersions` could carry up to 1000
messages with their own subject and bodies, but headers, tags and attachments are shared by all
versions, so per-message ids (and per-message attachments) cannot ride in one call: one call each.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import orjson

from adapters.base import (
    BatchLimits,
    HttpAdapter,
    HttpRequest,
    HttpResponse,
    Mailbox,
    OutboundEmail,
    SendOutcome,
)

__all__ = ["BrevoAdapter"]

CUSTOM_HEADER = "X-Mailin-custom"  # echoed verbatim as "X-Mailin-custom" in webhook events
MESSAGE_ID_KEY = "swu_message_id"  # key of our id inside the X-Mailin-custom JSON


def _mailbox(box: Mailbox) -> dict[str, str]:
    return {"email": box.email, "name": box.name} if box.name else {"email": box.email}


class BrevoAdapter(HttpAdapter):
    """One request per message; 201 `{"messageId": "<…>"}` on success, `{code, message}` else."""

    kind = "brevo"
    display_name = "Brevo"
    default_base_url = "https://api.brevo.com"
    # 99 recipients per message version (the documented per-message cap) and 20 MB per email,
    # attachments and content included.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=99, bytes_per_call=20 * 1024 * 1024
    )
    # 429 carries x-sib-ratelimit-reset: seconds until the window resets.
    retry_after_headers = ("x-sib-ratelimit-reset", "Retry-After")

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.account.api_key}

    def precheck(self, email: OutboundEmail) -> SendOutcome | None:
        """Brevo's attachment object has no Content-ID: inline images would arrive broken."""
        inline = [a.filename for a in email.attachments if a.content_id]
        if inline:
            return SendOutcome.rejected(
                f"Brevo: inline attachments (Content-ID) are not supported by its API: "
                f"{', '.join(inline)}"
            )
        return super().precheck(email)

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        (email,) = call
        custom = {**email.metadata, MESSAGE_ID_KEY: email.message_id}
        payload: dict[str, Any] = {
            "sender": _mailbox(email.sender),
            "to": [_mailbox(email.to)],
            "subject": email.subject,
            "headers": {
                **{k: v for k, v in email.headers.items() if k.lower() != CUSTOM_HEADER.lower()},
                CUSTOM_HEADER: orjson.dumps(custom).decode(),
            },
        }
        if email.cc:
            payload["cc"] = [_mailbox(b) for b in email.cc]
        if email.bcc:
            payload["bcc"] = [_mailbox(b) for b in email.bcc]
        if email.reply_to is not None:
            payload["replyTo"] = _mailbox(email.reply_to)
        if email.html:
            payload["htmlContent"] = email.html
        if email.text:
            payload["textContent"] = email.text
        if email.tags:
            payload["tags"] = list(email.tags)
        if email.attachments:
            payload["attachment"] = [
                {"content": base64.b64encode(a.content).decode(), "name": a.filename}
                for a in email.attachments
            ]
        return HttpRequest(path="/v3/smtp/email", json=payload)

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        body = response.json()
        message_id = body.get("messageId") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            # Accepted (2xx) yet unidentified: retrying could send twice, so record it as sent.
            return [SendOutcome.sent("")]
        return [SendOutcome.sent(message_id)]

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and ("code" in body or "message" in body):
            code, message = body.get("code") or "", body.get("message") or ""
            return f"{code}: {message}" if code and message else str(code or message)
        return response.text()
