"""Postmark's email API (`POST /email`, `POST /email/batch`) as its documentation describes it.

Whole-request problems are HTTP errors with a `{"ErrorCode", "Message"}` body: 401 (ErrorCode 10)
for a missing or wrong `X-Postmark-Server-Token`, 422 for a body that is not JSON (402), not the
expected shape (403), over 500 messages (410) or sent without application/json (409), and 413
over the size limits. A batch is otherwise answered 200 with one item per message in order: an
invalid message gets its own ErrorCode 300 item and the others are sent. A scripted "400" for a
recipient answers the same way, with ErrorCode 406 (inactive recipient) for the messages that
name it. Postmark documents no rate-limit headers, so its 429 carries none.

A record's `message_id` lists the accepted MessageIDs of the request, comma-separated.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.core import Provider, Rejection, Submission, is_base64, is_email

MAX_BATCH_BYTES = 50 * 1024 * 1024  # "up to 50 MB payload size, including attachments"
MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # one message, attachments counted base64-encoded
MAX_BODY_BYTES = 5 * 1024 * 1024  # TextBody and HtmlBody, each
MAX_BATCH_MESSAGES = 500
MAX_RECIPIENTS = 50  # To + Cc + Bcc of one message
# `Name <addr>`, the name bare or quoted; the address alone is accepted too.
_MAILBOX = re.compile(
    r'\s*(?:(?P<name>"(?:[^"\\]|\\.)*"|[^"<>,]*?)\s*<(?P<a>[^<>]*)>|(?P<b>[^<>]*))\s*'
)

BAD_TOKEN = (
    "The Server Token you provided in the X-Postmark-Server-Token request header was invalid."
    " Please verify that you are using a valid token."
)
NO_TOKEN = (
    "No Account or Server API tokens were supplied in the HTTP headers. Please add a header for"
    " either X-Postmark-Server-Token or X-Postmark-Account-Token."
)
JSON_REQUIRED = (
    "Your HTTP request does not have the Accept and Content-Type headers set to 'application/json'."
)
INVALID_JSON = "Received invalid JSON input."
INCOMPATIBLE_JSON = "The JSON input is not compatible with the expected format."
TOO_MANY = "Too many batch messages. You can send up to 500 messages in a single batch call."
TOO_LARGE = "The request exceeded Postmark's size limit: 10 MB per message, 50 MB per batch."
NO_BODY = "Provide either email TextBody or HtmlBody or both."
INACTIVE = (
    "You tried to send to recipient(s) that have been marked as inactive. Found inactive"
    " addresses: {address}. Inactive recipients are ones that have generated a hard bounce,"
    " a spam complaint, or a manual suppression."
)
RATE_LIMITED = "Rate limit exceeded. Please slow down the rate of your requests and try again."
SERVER_ERRORS = {
    500: (0, "Internal server error."),
    503: (100, "Postmark is offline for scheduled maintenance. Please retry later."),
}


def _reply(status: int, code: int, message: str) -> web.Response:
    body = orjson.dumps({"ErrorCode": code, "Message": message})
    return web.Response(status=status, body=body, content_type="application/json")


def _split(value: str) -> list[str]:
    """`value` cut at the commas outside quoted names."""
    parts, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append(value[start:i])
            start = i + 1
    return [*parts, value[start:]]


def _addresses(value: str) -> list[str] | None:
    """The addresses in a comma-separated list of mailboxes, or None if one is malformed."""
    found = []
    for part in _split(value):
        match = _MAILBOX.fullmatch(part)
        address = (match.group("a") or match.group("b") or "").strip() if match else ""
        if not is_email(address):
            return None
        found.append(address)
    return found


class MessageCheck:
    """The documented ErrorCode 300 problems of one message; the first one found is reported."""

    def __init__(self, message: Any, measure: bool) -> None:
        self.recipients: list[str] = []
        self.measure = measure  # False when the whole request is under the per-message limit
        self.error = self._check(message) if isinstance(message, dict) else INCOMPATIBLE_JSON

    def _check(self, msg: dict[str, Any]) -> str | None:
        sender = msg.get("From")
        if not isinstance(sender, str) or not (found := _addresses(sender)) or len(found) != 1:
            return f"Invalid 'From' address: '{sender}'."
        for field in ("To", "Cc", "Bcc"):
            value = msg.get(field)
            if value is None and field != "To":
                continue
            found = _addresses(value) if isinstance(value, str) else None
            if not found:
                return f"Invalid '{field}' address: '{value}'."
            self.recipients += [a.lower() for a in found]
        if len(self.recipients) > MAX_RECIPIENTS:
            return "Maximum of 50 recipients allowed per email message."
        if "ReplyTo" in msg and not (
            isinstance(msg["ReplyTo"], str) and _addresses(msg["ReplyTo"])
        ):
            return f"Invalid 'ReplyTo' address: '{msg['ReplyTo']}'."
        for field in ("Subject", "Tag", "MessageStream", "HtmlBody", "TextBody"):
            if field in msg and not isinstance(msg[field], str):
                return f"Invalid '{field}' value."
        html, text = msg.get("HtmlBody") or "", msg.get("TextBody") or ""
        if not html and not text:
            return NO_BODY
        if max(len(html.encode()), len(text.encode())) > MAX_BODY_BYTES:
            return "TextBody and HtmlBody can each be up to 5 MB."
        if self.measure and len(orjson.dumps(msg)) > MAX_MESSAGE_BYTES:
            return TOO_LARGE
        return self._headers(msg.get("Headers")) or self._extras(msg)

    def _headers(self, headers: Any) -> str | None:
        if headers is None:
            return None
        if not isinstance(headers, list) or not all(
            isinstance(h, dict)
            and isinstance(h.get("Name"), str)
            and isinstance(h.get("Value"), str)
            for h in headers
        ):
            return "Invalid 'Headers' value: a list of {Name, Value} objects is expected."
        return None

    def _extras(self, msg: dict[str, Any]) -> str | None:
        metadata = msg.get("Metadata")
        if metadata is not None:
            if not isinstance(metadata, dict) or any(
                isinstance(v, dict | list) for v in metadata.values()
            ):
                return "Invalid metadata content: an object of single values is expected."
            if len({k.lower() for k in metadata}) != len(metadata):
                return "Invalid metadata content: duplicate keys are not allowed."
        for k, att in enumerate(msg.get("Attachments") or ()):
            if not isinstance(att, dict) or not isinstance(att.get("Name"), str) or not att["Name"]:
                return f"Attachment {k} needs a Name."
            if not isinstance(att.get("Content"), str) or not is_base64(att["Content"]):
                return f"Attachment {k} ('{att['Name']}') Content must be base64 encoded."
            if not isinstance(att.get("ContentType"), str) or not att["ContentType"]:
                return f"Attachment {k} ('{att['Name']}') needs a ContentType."
            content_id = att.get("ContentID")
            if content_id is not None and not isinstance(content_id, str):
                return f"Attachment {k} ('{att['Name']}') ContentID must be a string."
        return None


class PostmarkProvider(Provider):
    """`X-Postmark-Server-Token` auth; one message to /email, up to 500 to /email/batch."""

    name = "postmark"
    routes = (("POST", "/email"), ("POST", "/email/batch"))
    max_body_bytes = MAX_BATCH_BYTES
    secret_headers = frozenset({"x-postmark-server-token"})

    async def receive(self, request: web.Request) -> Submission:
        token = request.headers.get("X-Postmark-Server-Token")
        if not token:
            raise Rejection(_reply(401, 10, NO_TOKEN))
        if token.lower() not in {key.lower() for key in self.api_keys}:  # case-insensitive
            raise Rejection(_reply(401, 10, BAD_TOKEN))
        if "application/json" not in request.headers.get("Accept", "") or (
            request.content_type != "application/json"
        ):
            raise Rejection(_reply(422, 409, JSON_REQUIRED))
        batch = request.path == "/email/batch"
        if (request.content_length or 0) > (MAX_BATCH_BYTES if batch else MAX_MESSAGE_BYTES):
            raise Rejection(_reply(413, 300, TOO_LARGE))
        try:
            raw = await request.read()
            data = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_reply(413, 300, TOO_LARGE)) from None
        except orjson.JSONDecodeError:
            raise Rejection(_reply(422, 402, INVALID_JSON)) from None
        if not isinstance(data, list if batch else dict):
            raise Rejection(_reply(422, 403, INCOMPATIBLE_JSON), raw)
        if batch and len(data) > MAX_BATCH_MESSAGES:
            raise Rejection(_reply(422, 410, TOO_MANY), raw)
        measure = len(raw) > MAX_MESSAGE_BYTES
        checks = [MessageCheck(m, measure) for m in (data if batch else [data])]
        if not batch and checks[0].error:
            raise Rejection(_reply(422, 300, checks[0].error), raw)
        recipients = [r for c in checks if not c.error for r in c.recipients]
        return Submission({"batch": batch, "messages": data, "checks": checks}, recipients, raw)

    def _answer(self, submission: Submission, inactive: str | None) -> tuple[web.Response, str]:
        """Per-message results; messages naming `inactive` get ErrorCode 406."""
        items: list[dict[str, Any]] = []
        ids: list[str] = []
        now = datetime.now(UTC).isoformat()
        messages = submission.payload["messages"]
        for message, check in zip(
            messages if submission.payload["batch"] else [messages],
            submission.payload["checks"],
            strict=True,
        ):
            if check.error:
                items.append({"ErrorCode": 300, "Message": check.error})
            elif inactive is not None and inactive in check.recipients:
                items.append({"ErrorCode": 406, "Message": INACTIVE.format(address=inactive)})
            else:
                ids.append(str(uuid.uuid4()))
                items.append(
                    {"To": message["To"], "SubmittedAt": now, "MessageID": ids[-1]}
                    | {"ErrorCode": 0, "Message": "OK"}
                )
        if not submission.payload["batch"] and items[0]["ErrorCode"]:
            return _reply(422, items[0]["ErrorCode"], items[0]["Message"]), ""
        body = orjson.dumps(items if submission.payload["batch"] else items[0])
        return web.Response(body=body, content_type="application/json"), ",".join(ids)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        return self._answer(submission, None)

    def rate_limited(self, reset_at: int) -> web.Response:
        return _reply(429, 429, RATE_LIMITED)

    def server_error(self, status: int) -> web.Response:
        code, message = SERVER_ERRORS.get(status, SERVER_ERRORS[500])
        return _reply(status, code, message)

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        target = recipient or (submission.recipients[0] if submission.recipients else "")
        return self._answer(submission, target)[0]
