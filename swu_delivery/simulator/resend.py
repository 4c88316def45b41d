"""Resend's send endpoints (`POST /emails`, `POST /emails/batch`) as its documentation describes.

Errors are `{"statusCode", "message", "name"}`: 401 `missing_api_key` / `validation_error` ("API
key is invalid"), 400 `invalid_idempotency_key`, 409 `invalid_idempotent_request`, 422
`validation_error` for invalid fields, 429 `rate_limit_exceeded` with `ratelimit-*` and
`retry-after` headers (delta seconds), 500 `internal_server_error`. A batch holds 1 to 100 emails
without attachments; in the default strict mode one invalid email fails the batch (422), with
`x-batch-validation: permissive` the valid ones are sent and the others listed in `errors` by
index. A scripted "400" for a recipient makes the emails naming it invalid in the same way.

`Idempotency-Key` (1-256 characters) is remembered 24 hours per API key and endpoint: the same
key and body get the first answer again, without a new send; another body gets 409.
A record's `message_id` lists the ids of the emails the request sent, comma-separated.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.core import Provider, Rejection, Submission, is_base64, is_email

MAX_EMAIL_BYTES = 40 * 1024 * 1024  # per email, attachments measured after base64 encoding
MAX_BATCH = 100
MAX_TO = 50
RATE_LIMIT = 5  # documented default: 5 requests per second per team
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_REMEMBERED_KEYS = 100_000
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")
_MAILBOX = re.compile(r"\s*(?:(?P<name>[^<>\"]*?)\s*<(?P<a>[^<>]+)>|(?P<b>[^<>\s]+))\s*")
ADDRESS_FORMAT = (
    "The email address needs to follow the `email@example.com` or `Name <email@example.com>`"
    " format."
)
MISSING_KEY = "Missing API key in the authorization header."
TOO_LARGE = "The email is over 40 MB (attachments are measured base64-encoded)."
BAD_MODE = "The `x-batch-validation` header must be `strict` or `permissive`."
BATCH_SIZE = "The batch must hold between 1 and 100 emails."
KEY_REUSED = (
    "This idempotency key has already been used on a request with a different payload."
    " Retrying this request is not possible."
)
NOT_IN_BATCH = "The `{field}` field is not supported in batch emails."
RATE_LIMITED = (
    "Too many requests. You can only make 5 requests per second. See rate limit response headers"
    " for more information. Or contact support to increase rate limit."
)


def _error(status: int, name: str, message: str, **headers: str) -> web.Response:
    body = orjson.dumps({"statusCode": status, "message": message, "name": name})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _address(value: Any) -> str | None:
    match = _MAILBOX.fullmatch(value) if isinstance(value, str) else None
    address = (match.group("a") or match.group("b")) if match else None
    return address if is_email(address) else None


def check_email(email: Any, batch: bool) -> tuple[str | None, list[str]]:
    """The first validation problem of one email (or None) and its recipients, lower-cased."""
    if not isinstance(email, dict):
        return "The email must be an object.", []
    for field in ("from", "to", "subject"):
        if field not in email:
            return f"Missing `{field}` field.", []
    if _address(email["from"]) is None:
        return f"Invalid `from` field. {ADDRESS_FORMAT}", []
    recipients: list[str] = []
    for field in ("to", "cc", "bcc", "reply_to"):
        value = email.get(field)
        if value is None and field != "to":
            continue
        values = value if isinstance(value, list) else [value]
        if field == "to" and not 1 <= len(values) <= MAX_TO:
            return "The `to` field must hold between 1 and 50 addresses.", []
        addresses = [_address(v) for v in values]
        if None in addresses:
            return f"Invalid `{field}` field. {ADDRESS_FORMAT}", []
        if field != "reply_to":
            recipients += [a.lower() for a in addresses if a]
    if not isinstance(email["subject"], str):
        return "The `subject` field must be a string.", []
    if not any(isinstance(email.get(f), str) for f in ("html", "text", "template")):
        return "Missing `html` or `text` field.", []
    problem = _check_extras(email, batch)
    if problem is None and len(orjson.dumps(email)) > MAX_EMAIL_BYTES:
        problem = TOO_LARGE
    return problem, recipients


def _check_extras(email: dict[str, Any], batch: bool) -> str | None:
    headers = email.get("headers")
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
    ):
        return "The `headers` field must be an object of strings."
    for tag in email.get("tags") or ():
        if not isinstance(tag, dict) or not all(
            isinstance(tag.get(k), str) and _TAG.fullmatch(tag[k]) for k in ("name", "value")
        ):
            return (
                "Tags should only contain ASCII letters, numbers, underscores, or dashes,"
                f" and at most 256 characters: {orjson.dumps(tag).decode()}"
            )
    for field in ("attachments", "scheduled_at"):
        if batch and field in email:
            return NOT_IN_BATCH.format(field=field)
    for attachment in email.get("attachments") or ():
        fields = attachment if isinstance(attachment, dict) else {}
        content, path = fields.get("content"), fields.get("path")
        if not (isinstance(content, str) and is_base64(content)) and not isinstance(path, str):
            return "Attachment `content` must be base64-encoded, or give a `path`."
        if not isinstance(fields.get("filename"), str) and content is not None:
            return "Attachment `filename` is required with `content`."
    return None


class ResendProvider(Provider):
    """Bearer key; one email to /emails, up to 100 (no attachments) to /emails/batch."""

    name = "resend"
    routes = (("POST", "/emails"), ("POST", "/emails/batch"))
    max_body_bytes = MAX_EMAIL_BYTES

    def __init__(self, api_keys: frozenset[str]) -> None:
        super().__init__(api_keys)
        # (api key, path, idempotency key) -> (body digest, expiry, status, answer body)
        self._keys: OrderedDict[tuple[str, str, str], tuple[str, float, int, bytes]] = OrderedDict()

    async def receive(self, request: web.Request) -> Submission:
        authorization = request.headers.get("Authorization", "")
        api_key = authorization[7:] if authorization.startswith("Bearer ") else ""
        if not api_key:
            raise Rejection(_error(401, "missing_api_key", MISSING_KEY))
        if api_key not in self.api_keys:
            raise Rejection(_error(401, "validation_error", "API key is invalid"))
        try:
            raw = await request.read()
            data = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_error(422, "validation_error", TOO_LARGE)) from None
        except orjson.JSONDecodeError:
            raise Rejection(_error(422, "validation_error", "Invalid JSON body.")) from None
        batch = request.path == "/emails/batch"
        mode = request.headers.get("x-batch-validation", "strict")
        if batch and mode not in ("strict", "permissive"):
            raise Rejection(_error(422, "validation_error", BAD_MODE), raw)
        if (replay := self._idempotent(request, api_key, raw)) is not None:
            raise Rejection(replay, raw)
        if batch and (not isinstance(data, list) or not 1 <= len(data) <= MAX_BATCH):
            raise Rejection(_error(422, "validation_error", BATCH_SIZE), raw)
        checks = [check_email(email, batch) for email in (data if batch else [data])]
        permissive = batch and mode == "permissive"
        if not permissive and (bad := [i for i, (p, _) in enumerate(checks) if p]):
            prefix = f"emails[{bad[0]}]: " if batch else ""
            raise Rejection(_error(422, "validation_error", prefix + str(checks[bad[0]][0])), raw)
        payload = {
            "batch": batch,
            "permissive": permissive,
            "checks": checks,
            "key": self._key(request, api_key),
            "digest": hashlib.sha256(raw).hexdigest(),
        }
        recipients = [r for problem, found in checks if not problem for r in found]
        return Submission(payload, recipients, raw)

    def _key(self, request: web.Request, api_key: str) -> tuple[str, str, str] | None:
        key = request.headers.get("Idempotency-Key")
        return None if key is None else (api_key, request.path, key)

    def _idempotent(self, request: web.Request, api_key: str, raw: bytes) -> web.Response | None:
        """The remembered answer for a repeated key, a 400/409, or None for a fresh request."""
        key = self._key(request, api_key)
        if key is None:
            return None
        if not 1 <= len(key[2]) <= 256:
            return _error(400, "invalid_idempotency_key", "The key must be between 1-256 chars.")
        now = time.time()
        while self._keys and next(iter(self._keys.values()))[1] < now:
            self._keys.popitem(last=False)
        remembered = self._keys.get(key)
        if remembered is None:
            return None
        digest, _, status, body = remembered
        if digest != hashlib.sha256(raw).hexdigest():
            return _error(409, "invalid_idempotent_request", KEY_REUSED)
        return web.Response(status=status, body=body, content_type="application/json")

    def _answer(self, submission: Submission, invalid: str | None) -> tuple[web.Response, str]:
        """Send the valid emails; those naming `invalid` are refused like a bad address."""
        payload = submission.payload
        ids: list[str] = []
        errors: list[dict[str, Any]] = []
        for i, (problem, recipients) in enumerate(payload["checks"]):
            if problem is None and invalid is not None and invalid in recipients:
                problem = f"Invalid `to` field. {ADDRESS_FORMAT}"
            if problem:
                errors.append({"index": i, "message": problem})
            else:
                ids.append(str(uuid.uuid4()))
        if errors and not payload["permissive"]:  # one email, or a strict batch: all or nothing
            first = errors[0]
            prefix = f"emails[{first['index']}]: " if payload["batch"] else ""
            return _error(422, "validation_error", prefix + first["message"]), ""
        answer: dict[str, Any] = {"id": ids[0]}
        if payload["batch"]:
            answer = {"data": [{"id": x} for x in ids]} | ({"errors": errors} if errors else {})
        body = orjson.dumps(answer)
        if payload["key"] is not None:
            self._remember(payload["key"], payload["digest"], body)
        return web.Response(body=body, content_type="application/json"), ",".join(ids)

    def _remember(self, key: tuple[str, str, str], digest: str, body: bytes) -> None:
        self._keys[key] = (digest, time.time() + IDEMPOTENCY_TTL_S, 200, body)
        self._keys.move_to_end(key)
        if len(self._keys) > MAX_REMEMBERED_KEYS:
            self._keys.popitem(last=False)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        return self._answer(submission, None)

    def rate_limited(self, reset_at: int) -> web.Response:
        wait = str(max(1, reset_at - int(time.time())))
        headers = {
            "ratelimit-limit": str(RATE_LIMIT),
            "ratelimit-remaining": "0",
            "ratelimit-reset": wait,
            "retry-after": wait,
        }
        return _error(429, "rate_limit_exceeded", RATE_LIMITED, **headers)

    def server_error(self, status: int) -> web.Response:
        return _error(status, "internal_server_error", "An unexpected error occurred.")

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        target = recipient or (submission.recipients[0] if submission.recipients else "")
        return self._answer(submission, target)[0]
