"""Mailjet's Send API v3.1 (`POST /v3.1/send`) as its guide describes it, for the ESP simulator.

Error codes, statuses and meanings are those of the guide's "Send API errors" table; the message
texts are ours where the guide gives none. Like Mailjet, each message of `Messages` is checked on
its own: when any is refused the answer is 400 with one result per message, the valid ones
carrying their ids, and `ErrorRelatedTo` names the property within the message (`To[1].Email`).
A scripted "400" rule refuses only the messages holding the matched recipient, the same way.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.core import Provider, Rejection, Submission, is_base64, is_email

MAX_BODY_BYTES = 50 * 1024 * 1024  # undocumented; 50 messages of bodies plus 15 MB of files fits
MAX_MESSAGES = 50  # "the limit is 50 messages per call"
MAX_RECIPIENTS = 50  # To + Cc + Bcc, a repeated address counted once
MAX_SUBJECT_CHARS = 255
MAX_ATTACHMENT_BYTES = 15 * 1024 * 1024  # all attachments of a message, inline included
ENVELOPE = ("To", "Cc", "Bcc")
# Headers with a dedicated property or set by Mailjet: send-0011 when found in `Headers`.
FORBIDDEN_HEADERS = frozenset(
    name.lower()
    for name in (
        "From",
        "Sender",
        "Subject",
        "To",
        "Cc",
        "Bcc",
        "Return-Path",
        "Delivered-To",
        "DKIM-Signature",
        "DomainKey-Status",
        "Received-SPF",
        "Authentication-Results",
        "Received",
        "X-Mailjet-Prio",
        "X-Mailjet-Debug",
        "User-Agent",
        "X-Mailer",
        "X-MJ-CustomID",
        "X-MJ-EventPayload",
        "X-MJ-Vars",
        "X-MJ-TemplateErrorDeliver",
        "X-MJ-TemplateErrorReporting",
        "X-MJ-TemplateLanguage",
        "X-Mailjet-TrackOpen",
        "X-Mailjet-TrackClick",
        "X-MJ-TemplateID",
        "X-MJ-WorkflowID",
        "X-Feedback-Id",
        "X-Mailjet-Segmentation",
        "List-Id",
        "X-MJ-MID",
        "X-MJ-ErrorMessage",
        "Date",
        "X-CSA-Complaints",
        "Message-Id",
        "X-Mailjet-Campaign",
        "X-MJ-StatisticsContactsListID",
    )
)
UNAUTHORIZED = (
    "API key authentication/authorization failure. You may be unauthorized to access the API or"
    " your API key may be expired. Visit API keys management section to check your keys."
)
MALFORMED = "Malformed JSON, please review the syntax and properties types."
TOO_LARGE = "The payload size is over the limit."
NO_CONTENT = 'At least "HTMLPart", "TextPart" or "TemplateID" must be provided.'
SERVER_ERRORS = {500: "Internal Server Error", 503: "Service Unavailable"}


def _global(status: int, message: str, code: str = "") -> web.Response:
    """A payload-wide error, without per-message results (the guide's "Global Error")."""
    error: dict[str, Any] = {"ErrorIdentifier": str(uuid.uuid4())}
    if code:
        error["ErrorCode"] = code
    error |= {"ErrorMessage": message, "StatusCode": status}
    return web.Response(status=status, body=orjson.dumps(error), content_type="application/json")


def _error(code: str, message: str, *related: str, status: int = 400) -> dict[str, Any]:
    return {
        "ErrorIdentifier": str(uuid.uuid4()),
        "ErrorCode": code,
        "StatusCode": status,
        "ErrorMessage": message,
        "ErrorRelatedTo": list(related),
    }


def _results(status: int, results: list[dict[str, Any]]) -> web.Response:
    body = orjson.dumps({"Messages": results})
    return web.Response(status=status, body=body, content_type="application/json")


def _recipients(message: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(property, index, lower-cased address) for each valid To, Cc and Bcc entry."""
    found = []
    for kind in ENVELOPE:
        entries = message.get(kind)
        for j, entry in enumerate(entries if isinstance(entries, list) else ()):
            email = entry.get("Email") if isinstance(entry, dict) else None
            if is_email(email):
                found.append((kind, j, email.lower()))
    return found


def _success(message: dict[str, Any], sandbox: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"Status": "success", "CustomID": message.get("CustomID", "")}
    for kind in ENVELOPE:
        sent = []
        for entry in message.get(kind) or ():
            number = 0 if sandbox else secrets.randbits(56)
            sent.append(
                {
                    "Email": entry["Email"],
                    "MessageUUID": "" if sandbox else str(uuid.uuid4()),
                    "MessageID": number,
                    "MessageHref": f"https://api.mailjet.com/v3/REST/message/{number}",
                }
            )
        result[kind] = sent
    return result


def check_message(message: Any) -> list[dict[str, Any]]:
    """Every documented refusal one message earns; empty when Mailjet would send it."""
    if not isinstance(message, dict):
        return [_error("mj-0004", 'Type mismatch. Expected type "object".', "Message")]
    errors: list[dict[str, Any]] = []

    def mailbox(value: Any, where: str) -> None:
        email = value.get("Email") if isinstance(value, dict) else None
        if email is None:
            errors.append(_error("mj-0003", f"The {where}.Email is mandatory but missing", where))
        elif not is_email(email):
            errors.append(_error("mj-0013", f'"{email}" is an invalid email address.', where))

    if "From" not in message:
        errors.append(_error("mj-0003", "The From is mandatory but missing from the input", "From"))
    else:
        mailbox(message["From"], "From")
    if "ReplyTo" in message:
        mailbox(message["ReplyTo"], "ReplyTo")
    for kind in ENVELOPE:
        entries = message.get(kind)
        if entries is None and kind != "To":
            continue
        if entries is None:
            errors.append(_error("mj-0003", "The To is mandatory but missing from the input", kind))
        elif not isinstance(entries, list):
            errors.append(
                _error("mj-0004", 'Type mismatch. Expected type "array of emails".', kind)
            )
        elif not entries and kind == "To":
            errors.append(_error("mj-0007", "The To array must not be empty", kind))
        else:
            for j, entry in enumerate(entries):
                mailbox(entry, f"{kind}[{j}]")
    if len({address for _, _, address in _recipients(message)}) > MAX_RECIPIENTS:
        message_text = f"The total number of recipients is over the limit of {MAX_RECIPIENTS}"
        errors.append(_error("send-0015", message_text, *ENVELOPE))
    subject = message.get("Subject")
    if subject is not None and (not isinstance(subject, str) or len(subject) > MAX_SUBJECT_CHARS):
        errors.append(_error("mj-0006", "The Subject is over 255 characters", "Subject"))
    if not any(message.get(part) for part in ("HTMLPart", "TextPart", "TemplateID")):
        errors.append(_error("send-0003", NO_CONTENT, "HTMLPart", "TextPart"))
    for field in ("CustomID", "EventPayload", "CustomCampaign", "TextPart", "HTMLPart"):
        if field in message and not isinstance(message[field], str):
            errors.append(_error("mj-0004", 'Type mismatch. Expected type "string".', field))
    if message.get("DeduplicateCampaign") and not message.get("CustomCampaign"):
        text = "DeduplicateCampaign can only be used with a CustomCampaign"
        errors.append(_error("send-0012", text, "CustomCampaign", "DeduplicateCampaign"))
    errors += _headers(message.get("Headers"))
    errors += _attachments(message)
    return errors


def _headers(headers: Any) -> list[dict[str, Any]]:
    if headers is None:
        return []
    if not isinstance(headers, dict):
        return [_error("mj-0004", 'Type mismatch. Expected type "object".', "Headers")]
    errors = []
    for name, value in headers.items():
        where = f'Headers["{name}"]'
        if name.lower() in FORBIDDEN_HEADERS:
            text = f'The "{name}" header cannot be set in Headers; use its dedicated property'
            errors.append(_error("send-0011", text, where))
        elif not isinstance(value, str):
            errors.append(_error("mj-0004", 'Type mismatch. Expected type "string".', where))
    return errors


def _attachments(message: dict[str, Any]) -> list[dict[str, Any]]:
    errors, size = [], 0
    for kind in ("Attachments", "InlinedAttachments"):
        files = message.get(kind)
        if files is None:
            continue
        if not isinstance(files, list):
            errors.append(_error("mj-0004", 'Type mismatch. Expected type "array".', kind))
            continue
        for k, attachment in enumerate(files):
            fields = attachment if isinstance(attachment, dict) else {}
            for name in ("ContentType", "Filename", "Base64Content"):
                if not isinstance(fields.get(name), str) or not fields[name]:
                    text = f"The {name} must be a non-empty string"
                    errors.append(_error("mj-0012", text, f"{kind}[{k}].{name}"))
            content = fields.get("Base64Content")
            if isinstance(content, str) and content:
                if not is_base64(content):
                    text = "The Base64Content is not valid base64"
                    errors.append(_error("mj-0004", text, f"{kind}[{k}].Base64Content"))
                else:
                    size += len(base64.b64decode(content))
    if size > MAX_ATTACHMENT_BYTES:
        text = "The attachments are over the limit of 15 MB"
        errors.append(_error("mj-0011", text, "Attachments", "InlinedAttachments"))
    return errors


class MailjetProvider(Provider):
    """``POST /v3.1/send`` with Basic auth (API key : secret key); 200 and per-message results."""

    name = "mailjet"
    routes = (("POST", "/v3.1/send"),)
    max_body_bytes = MAX_BODY_BYTES

    def _authorized(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            public, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(public) and (secret in self.api_keys or f"{public}:{secret}" in self.api_keys)

    async def receive(self, request: web.Request) -> Submission:
        if not self._authorized(request.headers.get("Authorization", "")):
            raise Rejection(_global(401, UNAUTHORIZED, "mj-0015"))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise Rejection(_global(400, TOO_LARGE, "mj-0011"))
        try:
            raw = await request.read()
            payload = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_global(400, TOO_LARGE, "mj-0011")) from None
        except orjson.JSONDecodeError:
            raise Rejection(_global(400, MALFORMED, "mj-0002")) from None
        messages = payload.get("Messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list) or not messages:
            code = "mj-0007" if messages == [] else "mj-0003"
            raise Rejection(
                _global(400, "The Messages array is mandatory and not empty", code), raw
            )
        if len(messages) > MAX_MESSAGES:
            text = f"The Messages array holds {len(messages)} messages; the limit is {MAX_MESSAGES}"
            raise Rejection(_global(400, text, "mj-0008"), raw)
        if not isinstance(payload.get("SandboxMode", False), bool):
            raise Rejection(_global(400, 'Type mismatch. Expected type "boolean".', "mj-0004"), raw)
        checks = [check_message(message) for message in messages]
        if any(checks):
            sandbox = payload.get("SandboxMode", False)
            results = [
                {"Status": "error", "Errors": errors} if errors else _success(message, sandbox)
                for message, errors in zip(messages, checks, strict=True)
            ]
            raise Rejection(_results(400, results), raw)
        recipients = [address for m in messages for _, _, address in _recipients(m)]
        return Submission(payload, recipients, raw)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        sandbox = submission.payload.get("SandboxMode", False)
        results = [_success(message, sandbox) for message in submission.payload["Messages"]]
        # The record keeps one id per message, in order: the first To recipient's MessageUUID.
        record_id = ",".join(result["To"][0]["MessageUUID"] for result in results)
        return _results(200, results), record_id

    def rate_limited(self, reset_at: int) -> web.Response:
        # Mailjet documents a bare 429 ("wait and retry") and no rate-limit header.
        return _global(429, "Too Many Requests")

    def server_error(self, status: int) -> web.Response:
        return _global(status, SERVER_ERRORS.get(status, "Internal Server Error"))

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        sandbox = submission.payload.get("SandboxMode", False)
        results = []
        for i, message in enumerate(submission.payload["Messages"]):
            hits = [
                (kind, j)
                for kind, j, address in _recipients(message)
                if address == recipient or (recipient is None and i == 0 and (kind, j) == ("To", 0))
            ]
            if hits:
                errors = [
                    _error("mj-0013", "The recipient address was refused.", f"{kind}[{j}].Email")
                    for kind, j in hits
                ]
                results.append({"Status": "error", "Errors": errors})
            else:
                results.append(_success(message, sandbox))
        return _results(400, results)
