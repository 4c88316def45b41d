"""SparkPost's Transmissions endpoint as its documentation describes it, for the ESP simulator.

Errors are ``{"errors": [{"message", "code", "description"}]}`` with SparkPost's documented codes:
1300 "invalid data format/type" and 1400 "required field is missing" (422). A recipient with a bad
address is rejected on its own: the transmission is still created (200, error code 2000,
``results.rcpt_to_errors``) unless no recipient is left. Descriptions are ours.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from swu_delivery.simulator.core import (
    Provider,
    Rejection,
    Submission,
    is_base64,
    is_email,
    json_type,
)

MAX_CONTENT_BYTES = 15_000_000  # text + html + attachments + inline images: "Maximum size - 15MBs"
MAX_BODY_BYTES = 20 * 1024**2  # the JSON around that content
MAX_CAMPAIGN_ID_BYTES = 64
MAX_DESCRIPTION_BYTES = 1024
MAX_PART_NAME_BYTES = 255  # attachment and inline image names
# "headers other than Subject, From, To, and Reply-To"; Content-Type and -Transfer-Encoding are
# generated when the message is built.
RESERVED_HEADERS = frozenset(
    {"subject", "from", "to", "reply-to", "content-type", "content-transfer-encoding"}
)
INVALID, MISSING = ("invalid data format/type", "1300"), ("required field is missing", "1400")
UNAUTHORIZED = {"message": "Unauthorized."}
SERVER_ERRORS = {500: "internal server error", 503: "service unavailable"}


class Transmission(NamedTuple):
    body: dict[str, Any]
    accepted: list[dict[str, Any]]  # the recipients that passed, as sent
    rcpt_to_errors: list[dict[str, str]]


def _error(kind: tuple[str, str], description: str) -> dict[str, str]:
    return {"message": kind[0], "code": kind[1], "description": description}


def _reply(status: int, errors: list[dict[str, str]], **headers: str) -> web.Response:
    body = orjson.dumps({"errors": errors})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _recipient_email(recipient: Any) -> str | None:
    """The envelope address of a recipient object, if it has a valid one."""
    address = recipient.get("address") if isinstance(recipient, dict) else None
    email = address.get("email") if isinstance(address, dict) else address
    return email if is_email(email) else None


def _parts_problem(parts: Any, path: str) -> str | None:
    if parts is None:
        return None
    if not isinstance(parts, list):
        return f"{path} must be an array, not {json_type(parts)}"
    names = set()
    for k, part in enumerate(parts):
        fields = part if isinstance(part, dict) else {}
        for key in ("type", "name", "data"):
            if not isinstance(fields.get(key), str) or not fields[key]:
                return f"{path}[{k}].{key} is a required string"
        if len(fields["name"].encode()) > MAX_PART_NAME_BYTES:
            return f"{path}[{k}].name is longer than {MAX_PART_NAME_BYTES} bytes"
        if not is_base64(fields["data"]):
            return f"{path}[{k}].data must be base64 without line breaks"
        if path.endswith("inline_images") and fields["name"] in names:
            return f"{path}[{k}].name must be unique within inline_images"
        names.add(fields["name"])
    return None


def _content_problem(content: Any) -> tuple[tuple[str, str], str] | None:
    """The first documented problem of inline content, as (kind, description)."""
    if not isinstance(content, dict):
        return MISSING, "content is a required object"
    sender = content.get("from")
    sender_email = sender.get("email") if isinstance(sender, dict) else sender
    if not sender_email:
        return MISSING, "content.from is a required field"
    if not is_email(sender_email):
        return INVALID, "content.from.email must be a valid email address"
    if not isinstance(content.get("subject"), str) or not content["subject"]:
        return MISSING, "content.subject is a required field"
    if not any(isinstance(content.get(k), str) and content[k] for k in ("html", "text")):
        return MISSING, "content.html or content.text is required"
    if "reply_to" in content and not isinstance(content["reply_to"], str):
        return INVALID, "content.reply_to must be a string"
    headers = content.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return INVALID, "content.headers must be an object of strings"
    for name in headers:
        if name.lower() in RESERVED_HEADERS:
            return INVALID, f"content.headers: {name} is not allowed here"
    for path in ("attachments", "inline_images"):
        if problem := _parts_problem(content.get(path), f"content.{path}"):
            return INVALID, problem
    size = sum(len(content.get(k) or "") for k in ("html", "text"))
    size += sum(
        len(p["data"]) for k in ("attachments", "inline_images") for p in content.get(k) or ()
    )
    if size > MAX_CONTENT_BYTES:
        return INVALID, f"content is {size} bytes; the limit is {MAX_CONTENT_BYTES}"
    return None


def check(body: Any) -> Transmission | dict[str, str]:
    """The transmission with its recipients sorted, or the error that refuses it whole."""
    if not isinstance(body, dict):
        return _error(INVALID, f"expected an object, not {json_type(body)}")
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return _error(MISSING, "recipients is a required non-empty array")
    for key, limit in (
        ("campaign_id", MAX_CAMPAIGN_ID_BYTES),
        ("description", MAX_DESCRIPTION_BYTES),
    ):
        if key in body and (not isinstance(body[key], str) or len(body[key].encode()) > limit):
            return _error(INVALID, f"{key} must be a string of at most {limit} bytes")
    if "metadata" in body and not isinstance(body["metadata"], dict):
        return _error(INVALID, "metadata must be an object")
    if problem := _content_problem(body.get("content")):
        return _error(*problem)
    accepted, rcpt_to_errors = [], []
    for i, recipient in enumerate(recipients):
        tags = recipient.get("tags", []) if isinstance(recipient, dict) else []
        if _recipient_email(recipient) is None or not isinstance(tags, list):
            description = f"recipients[{i}].address.email is not a valid email address"
            rcpt_to_errors.append(_error(INVALID, description))
        else:
            accepted.append(recipient)
    if not accepted:
        return rcpt_to_errors[0]
    return Transmission(body, accepted, rcpt_to_errors)


class SparkPostProvider(Provider):
    """``POST /api/v1/transmissions`` with ``Authorization: KEY``; 200 and results when created."""

    name = "sparkpost"
    routes = (("POST", "/api/v1/transmissions"), ("POST", "/api/v1/transmissions/"))
    max_body_bytes = MAX_BODY_BYTES

    def _authorized(self, authorization: str) -> bool:
        if authorization in self.api_keys:
            return True
        scheme, _, token = authorization.partition(" ")  # Basic: the key as user, no password
        try:
            user = base64.b64decode(token, validate=True).decode()
        except ValueError:
            return False
        return scheme.lower() == "basic" and user.endswith(":") and user[:-1] in self.api_keys

    async def receive(self, request: web.Request) -> Submission:
        if not self._authorized(request.headers.get("Authorization", "")):
            raise Rejection(_reply(401, [UNAUTHORIZED]))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise Rejection(_reply(413, [{"message": "Request Entity Too Large"}]))
        try:
            raw = await request.read()
            body = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_reply(413, [{"message": "Request Entity Too Large"}])) from None
        except orjson.JSONDecodeError:
            error = _error(INVALID, "Problems parsing request as json")
            raise Rejection(_reply(400, [error])) from None
        transmission = check(body)
        if not isinstance(transmission, Transmission):
            raise Rejection(_reply(422, [transmission]), raw)
        emails = [(_recipient_email(r) or "").lower() for r in transmission.accepted]
        return Submission(transmission, emails, raw)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        transmission: Transmission = submission.payload
        transmission_id = str(10**16 + secrets.randbelow(9 * 10**16))  # 17 digits, like SparkPost
        results: dict[str, Any] = {
            "total_rejected_recipients": len(transmission.rcpt_to_errors),
            "total_accepted_recipients": len(transmission.accepted),
            "id": transmission_id,
        }
        answer: dict[str, Any] = {"results": results}
        if transmission.rcpt_to_errors:
            results["rcpt_to_errors"] = transmission.rcpt_to_errors
            answer["errors"] = [
                {"message": "transmission created, but with validation errors", "code": "2000"}
            ]
        body = orjson.dumps(answer)
        return web.Response(status=200, body=body, content_type="application/json"), transmission_id

    def rate_limited(self, reset_at: int) -> web.Response:
        wait = max(1, reset_at - int(time.time()))
        return _reply(429, [{"message": "Too many requests"}], **{"Retry-After": str(wait)})

    def server_error(self, status: int) -> web.Response:
        return _reply(status, [{"message": SERVER_ERRORS.get(status, "internal server error")}])

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        transmission: Transmission = submission.payload
        for i, entry in enumerate(transmission.body["recipients"]):
            email = (_recipient_email(entry) or "").lower()
            if email and (recipient is None or email == recipient):
                description = f"recipients[{i}].address.email {email} was rejected"
                return _reply(422, [_error(INVALID, description)])
        return _reply(422, [_error(INVALID, "recipients were rejected")])
