"""SendGrid v3 Mail Send (`POST /v3/mail/send`): one request per distinct rendered message."""

from __future__ import annotations

import base64
from typing import Any, ClassVar

from adapters.base import (
    BatchLimits,
    HttpAdapter,
    HttpRequest,
    HttpResponse,
    Mailbox,
    OutboundEmail,
    SendOutcome,
)

__all__ = ["SendGridAdapter"]

MESSAGE_ID_ARG = "swu_message_id"  # custom_args key; SendGrid echoes it in every event


def _mailbox(box: Mailbox) -> dict[str, str]:
    return {"email": box.email, "name": box.name} if box.name else {"email": box.email}


class SendGridAdapter(HttpAdapter):
    """Content is shared by all personalizations, so distinct bodies mean one call each."""

    kind = "sendgrid"
    display_name = "SendGrid"
    default_base_url = "https://api.sendgrid.com"
    # SendGrid: ≤1000 recipients per request, 30 MB per message including attachments.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=1000, bytes_per_call=30 * 1024 * 1024
    )
    retry_after_headers = ("X-RateLimit-Reset", "Retry-After")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.account.api_key}"}

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        (email,) = call
        personalization: dict[str, Any] = {
            "to": [_mailbox(email.to)],
            "custom_args": {**email.metadata, MESSAGE_ID_ARG: email.message_id},
        }
        if email.cc:
            personalization["cc"] = [_mailbox(b) for b in email.cc]
        if email.bcc:
            personalization["bcc"] = [_mailbox(b) for b in email.bcc]
        content = []
        if email.text:
            content.append({"type": "text/plain", "value": email.text})
        if email.html:
            content.append({"type": "text/html", "value": email.html})
        payload: dict[str, Any] = {
            "personalizations": [personalization],
            "from": _mailbox(email.sender),
            "subject": email.subject,
            "content": content,
        }
        if email.reply_to is not None:
            payload["reply_to"] = _mailbox(email.reply_to)
        if email.headers:
            payload["headers"] = dict(email.headers)
        if email.tags:
            payload["categories"] = list(email.tags)
        if email.attachments:
            payload["attachments"] = [
                {
                    "content": base64.b64encode(a.content).decode(),
                    "filename": a.filename,
                    "type": a.content_type,
                    "disposition": "inline" if a.content_id else "attachment",
                    **({"content_id": a.content_id} if a.content_id else {}),
                }
                for a in email.attachments
            ]
        return HttpRequest(path="/v3/mail/send", json=payload)

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        return [SendOutcome.sent(response.headers.get("X-Message-Id", ""))]

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("errors"), list):
            parts = []
            for err in body["errors"]:
                if isinstance(err, dict):
                    field = err.get("field")
                    message = str(err.get("message", ""))
                    parts.append(f"{field}: {message}" if field else message)
            if parts:
                return "; ".join(parts)
        return response.text()
