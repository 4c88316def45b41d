"""Mailgun Messages API (`POST /v3/{domain}/messages`): one multipart request per message.

Mailgun's batch sending (`recipient-variables`) shares one body among up to 1000 recipients, so
distinct rendered messages cost one call each, like SendGrid's personalizations.
"""

from __future__ import annotations

import base64
import io
from email.utils import formataddr
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
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

__all__ = ["MailgunAdapter"]

MESSAGE_ID_VAR = "swu_message_id"  # v:swu_message_id; events echo it in "user-variables"
TAGS_VAR = "swu_tags"  # every tag as a JSON list, sent when some did not fit in o:tag
MAX_TAGS, MAX_TAG_CHARS = 3, 128  # "up to 3 tags ... ascii only. The maximum length ... is 128"
REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


def _address(box: Mailbox) -> str:
    """`Name <addr>`, the name quoted (`"`, `,`, `<`) or RFC 2047-encoded as RFC 5322 needs."""
    return formataddr((box.name, box.email))


def _fits_o_tag(tag: str) -> bool:
    return tag.isascii() and 0 < len(tag) <= MAX_TAG_CHARS


def _tag_fields(tags: list[str]) -> list[tuple[str, str]]:
    """Up to 3 `o:tag`s; all tags in `v:swu_tags` when any had to be left out of `o:tag`."""
    fitting = [tag for tag in tags if _fits_o_tag(tag)][:MAX_TAGS]
    fields = [("o:tag", tag) for tag in fitting]
    if len(fitting) < len(tags):
        fields.append((f"v:{TAGS_VAR}", orjson.dumps(tags).decode()))
    return fields


class MailgunAdapter(HttpAdapter):
    """Basic auth `api:KEY`; the sending domain is in the path, so it is a required option."""

    kind = "mailgun"
    display_name = "Mailgun"
    option_keys = frozenset({"region", "domain"})
    default_base_url = REGIONS["us"]
    # "The maximum message size Mailgun supports is 25MB"; batch sending allows 1000 recipients.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=1000, bytes_per_call=25_000_000
    )
    # Mailgun's docs say only "retry these requests as defined in the response"; Retry-After is
    # the standard carrier. Its X-RateLimit-Reset is not documented (nor its unit), so unused.
    retry_after_headers = ("Retry-After",)

    def __init__(self, account: EspAccount) -> None:
        region = account.options.get("region", "us")
        if region not in REGIONS:
            raise AdapterError(f"esp {account.name}: region must be one of {sorted(REGIONS)}")
        domain = account.options.get("domain")
        if not isinstance(domain, str) or not domain:
            raise AdapterError(
                f"esp {account.name}: domain (the Mailgun sending domain) is required"
            )
        if "/" in domain:
            raise AdapterError(f"esp {account.name}: domain must be a bare domain name, no '/'")
        super().__init__(account)
        if not account.base_url:
            self.base_url = REGIONS[region]
        self.path = f"/v3/{quote(domain, safe='')}/messages"

    def auth_headers(self) -> dict[str, str]:
        token = base64.b64encode(f"api:{self.account.api_key}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        (email,) = call
        fields: list[tuple[str, str]] = [
            ("from", _address(email.sender)),
            ("to", _address(email.to)),
            *(("cc", _address(box)) for box in email.cc),
            *(("bcc", _address(box)) for box in email.bcc),
            ("subject", email.subject),
        ]
        if email.text:
            fields.append(("text", email.text))
        if email.html:
            fields.append(("html", email.html))
        if email.reply_to is not None:
            fields.append(("h:Reply-To", _address(email.reply_to)))
        fields += [(f"h:{name}", value) for name, value in email.headers.items()]
        fields += _tag_fields(list(email.tags))
        # Ours goes last, so a caller's metadata key of the same name cannot replace it.
        metadata = {**email.metadata, MESSAGE_ID_VAR: email.message_id}
        fields += [(f"v:{key}", value) for key, value in metadata.items()]
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields:
            form.add_field(name, value)
        for attachment in email.attachments:
            # Mailgun names an inline part's Content-ID after its filename (cid:<filename>).
            inline = bool(attachment.content_id)
            form.add_field(
                "inline" if inline else "attachment",
                io.BytesIO(attachment.content),  # bytes over 1 MB would block the loop
                filename=attachment.content_id if inline else attachment.filename,
                content_type=attachment.content_type,
            )
        return HttpRequest(path=self.path, data=form)

    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        body: Any = response.json()
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            # e.g. the "Mailgun Magnificent API" page a wrong base URL answers with 200
            reason = f"{self.display_name} {response.status} without a message id: "
            return [SendOutcome.retry(reason + response.text(100))]
        # Events carry the Message-Id without angle brackets; store it the same way.
        return [SendOutcome.sent(message_id.strip().strip("<>"))]

    def error_reason(self, response: HttpResponse) -> str:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])
        return response.text()
