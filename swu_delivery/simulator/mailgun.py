"""Mailgun's Messages endpoint as its documentation describes it, for the ESP simulator.

The wire format is a form (multipart or urlencoded), so the recorded body is the form as JSON::

    {"domain": "mg.example.com",
     "fields": {"to": ["Jane <jane@example.com>"], "o:tag": ["a", "b"], ...},
     "files": [{"field": "attachment", "filename": "a.pdf", "content_type": "...",
                "size": 123, "content": "<base64>"}]}

Every field is a list because Mailgun takes most parameters more than once. Mailgun answers
errors with ``{"message": ...}`` and one problem at a time; the wording of the messages it does
not document is ours.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from email.utils import getaddresses
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.core import Provider, Rejection, Submission, is_email

MAX_MESSAGE_BYTES = 25_000_000  # "The maximum message size Mailgun supports is 25MB"
MAX_BODY_BYTES = 26 * 1024**2  # the form around a 25 MB message (files are not base64 here)
MAX_OPTION_BYTES = 16 * 1024  # "Sending options (o:, h:, v:) are limited to 16 kB in total"
MAX_TAGS = 3  # "A single message may be marked with up to 3 tags"
MAX_RECIPIENTS = 1000  # "The maximum number of recipients allowed for Batch Sending is 1,000"
ADDRESS_FIELDS = ("to", "cc", "bcc")
BODY_FIELDS = ("text", "html", "amp-html", "template")
QUEUED = "Queued. Thank you."
FORBIDDEN = "Forbidden"  # the plain-text 401 body
TOO_LARGE = "Message too large: the limit is 25MB"
NO_BODY = "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified"
SERVER_ERRORS = {500: "Internal Server Error", 503: "Service Unavailable"}


def _reply(status: int, message: str, **headers: str) -> web.Response:
    body = orjson.dumps({"message": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _invalid(field: str) -> str:
    return f"{field} parameter is not a valid address. please check documentation"


def _addresses(values: list[str]) -> list[str] | None:
    """Every address in `values` (comma-separated, quoted names allowed), or None if one is bad."""
    found = []
    for _name, email in getaddresses(values):
        if not is_email(email):
            return None
        found.append(email.lower())
    return found


class FormCheck:
    """The documented 400s of a Messages form, first problem first, as Mailgun reports them."""

    def __init__(self, fields: dict[str, list[str]], files: list[dict[str, Any]]) -> None:
        self.fields = fields
        self.files = files
        self.recipients: list[str] = []  # lower-cased, to then cc then bcc

    def problem(self) -> str | None:
        fields = self.fields
        if "from" not in fields:
            return "from parameter is missing"
        if len(_addresses(fields["from"]) or ()) != 1:
            return _invalid("from")
        if "to" not in fields:
            return "to parameter is missing"
        for field in ADDRESS_FIELDS:
            found = _addresses(fields.get(field, []))
            if found is None:
                return _invalid(field)
            self.recipients += found
        if len(self.recipients) > MAX_RECIPIENTS:
            return f"Too many recipients: at most {MAX_RECIPIENTS} per message"
        if not any(fields.get("subject", [""])):
            return "subject parameter is missing"
        if not any(field in fields for field in BODY_FIELDS):
            return NO_BODY
        if len(fields.get("o:tag", ())) > MAX_TAGS:
            return f"Too many tags: at most {MAX_TAGS} per message"
        options = sum(
            len(name.encode()) + len(value.encode())
            for name, values in fields.items()
            if name.startswith(("o:", "h:", "v:"))
            for value in values
        )
        if options > MAX_OPTION_BYTES:
            return "Sending options (o:, h:, v:) are limited to 16 kB in total"
        return None

    def message_bytes(self) -> int:
        """The size of the MIME message Mailgun would build: bodies plus base64 files."""
        text = sum(len(v.encode()) for values in self.fields.values() for v in values)
        return text + sum(len(f["content"]) for f in self.files)


class MailgunProvider(Provider):
    """``POST /v3/{domain}/messages`` with Basic ``api:KEY``; 200 and an ``id`` when queued."""

    name = "mailgun"
    routes = (("POST", "/v3/{domain}/messages"),)
    max_body_bytes = MAX_BODY_BYTES

    def _authorized(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, key = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == "api" and key in self.api_keys

    async def receive(self, request: web.Request) -> Submission:
        if not self._authorized(request.headers.get("Authorization", "")):
            raise Rejection(web.Response(status=401, text=FORBIDDEN))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise Rejection(_reply(413, TOO_LARGE))
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_reply(413, TOO_LARGE)) from None
        except ValueError:
            raise Rejection(_reply(400, "Invalid form data")) from None
        fields: dict[str, list[str]] = {}
        files: list[dict[str, Any]] = []
        for name, value in form.items():
            if isinstance(value, web.FileField):
                content = value.file.read()
                files.append(
                    {
                        "field": name,
                        "filename": value.filename,
                        "content_type": value.content_type,
                        "size": len(content),
                        "content": base64.b64encode(content).decode(),
                    }
                )
            else:
                fields.setdefault(name, []).append(str(value))
        payload = {"domain": request.match_info["domain"], "fields": fields, "files": files}
        raw = orjson.dumps(payload)
        check = FormCheck(fields, files)
        if problem := check.problem():
            raise Rejection(_reply(400, problem), raw)
        if check.message_bytes() > MAX_MESSAGE_BYTES:
            raise Rejection(_reply(413, TOO_LARGE), raw)
        return Submission(payload, check.recipients, raw)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        serial = f"{secrets.randbelow(10**6)}.{secrets.randbelow(10**5)}"
        message_id = f"{stamp}.{serial}@{submission.payload['domain']}"
        body = orjson.dumps({"id": f"<{message_id}>", "message": QUEUED})
        # Recorded without the angle brackets, as Mailgun's events report the Message-Id.
        return web.Response(status=200, body=body, content_type="application/json"), message_id

    def rate_limited(self, reset_at: int) -> web.Response:
        wait = max(1, reset_at - int(time.time()))
        return _reply(429, "Too many requests", **{"Retry-After": str(wait)})

    def server_error(self, status: int) -> web.Response:
        return _reply(status, SERVER_ERRORS.get(status, "Internal Server Error"))

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        fields = submission.payload["fields"]
        for field in ADDRESS_FIELDS:
            if recipient is None or recipient in (_addresses(fields.get(field, [])) or ()):
                return _reply(400, _invalid(field))
        return _reply(400, _invalid("to"))
