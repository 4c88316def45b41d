"""Brevo's transactional email endpoint (`POST /v3/smtp/email`) as documented, for the simulator.

Errors are Brevo's `{"code", "message"}` with its documented codes (`missing_parameter`,
`invalid_parameter`, `out_of_range`, `unauthorized`); the texts are ours where the reference gives
none. Brevo reports one error per answer, so checks stop at the first problem. A 429 carries the
documented `x-sib-ratelimit-*` headers, the reset in seconds from now.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.core import Provider, Rejection, Submission, is_base64, is_email

MAX_EMAIL_BYTES = 20 * 1024 * 1024  # "20MB, including attachments and email content"
MAX_BODY_BYTES = 32 * 1024 * 1024  # 20 MB of decoded content grows by a third in base64
MAX_VERSIONS = 1000
MAX_VERSION_RECIPIENTS = 99
MAX_REQUEST_RECIPIENTS = 2000
RATE_LIMIT = 1000  # documented general limit for POST /v3/smtp/email: 1,000 requests/second
# The documented extensions allowed for attachment files.
EXTENSIONS = frozenset(
    (
        "xlsx",
        "xls",
        "ods",
        "docx",
        "docm",
        "doc",
        "csv",
        "pdf",
        "txt",
        "gif",
        "jpg",
        "jpeg",
        "png",
        "tif",
        "tiff",
        "rtf",
        "bmp",
        "cgm",
        "css",
        "shtml",
        "html",
        "htm",
        "zip",
        "xml",
        "ppt",
        "pptx",
        "tar",
        "ez",
        "ics",
        "mobi",
        "msg",
        "pub",
        "eps",
        "odt",
        "mp3",
        "m4a",
        "m4v",
        "wma",
        "ogg",
        "flac",
        "wav",
        "aif",
        "aifc",
        "aiff",
        "mp4",
        "mov",
        "avi",
        "mkv",
        "mpeg",
        "mpg",
        "wmv",
        "pkpass",
        "xlsm",
    )
)
ENVELOPE = ("to", "cc", "bcc")


class BrevoError(Exception):
    """The first problem found in a request: Brevo's code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _reply(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = orjson.dumps({"code": code, "message": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _addresses(entries: Any, field: str, *, required: bool = False) -> list[str]:
    """The lower-cased addresses of a to/cc/bcc list; raises on the first bad entry."""
    if entries is None and not required:
        return []
    if not isinstance(entries, list) or not entries:
        raise BrevoError("missing_parameter", f"{field} is missing")
    found = []
    for entry in entries:
        email = entry.get("email") if isinstance(entry, dict) else None
        if not is_email(email):
            raise BrevoError("invalid_parameter", f"email is not valid in {field}")
        found.append(email.lower())
    return found


def _envelope(holder: dict[str, Any], *, to_required: bool) -> list[str]:
    found = _addresses(holder.get("to"), "to", required=to_required)
    for field in ("cc", "bcc"):
        found += _addresses(holder.get(field), field)
    reply_to = holder.get("replyTo")
    if reply_to is not None and not is_email(
        reply_to.get("email") if isinstance(reply_to, dict) else None
    ):
        raise BrevoError("invalid_parameter", "email is not valid in replyTo")
    return found


def check_email(mail: Any) -> list[str]:
    """The recipients of a valid request (versions included); raises `BrevoError` otherwise."""
    if not isinstance(mail, dict):
        raise BrevoError("invalid_parameter", "Input must be a JSON object")
    templated = "templateId" in mail
    sender = mail.get("sender")
    if not templated:
        if not isinstance(sender, dict):
            raise BrevoError("missing_parameter", "sender is missing")
        if not isinstance(mail.get("subject"), str) or not mail["subject"]:
            raise BrevoError("missing_parameter", "subject is missing")
        if not any(
            isinstance(mail.get(f), str) and mail[f] for f in ("htmlContent", "textContent")
        ):
            raise BrevoError("missing_parameter", "htmlContent or textContent is missing")
    if isinstance(sender, dict) and not is_email(sender.get("email")):
        raise BrevoError("invalid_parameter", "valid sender email required")
    versions = mail.get("messageVersions")
    recipients = _envelope(mail, to_required=versions is None)
    if versions is not None:
        recipients = _versions(versions)
    if len(recipients) > MAX_REQUEST_RECIPIENTS:
        raise BrevoError("out_of_range", "the total number of recipients is over 2000")
    headers = mail.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise BrevoError("invalid_parameter", "headers must be an object of strings")
    tags = mail.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BrevoError("invalid_parameter", "tags must be an array of strings")
    size = sum(len(mail.get(f) or "") for f in ("htmlContent", "textContent", "subject"))
    if size + _attachments(mail.get("attachment")) > MAX_EMAIL_BYTES:
        raise BrevoError("out_of_range", "the email is over 20 MB with its attachments")
    return recipients


