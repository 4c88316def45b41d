"""SparkPost Transmissions API (`POST /api/v1/transmissions`): one transmission per message.

A transmission shares its content among all its recipients, so distinct rendered messages cost
one call each. Cc and Bcc are extra recipients whose `header_to` shows the To address; a `CC`
header makes the Cc visible. SparkPost's template engine is switched off: content arrives
rendered, and `{{ ... }}` in it must reach the reader as written.
"""

from __future__ import annotations

import base64
import io
import re
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

__all__ = ["SparkPostAdapter"]

MESSAGE_ID_KEY = "swu_message_id"  # metadata key; SparkPost events carry it in rcpt_meta
MAX_RECIPIENT_TAGS = 10  # "10 per recipient ... Any tags over the limits are ignored"
MAX_CAMPAIGN_ID_BYTES = 64
REGIONS = {"us": "https://api.sparkpost.com", "eu": "https://api.eu.sparkpost.com"}
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')


def _address(box: Mailbox) -> str:
    """`Name <addr>` in UTF-8 (SparkPost applies RFC 2047 itself), the name quoted if needed."""
    if not box.name:
        return box.email
    name = box.name
    if _SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{box.email}>"


def _part(name: str, content_type: str, content: bytes) -> dict[str, str]:
    return {"name": name, "type": content_type, "data": base64.b64encode(content).decode()}


class SparkPostAdapter(HttpAdapter):
    """`Authorization: KEY` (no scheme); `subaccount` sends as that subaccount."""

    kind = "sparkpost"
    display_name = "SparkPost"
    option_keys = frozenset({"region", "subaccount"})
    default_base_url = REGIONS["us"]
    # Content (text + html + base64 attachments and images) "Maximum size - 15MBs". SparkPost
    # documents no recipient cap for inline recipients; 1000 keeps one transmission small.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=1000, bytes_per_call=15_000_000
    )
    retry_after_headers = ("Retry-After",)  # documented 429 carries no named wait signal

    def __init__(self, account: EspAccount) -> None:
        region = account.options.get("region", "us")
        if region not in REGIONS:
            raise AdapterError(f"esp {account.name}: region must be one of {sorted(REGIONS)}")
        subaccount = account.options.get("subaccount")
        if subaccount is not None and (type(subaccount) is not int or subaccount < 0):
            raise AdapterError(f"esp {account.name}: subaccount must be a subaccount id (integer)")
        super().__init__(account)
        if not account.base_url:
            self.base_url = REGIONS[region]
        self.subaccount = subaccount

    def auth_headers(self) -> dict[str, str]:
        headers = {"Authorization": self.account.api_key}
        if self.subaccount is not None:
            headers["X-MSYS-SUBACCOUNT"] = str(self.subaccount)
        return headers

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        (email,) = call
        tags = list(email.tags[:MAX_RECIPIENT_TAGS])
        to: dict[str, Any] = {"address": {"email": email.to.email}}
        if email.to.name:
            to["address"]["name"] = email.to.name
        # A copy's To header shows the To address; a name here would replace the To's name.
        header_to = _address(email.to)
        copies = [{"address": {"email": b.email, "header_to": header_to}} for b in email.cc]
        copies += [{"address": {"email": b.email, "header_to": header_to}} for b in email.bcc]
        recipients = [to, *copies]
        if tags:
            for recipient in recipients:
                recipient["tags"] = tags
        sender: dict[str, str] = {"email": email.sender.email}
        if email.sender.name:
            sender["name"] = email.sender.name
        content: dict[str, Any] = {"from": sender, "subject": email.subject}
        if email.text:
            content["text"] = email.text
        if email.html:
            content["html"] = email.html
        if email.reply_to is not None:
            content["reply_to"] = _address(email.reply_to)
        headers = dict(email.headers)
        if email.cc:
            headers["CC"] = ", ".join(_address(box) for box in email.cc)
        if headers:
            content["headers"] = headers
        files = [a for a in email.attachments if not a.content_id]
        images = [a for a in email.attachments if a.content_id]
        if files:
            content["attachments"] = [_part(a.filename, a.content_type, a.content) for a in files]
        if images:
            # The image's name becomes its Content-ID: HTML references it as cid:<name>.
            content["inline_images"] = [
                _part(a.content_id, a.content_type, a.content) for a in images
            ]
        payload: dict[str, Any] = {
            "recipients": recipients,
            "content": content,
            # Ours goes last, so a caller's metadata key of the same name cannot replace it.
            "metadata": {**email.metadata, MESSAGE_ID_KEY: email.message_id},
            "options": {"perform_substitutions": False},
        }
        if tags and len(tags[0].encode()) <= MAX_CAMPAIGN_ID_BYTES:
            payload["campaign_id"] = tags[0]
        return HttpRequest(
            path="/api/v1/transmissions",
            data=io.BytesIO(orjson.dumps(payload)),  # bytes over 1 MB would block the loop
            headers={"Content-Type": "application/json"},
        )

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        body = response.json()
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, dict) or not results.get("id"):
            reason = f"{self.display_name} {response.status} without a transmission id: "
            return [SendOutcome.retry(reason + response.text(100))]
        if not results.get("total_accepted_recipients"):
            # Every recipient failed validation: the same request will never be accepted.
            reason = _rcpt_errors(results) or response.text()
            return [SendOutcome.rejected(f"{self.display_name}: no recipient accepted: {reason}")]
        # Some Cc/Bcc may be in rcpt_to_errors; the message itself went out to the rest.
        return [SendOutcome.sent(str(results["id"]))]

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("errors"), list):
            return _describe(body["errors"]) or response.text()
        return response.text()

    def classify_error(
        self, call: list[OutboundEmail], response: HttpResponse
    ) -> list[SendOutcome]:
        """420 is SparkPost's hourly/daily sending limit: throttled, not refused."""
        if response.status == 420:
            reason = f"{self.display_name} 420: {self.error_reason(response)}"
            return [SendOutcome.retry(reason, rate_limited=True)] * len(call)
        return super().classify_error(call, response)


def _describe(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        if isinstance(error, dict):
            text = ": ".join(str(error[k]) for k in ("message", "description") if error.get(k))
            parts.append(f"{text} (code {error['code']})" if error.get("code") else text)
    return "; ".join(p for p in parts if p)


def _rcpt_errors(results: dict[str, Any]) -> str:
    errors = results.get("rcpt_to_errors")
    return _describe(errors) if isinstance(errors, list) else ""
