"""SendGrid's v3 Mail Send endpoint as its documentation describes it, for the ESP simulator.

Error messages are the documented ones (API_Reference/Web_API_v3/Mail/errors); ``field`` is the
JSON path of the offending value (``personalizations.0.to.1.email``), as SendGrid reports it.
"""

from __future__ import annotations

import secrets
from typing import Any

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

MAX_BODY_BYTES = 30 * 1024 * 1024  # "the total size of your email ... must be less than 30MB"
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000  # to + cc + bcc over every personalization
MAX_EMAIL_CHARS = 320
MAX_CUSTOM_ARGS_BYTES = 10_000  # merged global + personalization args, measured as JSON
MAX_CATEGORIES = 10
MAX_CATEGORY_CHARS = 255
RATE_LIMIT = 10_000  # documented ceiling: 10,000 Mail Send requests per second
RESERVED_HEADERS = frozenset(
    {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type", "to", "from"}
    | {"content-transfer-encoding", "subject", "reply-to", "cc", "bcc"}
)
HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
# The documented messages, verbatim but for HTML markup.
_LENGTH_LABEL = {"to": "To", "cc": "CC", "bcc": "BCC", "from": "From", "reply_to": "Reply-To"}
_EXAMPLE = (
    'e.g. {"email": "example@example.com"} or'
    ' {"email": "example@example.com", "name": "Example Recipient"}'
)
FROM_REQUIRED = (
    "The from object must be provided for every email send. It is an object that requires the"
    " email parameter, but may also contain a name parameter. " + _EXAMPLE
)
TO_REQUIRED = "The to parameter is required for all personalization objects."
NO_PERSONALIZATION = "You must have at least one personalization."
TOO_MANY_PERSONALIZATIONS = (
    "The personalization block is limited to 1000 personalizations per API request. You have"
    " provided {n} personalizations. Please consider splitting this into multiple requests and"
    " resending your request."
)
TOO_MANY_RECIPIENTS = "There is a limit of 1000 total recipients (to + cc + bcc) per request."
DUPLICATE_RECIPIENT = (
    "Each unique email address in the personalizations array should only be included once."
    " You have included {email} more than once."
)
SUBJECT_EMPTY = "The subject of your email must be a string at least one character in length."
SUBJECT_REQUIRED = (
    "The subject is required. You can get around this requirement if you use a template with a"
    " subject defined or if every personalization has a subject defined."
)
CONTENT_REQUIRED = (
    "The content param is required unless you are using a transactional template and have"
    " defined a template_ID."
)
CONTENT_EMPTY = (
    "There must be at least one defined content block. We typically suggest both text/plain and"
    " text/html blocks are included, but only one block is required."
)
TYPE_REQUIRED = "A content type is required, this tells email clients how to display the email."
TYPE_EMPTY = "Your content type must be a string with length of at least one character."
TYPE_CHARACTERS = "Cannot contain ';', or CRLF characters."
VALUE_REQUIRED = "A content value is required, this is the content of the email you are sending."
VALUE_EMPTY = "The content value must be a string at least one character in length."
CONTENT_ORDER = (
    "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in your"
    " email: text/plain needs to be first, followed by text/html, followed by any other content."
)
CUSTOM_ARGS_STRINGS = "All values of custom arguments object must be strings"
CUSTOM_ARGS_SIZE = (
    "The combined size of both global and personalization custom arguments may not exceed"
    " 10,000 bytes per personalization."
)
CATEGORIES_STRINGS = "Categories must be an array of strings."
TOO_MANY_CATEGORIES = (
    "There is a limit of 10 categories for each email that is sent. You provided {n} categories."
)
CATEGORY_LENGTH = (
    "Each category must not be longer than 255 characters. {category} exceeds this limit"
)
# The two header tables word the same rules slightly differently: (global, personalization).
HEADER_RESERVED = (
    "Header can not be one of the reserved keys.",
    "Header cannot be one of the reserved keys.",
)
HEADER_VALUE = (
    "The header values must be strings.",
    "All values of the headers object must be strings.",
)
ATTACHMENT_EMPTY = "The attachment content must be a string at least one character in length."
ATTACHMENT_BASE64 = "The attachment content must be base64 encoded."
FILENAME_REQUIRED = "filename is required."
FILENAME_STRING = "The filename of your attachment must be a string."
DISPOSITION = (
    'The disposition of your attachment can be either "inline" or "attachment".'
    " You provided {disposition}."
)
CONTENT_ID = "The content ID of your attachment must be a string. You provided {content_id}."
UNAUTHORIZED = [{"message": "The provided authorization grant is invalid, expired, or revoked"}]
TOO_LARGE = [{"message": "The JSON payload you have included in your request is too large."}]
BAD_REQUEST = [{"message": "Bad Request"}]
BAD_UTF8 = [{"message": "Invalid UTF8 in request"}]
SERVER_ERRORS = {
    500: "An error occurred on a SendGrid server.",
    503: "The SendGrid v3 Web API is not available.",
}


def _address_message(kind: str) -> str:
    """The documented "must at least have an email parameter" message for `kind`'s table."""
    noun = "array" if kind in ("to", "cc", "bcc") else "object"
    when_used = ", when used," if kind in ("cc", "bcc", "reply_to") else ""
    it = "" if kind == "from" else "it "
    return (
        f"The {kind} {noun}{when_used} must at least have an email parameter with a valid email"
        f" address and {it}may also contain a name parameter. {_EXAMPLE}"
    )


def _reply(status: int, errors: list[dict[str, Any]], **headers: str) -> web.Response:
    errors = [{"field": None, "help": None, **error} for error in errors]
    body = orjson.dumps({"errors": errors})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _email_problem(kind: str, entry: Any) -> str | None:
    email = entry.get("email") if isinstance(entry, dict) else None
    if not is_email(email):
        return _address_message(kind)
    if len(email) > MAX_EMAIL_CHARS:
        return f"The {_LENGTH_LABEL[kind]} email exceeds the maximum total length of 320 characters"
    return None


class MailSendCheck:
    """Every documented 400 a Mail Send body earns; like SendGrid, it reports all it finds."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        self.recipients: list[str] = []  # lower-cased, in request order

    def fail(self, field: str, message: str, table: str) -> None:
        self.errors.append({"message": message, "field": field, "help": HELP + table})

    def run(self, mail: Any) -> None:
        if not isinstance(mail, dict):
            message = f"Invalid type. Expected: object, given: {json_type(mail)}."
            self.fail("(root)", message, "(root)")
            return
        every_subject = self.personalizations(mail.get("personalizations"), mail)
        if not isinstance(mail.get("from"), dict):
            self.fail("from", FROM_REQUIRED, "from")
        elif problem := _email_problem("from", mail["from"]):
            self.fail("from.email", problem, "from")
        if "reply_to" in mail and (problem := _email_problem("reply_to", mail["reply_to"])):
            self.fail("reply_to.email", problem, "reply_to")
        templated = "template_id" in mail
        if "subject" in mail:
            if not isinstance(mail["subject"], str) or not mail["subject"]:
                self.fail("subject", SUBJECT_EMPTY, "subject")
        elif not (templated or every_subject):
            self.fail("subject", SUBJECT_REQUIRED, "subject")
        self.content(mail.get("content"), templated)
        self.headers(mail.get("headers"), "headers", personal=False)
        self.custom_args(mail.get("custom_args"), "custom_args", personal=False)
        self.categories(mail.get("categories"))
        self.attachments(mail.get("attachments"))

    def personalizations(self, envelopes: Any, mail: dict[str, Any]) -> bool:
        """Check every envelope; True when each one brings its own subject."""
        if not isinstance(envelopes, list) or not envelopes:
            self.fail("personalizations", NO_PERSONALIZATION, "personalizations")
            return False
        if len(envelopes) > MAX_PERSONALIZATIONS:
            message = TOO_MANY_PERSONALIZATIONS.format(n=len(envelopes))
            self.fail("personalizations", message, "personalizations")
            return False
        global_args = mail.get("custom_args")
        global_args = global_args if isinstance(global_args, dict) else {}
        every_subject, total = True, 0
        for i, envelope in enumerate(envelopes):
            path = f"personalizations.{i}"
            if not isinstance(envelope, dict):
                self.fail(path, "Invalid type. Expected: object.", "personalizations")
                continue
            if not isinstance(envelope.get("to"), list) or not envelope["to"]:
                self.fail(f"{path}.to", TO_REQUIRED, "personalizations")
            total += self.envelope_recipients(envelope, path)
            if "subject" not in envelope:
                every_subject = False
            elif not isinstance(envelope["subject"], str) or not envelope["subject"]:
                self.fail(f"{path}.subject", SUBJECT_EMPTY, "personalizations.subject")
            self.headers(envelope.get("headers"), f"{path}.headers", personal=True)
            args = self.custom_args(envelope.get("custom_args"), f"{path}.custom_args", True)
            if args and len(orjson.dumps(global_args | args)) > MAX_CUSTOM_ARGS_BYTES:
                self.fail(f"{path}.custom_args", CUSTOM_ARGS_SIZE, "personalizations.custom_args")
        if total > MAX_RECIPIENTS:
            self.fail("personalizations", TOO_MANY_RECIPIENTS, "personalizations")
        return every_subject

    def envelope_recipients(self, envelope: dict[str, Any], path: str) -> int:
        """Check to, cc and bcc of one personalization; returns how many entries they hold."""
        seen: set[str] = set()
        count = 0
        for kind in ("to", "cc", "bcc"):
            entries = envelope.get(kind)
            if entries is None or (kind == "to" and not isinstance(entries, list)):
                continue  # a missing or malformed "to" is reported as TO_REQUIRED
            if not isinstance(entries, list):
                self.fail(f"{path}.{kind}", _address_message(kind), f"personalizations.{kind}")
                continue
            count += len(entries)
            for j, entry in enumerate(entries):
                field = f"{path}.{kind}.{j}.email"
                if problem := _email_problem(kind, entry):
                    self.fail(field, problem, f"personalizations.{kind}")
                elif (email := entry["email"].lower()) in seen:
                    message = DUPLICATE_RECIPIENT.format(email=entry["email"])
                    self.fail(field, message, "personalizations")
                else:
                    seen.add(email)
                    self.recipients.append(email)
        return count

    def content(self, blocks: Any, templated: bool) -> None:
        if blocks is None:
            if not templated:
                self.fail("content", CONTENT_REQUIRED, "content")
            return
        if not isinstance(blocks, list) or not blocks:
            self.fail("content", CONTENT_EMPTY, "content")
            return
        types: list[str] = []
        for k, block in enumerate(blocks):
            fields = block if isinstance(block, dict) else {}
            kind, value = fields.get("type"), fields.get("value")
            if kind is None:
                self.fail(f"content.{k}.type", TYPE_REQUIRED, "content.type")
            elif not isinstance(kind, str) or not kind:
                self.fail(f"content.{k}.type", TYPE_EMPTY, "content.type")
            elif any(c in kind for c in ";\r\n"):
                self.fail(f"content.{k}.type", TYPE_CHARACTERS, "content.type")
            if value is None:
                self.fail(f"content.{k}.value", VALUE_REQUIRED, "content.value")
            elif not isinstance(value, str) or not value:
                self.fail(f"content.{k}.value", VALUE_EMPTY, "content.value")
            types.append(kind.lower() if isinstance(kind, str) else "")
        if "" in types:
            return  # a block without a type has no place in the order yet
        leading = [kind for kind in ("text/plain", "text/html") if kind in types]
        for position, kind in enumerate(leading):
            if types[position] != kind:
                self.fail(f"content.{types.index(kind)}.type", CONTENT_ORDER, "content.value")
                break

    def headers(self, headers: Any, path: str, *, personal: bool) -> None:
        if headers is None:
            return
        table = "personalizations.headers" if personal else "headers"
        if not isinstance(headers, dict):
            self.fail(path, "Invalid type. Expected: object.", table)
            return
        for name, value in headers.items():
            if name.lower() in RESERVED_HEADERS:
                self.fail(f"{path}.{name}", HEADER_RESERVED[personal], table)
            if not isinstance(value, str):
                self.fail(f"{path}.{name}", HEADER_VALUE[personal], table)

    def custom_args(self, args: Any, path: str, personal: bool) -> dict[str, Any]:
        if args is None:
            return {}
        table = "personalizations.custom_args" if personal else "custom_args"
        if not isinstance(args, dict):
            self.fail(path, CUSTOM_ARGS_STRINGS, table)
            return {}
        for key, value in args.items():
            if not isinstance(value, str):
                self.fail(f"{path}.{key}", CUSTOM_ARGS_STRINGS, table)
        if not personal and len(orjson.dumps(args)) > MAX_CUSTOM_ARGS_BYTES:
            self.fail(path, CUSTOM_ARGS_SIZE, table)
        return args

    def categories(self, categories: Any) -> None:
        if categories is None:
            return
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            self.fail("categories", CATEGORIES_STRINGS, "categories")
            return
        if len(categories) > MAX_CATEGORIES:
            self.fail("categories", TOO_MANY_CATEGORIES.format(n=len(categories)), "categories")
        for k, category in enumerate(categories):
            if len(category) > MAX_CATEGORY_CHARS:
                message = CATEGORY_LENGTH.format(category=category)
                self.fail(f"categories.{k}", message, "categories")

    def attachments(self, attachments: Any) -> None:
        if attachments is None:
            return
        if not isinstance(attachments, list):
            self.fail("attachments", "Invalid type. Expected: array.", "attachments")
            return
        for k, attachment in enumerate(attachments):
            path = f"attachments.{k}"
            fields = attachment if isinstance(attachment, dict) else {}
            content, filename = fields.get("content"), fields.get("filename")
            if not isinstance(content, str) or not content:
                self.fail(f"{path}.content", ATTACHMENT_EMPTY, "attachments.content")
            elif not is_base64(content):
                self.fail(f"{path}.content", ATTACHMENT_BASE64, "attachments.content")
            if filename is None:
                self.fail(f"{path}.filename", FILENAME_REQUIRED, "attachments.filename")
            elif not isinstance(filename, str):
                self.fail(f"{path}.filename", FILENAME_STRING, "attachments.filename")
            disposition = fields.get("disposition", "attachment")
            content_id = fields.get("content_id")
            if disposition not in ("inline", "attachment"):
                message = DISPOSITION.format(disposition=disposition)
                self.fail(f"{path}.disposition", message, "attachments.disposition")
            elif disposition == "inline" and (not isinstance(content_id, str) or not content_id):
                message = CONTENT_ID.format(content_id=orjson.dumps(content_id).decode())
                self.fail(f"{path}.content_id", message, "attachments.content_id")


class SendGridProvider(Provider):
    """``POST /v3/mail/send`` with a Bearer key; 202 and an ``X-Message-Id`` when accepted."""

    name = "sendgrid"
    routes = (("POST", "/v3/mail/send"),)
    max_body_bytes = MAX_BODY_BYTES

    async def receive(self, request: web.Request) -> Submission:
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer ") or authorization[7:] not in self.api_keys:
            raise Rejection(_reply(401, UNAUTHORIZED))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise Rejection(_reply(413, TOO_LARGE))
        try:
            raw = await request.read()
            mail = orjson.loads(raw)
        except web.HTTPRequestEntityTooLarge:
            raise Rejection(_reply(413, TOO_LARGE)) from None
        except orjson.JSONDecodeError:
            try:
                raw.decode()
            except UnicodeDecodeError:
                raise Rejection(_reply(415, BAD_UTF8)) from None
            raise Rejection(_reply(400, BAD_REQUEST)) from None
        check = MailSendCheck()
        check.run(mail)
        if check.errors:
            raise Rejection(_reply(400, check.errors), raw)
        return Submission(mail, check.recipients, raw)

    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        message_id = secrets.token_urlsafe(16)  # 22 URL-safe characters, like SendGrid's ids
        return web.Response(status=202, headers={"X-Message-Id": message_id}), message_id

    def rate_limited(self, reset_at: int) -> web.Response:
        body = b'{"errors":[{"field":null,"message":"too many requests"}]}'
        headers = {
            "X-RateLimit-Limit": str(RATE_LIMIT),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset_at),
        }
        return web.Response(status=429, body=body, content_type="application/json", headers=headers)

    def server_error(self, status: int) -> web.Response:
        return _reply(status, [{"message": SERVER_ERRORS.get(status, "Internal Server Error")}])

    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        for i, envelope in enumerate(submission.payload["personalizations"]):
            for kind in ("to", "cc", "bcc"):
                for j, entry in enumerate(envelope.get(kind) or ()):
                    if recipient is None or entry["email"].lower() == recipient:
                        field = f"personalizations.{i}.{kind}.{j}.email"
                        error = {"message": _address_message(kind), "field": field}
                        return _reply(400, [error | {"help": f"{HELP}personalizations.{kind}"}])
        return _reply(400, BAD_REQUEST)