def _versions(versions: Any) -> list[str]:
    if not isinstance(versions, list) or not versions:
        raise BrevoError("invalid_parameter", "messageVersions must be a non-empty array")
    if len(versions) > MAX_VERSIONS:
        raise BrevoError("out_of_range", f"messageVersions holds over {MAX_VERSIONS} versions")
    recipients = []
    for version in versions:
        if not isinstance(version, dict):
            raise BrevoError("invalid_parameter", "a message version must be an object")
        found = _envelope(version, to_required=True)
        if len(found) > MAX_VERSION_RECIPIENTS:
            raise BrevoError("out_of_range", "a message version has over 99 recipients")
        recipients += found
    return recipients


def _attachments(files: Any) -> int:
    """The decoded size of the attachments; raises on the first bad one."""
    if files is None:
        return 0
    if not isinstance(files, list):
        raise BrevoError("invalid_parameter", "attachment must be an array")
    size = 0
    for attachment in files:
        fields = attachment if isinstance(attachment, dict) else {}
        content, name, url = fields.get("content"), fields.get("name"), fields.get("url")
        if content is None and url is None:
            raise BrevoError("missing_parameter", "attachment url or content is missing")
        if content is not None:
            if not isinstance(name, str) or not name:
                raise BrevoError("missing_parameter", "attachment name is missing")
            if not isinstance(content, str) or not is_base64(content):
                raise BrevoError("invalid_parameter", "attachment content is not valid base64")
            size += len(base64.b64decode(content))
        named = name if isinstance(name, str) else str(url)
        if named.rpartition(".")[2].lower() not in EXTENSIONS:
            raise BrevoError("invalid_parameter", f"Unsupported file extension in {named}")
    return size


def _message_id() -> str:
    """An id shaped like Brevo's: `<timestamp.digits@smtp-relay.mailin.fr>`."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return f"<{stamp}.{secrets.randbelow(10**12):012d}@smtp-relay.mailin.fr>"


class BrevoProvider(Provider):
    """``POST /v3/smtp/email`` with an ``api-key`` header; 201 and a ``messageId`` when accepted."""

    name = "brevo"
    routes = (("POST", "/v3/smtp/email"),)
    max_body_bytes = MAX_BODY_BYTES
    secret_headers = frozenset({"authorization", "api-key"})

    async def receive(self, request: web.Request) -> Submission:
        if request.headers.get("api-key", "") not in self.api_keys:
            raise Rejection(_reply(401, "unauthorized", "Key not found"))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise Rejection(_reply(413, "out_of_range", "Request entity too large"))
        try:
            raw = await request.read()
            mail = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_reply(413, "out_of_range", "Request entity too large")) from None
        except orjson.JSONDecodeError:
            raise Rejection(_reply(400, "bad_request", "Input must be a valid JSON")) from None
        try:
            recipients = check_email(mail)
        except BrevoError as error:
            raise Rejection(_reply(400, error.code, error.message), raw) from None
        return Submission(mail, recipients, raw)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        versions = submission.payload.get("messageVersions")
        if versions is None:
            message_id = _message_id()
            body: dict[str, Any] = {"messageId": message_id}
        else:
            body = {"messageIds": [_message_id() for _ in versions]}
            message_id = ",".join(body["messageIds"])
        response = web.Response(
            status=201, body=orjson.dumps(body), content_type="application/json"
        )
        return response, message_id

    def rate_limited(self, reset_at: int) -> web.Response:
        headers = {
            "x-sib-ratelimit-limit": str(RATE_LIMIT),
            "x-sib-ratelimit-remaining": "0",
            "x-sib-ratelimit-reset": str(max(1, reset_at - int(time.time()))),
        }
        return _reply(429, "too_many_requests", "The expected rate limit is exceeded", **headers)

    def server_error(self, status: int) -> web.Response:
        return _reply(status, "internal_error", "An internal error occurred, please retry")

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        mail = submission.payload
        for holder in [mail, *(mail.get("messageVersions") or ())]:
            for field in ENVELOPE:
                for entry in holder.get(field) or ():
                    if recipient is None or entry["email"].lower() == recipient:
                        return _reply(400, "invalid_parameter", f"email is not valid in {field}")
        return _reply(400, "invalid_parameter", "email is not valid in to")
