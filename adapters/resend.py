"""Resend (`POST /emails/batch`, `POST /emails`): 100 messages per batch, attachments one by one.

Batches go out in Resend's permissive validation mode, so an invalid message is listed in the
answer's `errors` (by index) while the others are sent. Resend refuses attachments in batches,
so a message with attachments is sent alone to `POST /emails`. Every call carries an
`Idempotency-Key` derived from our message ids: a retried call is answered with the ids of the
first one instead of sending twice (Resend keeps keys 24 hours).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
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

__all__ = ["ResendAdapter"]

MESSAGE_ID_TAG = "swu_message_id"  # tag name; Resend echoes tags in every webhook event
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # tags allow ASCII letters, digits, _ and -
MAX_TAG_CHARS = 256
MAX_KEY_CHARS = 256  # Idempotency-Key: 1 to 256 characters
# Resend refuses quoted display names (RFC 5322 quoting of specials), so these are dropped.
_NAME_UNSAFE = re.compile(r'["\\<>,;:()\[\]@]')


def _tag_part(text: str) -> str:
    """`text` with the characters Resend refuses in tags replaced by `_`, cut to 256."""
    return _TAG_UNSAFE.sub("_", text)[:MAX_TAG_CHARS]


def _address(box: Mailbox) -> str:
    """`Name <addr>`, with the characters that would need quoting dropped from the name."""
    name = _NAME_UNSAFE.sub("", box.name).strip()
    return f"{name} <{box.email}>" if name else box.email


def _tags(email: OutboundEmail) -> list[dict[str, str]]:
    """Our tags (value "true"), metadata and message id as Resend name/value tags."""
    tags: dict[str, str] = {}
    for tag in email.tags:
        if name := _tag_part(tag):
            tags[name] = "true"
    for key, value in email.metadata.items():
        if name := _tag_part(key):
            tags[name] = _tag_part(value) or "_"
    tags[MESSAGE_ID_TAG] = _tag_part(email.message_id)
    return [{"name": name, "value": value} for name, value in tags.items()]


def _idempotency_key(call: list[OutboundEmail]) -> str:
    """The same key for the same messages, so Resend answers a retry without resending."""
    if len(call) == 1 and len(key := f"swu/{call[0].message_id}") <= MAX_KEY_CHARS:
        return key
    return "swu-batch/" + hashlib.sha256("\n".join(e.message_id for e in call).encode()).hexdigest()


class ResendAdapter(HttpAdapter):
    """Batches plain messages, sends messages with attachments alone, keys every call."""

    kind = "resend"
    display_name = "Resend"
    default_base_url = "https://api.resend.com"
    # 100 emails per batch; `to` holds at most 50 addresses; 40 MB per email after base64.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=100, recipients_per_message=50, bytes_per_call=40 * 1024 * 1024
    )
    # retry-after and ratelimit-reset are both delta seconds (IETF ratelimit headers draft 6).
    retry_after_headers = ("retry-after", "ratelimit-reset")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.account.api_key}"}

    def split(self, emails: Sequence[OutboundEmail]) -> list[list[OutboundEmail]]:
        """Batches of plain messages; each message with attachments alone. Order is kept."""
        calls: list[list[OutboundEmail]] = []
        run: list[OutboundEmail] = []
        for email in emails:
            if email.attachments:
                calls += super().split(run)
                calls.append([email])
                run = []
            else:
                run.append(email)
        return calls + super().split(run)

    def message(self, email: OutboundEmail) -> dict[str, Any]:
        """One Resend email object."""
        payload: dict[str, Any] = {
            "from": _address(email.sender),
            "to": [_address(email.to)],
            "subject": email.subject,
            "tags": _tags(email),
        }
        if email.cc:
            payload["cc"] = [_address(b) for b in email.cc]
        if email.bcc:
            payload["bcc"] = [_address(b) for b in email.bcc]
        if email.reply_to is not None:
            payload["reply_to"] = [_address(email.reply_to)]
        if email.html:
            payload["html"] = email.html
        if email.text:
            payload["text"] = email.text
        if email.headers:
            payload["headers"] = dict(email.headers)
        if email.attachments:
            payload["attachments"] = [
                {
                    "filename": a.filename,
                    "content": base64.b64encode(a.content).decode(),
                    "content_type": a.content_type,
                    **({"content_id": a.content_id} if a.content_id else {}),
                }
                for a in email.attachments
            ]
        return payload

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        headers = {"Idempotency-Key": _idempotency_key(call)}
        if len(call) == 1:
            return HttpRequest(path="/emails", json=self.message(call[0]), headers=headers)
        headers["x-batch-validation"] = "permissive"
        return HttpRequest(
            path="/emails/batch", json=[self.message(e) for e in call], headers=headers
        )

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        body = response.json()
        if isinstance(body, dict) and "data" in body:
            return self._batch_outcomes(call, body)
        email_id = body.get("id") if isinstance(body, dict) else None
        if len(call) == 1 and isinstance(email_id, str) and email_id:
            return [SendOutcome.sent(email_id)]
        return [SendOutcome.retry(f"Resend: unexpected answer: {response.text(120)}")] * len(call)

    def _batch_outcomes(self, call: list[OutboundEmail], body: dict[str, Any]) -> list[SendOutcome]:
        # Permissive mode: `errors` names refused emails by index, `data` lists the ids of the
        # accepted ones in request order. A retry with the same key gets the same answer.
        failed: dict[int, str] = {}
        for error in body.get("errors") or ():
            if isinstance(error, dict) and isinstance(error.get("index"), int):
                failed[error["index"]] = str(error.get("message", ""))
        ids = [d.get("id") if isinstance(d, dict) else None for d in body.get("data") or ()]
        if len(ids) + len(failed) != len(call) or not all(ids):
            reason = f"Resend: {len(ids)} ids and {len(failed)} errors for {len(call)} emails"
            return [SendOutcome.retry(reason)] * len(call)
        found = iter(ids)
        return [
            SendOutcome.rejected(f"Resend validation_error: {failed[i]}")
            if i in failed
            else SendOutcome.sent(str(next(found)))
            for i in range(len(call))
        ]

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and "message" in body:
            return f"{body.get('name', 'error')}: {body['message']}"
        return response.text()

    def classify_error(
        self, call: list[OutboundEmail], response: HttpResponse
    ) -> list[SendOutcome]:
        body = response.json()
        name = body.get("name") if isinstance(body, dict) else None
        if response.status == 409 and name == "concurrent_idempotent_requests":
            # The first call with this key is still running; asking again later is safe.
            reason = f"Resend 409: {self.error_reason(response)}"
            return [SendOutcome.retry(reason)] * len(call)
        return super().classify_error(call, response)
