"""Pure validation of every field a caller sends; each problem raises `InvalidArgument` with a path.

The machine's `email` package predates the fixes for CVE-2023-27043 (address parsing) and
CVE-2024-6923 (header injection), so none of it is used here: the rules are ours.

- An address is one bare ``local@domain``: an ASCII dot-atom local part (quoted local parts and
  SMTPUTF8 local parts are refused, as major ESPs do) and a hostname domain. A non-ASCII domain
  must IDNA-encode (stdlib codec, IDNA 2003) *and* decode back to itself: characters IDNA drops
  or maps (zero-width space, fullwidth dots, ``ß``) would make the domain mean two things.
- Header text (display names, header values, subjects, filenames, metadata values) refuses every
  line break and control character (C0 including TAB, DEL, C1, U+2028/9), also inside RFC 2047
  encoded words; adjacent words are joined and must decode strictly in their charset.
- Headers the service owns, and headers an ESP reads as sending instructions over SMTP
  (``X-SMTPAPI``, ``X-SES-*``, ``X-Mailgun-*``, ...), cannot be set by callers.
"""

from __future__ import annotations

import binascii
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.errors import InvalidArgument

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_ATTACHMENT_BYTES",
    "MAX_BATCH",
    "MAX_DATA_BYTES",
    "MAX_DATA_DEPTH",
    "MAX_HEADERS",
    "MAX_RECIPIENTS",
    "check_address",
    "check_bare_address",
    "check_header_name",
    "check_header_text",
    "parse_data",
    "validate_batch_size",
    "validate_email",
]

MAX_BATCH = 1000  # items per SendBatch request or SendStream chunk
MAX_RECIPIENTS = 50  # to + cc + bcc: SES's per-message limit
MAX_ADDRESS, MAX_LOCAL_PART, MAX_NAME = 254, 64, 256
MAX_DATA_BYTES = 128 * 1024  # UTF-8 bytes of data_json
MAX_DATA_DEPTH = 32  # a top-level object is depth 1; orjson alone allows 1024
MAX_HEADERS, MAX_HEADER_NAME, MAX_HEADER_VALUE = 50, 76, 998
MAX_TAGS, MAX_TAG = 10, 255
# 9 KiB: with JSON quoting and our swu_message_id it stays under SendGrid's 10,000-byte custom_args
MAX_METADATA_KEYS, MAX_METADATA_VALUE, MAX_METADATA_BYTES = 32, 1024, 9 * 1024
MAX_IDEMPOTENCY_KEY = 255
MAX_LOCALE = 35  # RFC 5646 4.4.1: the length implementations must support
MAX_ATTACHMENTS, MAX_FILENAME = 20, 255
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024  # all attachments of one item together
MAX_SCHEDULE_AHEAD = 30 * 86400  # seconds
_TIMESTAMP_RANGE = range(-62135596800, 253402300800)  # 0001-01-01 .. 9999-12-31, as protobuf

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_LDH_LABEL = re.compile(_LABEL)
# The whole rule for the common case in one match: local part <= 64, final label not all digits.
_ADDRESS = re.compile(rf"(?=[^@]{{1,64}}@){_DOT_ATOM.pattern}@(?:{_LABEL}\.)+(?![0-9]+\Z){_LABEL}")
_NOT_BARE = re.compile(r'[\s,;:<>()\[\]"\\\x00-\x1f\x7f-\x9f]')  # \s includes U+2028, U+0085
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")  # "invoice\u202efdp.exe" spoofing
# Lenient on purpose (spaces, empty charset), like the laxest decoders that will read the header.
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([BbQq])\?(.*?)\?=")
_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTENT_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")
_TOKEN = r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]{1,127}"  # RFC 2045 token; RFC 6838 caps names at 127
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
_OWNED_HEADER_NAMES = (
    "from to cc bcc reply-to sender subject date message-id mime-version content-type "
    "content-transfer-encoding content-disposition content-id return-path received "
    "dkim-signature x-smtpapi x-msys-api"  # the last two: SendGrid/SparkPost SMTP instructions
)
_OWNED_HEADERS = frozenset(_OWNED_HEADER_NAMES.split())
_OWNED_PREFIXES = ("resent-", "x-ses-", "x-mailgun-", "x-pm-", "x-mc-")
_PRIORITIES = frozenset(delivery_pb2.Priority.values())


def _describe(ch: str) -> str:
    kind = "a line break" if ch in _LINE_BREAKS else "a control character"
    return f"{kind} (U+{ord(ch):04X})"


def _too_long(length: int, limit: int, unit: str = "characters") -> str:
    return f"too long: {length} {unit}; the limit is {limit}"


def _check_count(count: int, limit: int, field: str, noun: str = "") -> None:
    if count > limit:
        problem = f"too many {noun or field}: {count}; the limit is {limit}"
        raise InvalidArgument(problem, field=field)


def _keyed(prefix: str, key: str) -> str:
    return f"{prefix}[{json.dumps(key)}]"  # escapes quotes and line breaks in hostile keys


def _text_problem(value: str, max_length: int) -> str | None:
    """Why `value` cannot go into a header, or None."""
    if len(value) > max_length:
        return _too_long(len(value), max_length)
    # isprintable() is a C-speed pass for plain text; the regex decides for the rest.
    if not value.isprintable() and (bad := _BAD_TEXT.search(value)):
        return f"contains {_describe(bad[0])}"
    return _encoded_word_problem(value) if "=?" in value else None


def _encoded_word_problem(value: str) -> str | None:
    """Decode RFC 2047 words as a mail client would, and check what comes out."""
    groups: list[tuple[str, bytearray]] = []
    end = -1
    for word in _ENCODED_WORD.finditer(value):
        charset = word[1].partition("*")[0].lower()  # drop an RFC 2231 language suffix
        try:
            text = word[3].encode("ascii")
            b_encoded = word[2] in "Bb"
            raw = binascii.a2b_base64(text + b"==") if b_encoded else binascii.a2b_qp(text, True)
        except (UnicodeError, binascii.Error):
            return f"malformed RFC 2047 encoded word {word[0]!r}"
        # Clients join adjacent words of one charset, so a character may span two words.
        if groups and groups[-1][0] == charset and not value[end : word.start()].strip():
            groups[-1][1].extend(raw)
        else:
            groups.append((charset, bytearray(raw)))
        end = word.end()
    for charset, joined in groups:
        try:
            decoded = joined.decode(charset)
        except LookupError:
            return f"RFC 2047 encoded word in unknown charset {charset!r}"
        except ValueError:
            return f"RFC 2047 encoded word is not valid {charset}"
        if bad := _BAD_TEXT.search(decoded):
            return f"an RFC 2047 encoded word hides {_describe(bad[0])}"
        if "=?" in decoded and (problem := _encoded_word_problem(decoded)):
            return problem
    return None


def _domain_problem(domain: str) -> str | None:
    ascii_domain = domain
    if not domain.isascii():
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            return f"domain {domain!r} does not IDNA-encode ({exc})"
        if ascii_domain.encode("ascii").decode("idna").lower() != domain.lower():
            return f"domain {domain!r} changes under IDNA (it becomes {ascii_domain!r})"
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        return f"domain {domain!r} needs at least one dot, e.g. example.com"
    for label in labels:
        if not label:
            return f"domain {domain!r} has an empty label (leading, trailing or double dot)"
        if len(label) > 63:
            return f"domain label {label!r} is {_too_long(len(label), 63)}"
        if not _LDH_LABEL.fullmatch(label):
            return f"domain label {label!r} must be letters, digits and inner hyphens"
    if labels[-1].isdigit():
        return f"domain {domain!r} has an all-numeric top-level label (IP addresses are refused)"
    if len(ascii_domain) > 253:
        return f"domain is {_too_long(len(ascii_domain), 253, 'octets once IDNA-encoded')}"
    return None


def _address_problem(email: str) -> str | None:
    """Why `email` is not one strict bare mailbox, or None."""
    if len(email) <= MAX_ADDRESS and _ADDRESS.fullmatch(email):
        return None
    if not email:
        return "required"
    if len(email) > MAX_ADDRESS:
        return _too_long(len(email), MAX_ADDRESS)
    if "@[" in email:
        return "IP-literal domains are not accepted"
    if bad := _NOT_BARE.search(email):
        return f"must be one bare address (no name, comment, list or quotes); found {bad[0]!r}"
    local, _, domain = email.partition("@")
    if not local or not domain or "@" in domain:
        return "not a valid address: it needs one '@' with text on both sides"
    if not local.isascii():
        return "non-ASCII local parts (SMTPUTF8) are not accepted"
    if len(local) > MAX_LOCAL_PART:
        return f"local part is {_too_long(len(local), MAX_LOCAL_PART)}"
    if not _DOT_ATOM.fullmatch(local):
        return "local part must be letters, digits, !#$%&'*+-/=?^_`{|}~ and single inner dots"
    if problem := _domain_problem(domain):
        return problem
    if (length := len(local) + 1 + len(domain.encode("idna"))) > MAX_ADDRESS:
        return _too_long(length, MAX_ADDRESS, "octets once IDNA-encoded")
    # Only IDN addresses get here valid; an ASCII one the fast regex refused is still refused.
    return "not a valid address" if email.isascii() else None


def check_bare_address(email: str, field: str) -> None:
    """Refuse anything but one strict bare address (``local@domain``), naming `field` itself."""
    if problem := _address_problem(email):
        raise InvalidArgument(problem, field=field)


def check_address(email: str, name: str, field: str) -> None:
    """Refuse anything but one strict mailbox with a single-line display name."""
    if problem := _address_problem(email):
        raise InvalidArgument(problem, field=f"{field}.email")
    if name and (problem := _text_problem(name, MAX_NAME)):
        raise InvalidArgument(problem, field=f"{field}.name")


def check_header_text(value: str, field: str, *, max_length: int = MAX_HEADER_VALUE) -> None:
    """Refuse header text with line breaks or control characters, also RFC 2047-encoded."""
    if problem := _text_problem(value, max_length):
        raise InvalidArgument(problem, field=field)


def _header_name_problem(name: str) -> str | None:
    if len(name) > MAX_HEADER_NAME:
        return f"header name is {_too_long(len(name), MAX_HEADER_NAME)}"
    if not _HEADER_NAME.fullmatch(name):
        if not name:
            return "header name is empty"
        bad = next(c for c in name if not "!" <= c <= "~" or c == ":")
        return f"header name contains {bad!r}; it must be printable US-ASCII without ':' or spaces"
    lower = name.lower()
    if lower in _OWNED_HEADERS or lower.startswith(_OWNED_PREFIXES):
        return f"header {name!r} is set by the service and cannot be given"
    return None


def check_header_name(name: str, field: str) -> None:
    """Refuse malformed field names and the headers the service (or the ESP) owns."""
    if problem := _header_name_problem(name):
        raise InvalidArgument(problem, field=field)


def _deeper_than(container: dict[str, Any] | list[Any], remaining: int) -> bool:
    """True if some container nests more than `remaining` levels below `container`."""
    for child in container.values() if isinstance(container, dict) else container:
        if isinstance(child, dict | list) and (
            remaining == 0 or _deeper_than(child, remaining - 1)
        ):
            return True
    return False


def parse_data(data_json: str, field: str = "data_json") -> dict[str, Any]:
    """Template data as a dict: empty means {}; otherwise a JSON object within the limits."""
    if not data_json:
        return {}
    if len(data_json) * 4 > MAX_DATA_BYTES:  # below that even 4-byte characters fit
        size = len(data_json) if data_json.isascii() else len(data_json.encode("utf-8", "replace"))
        if size > MAX_DATA_BYTES:
            raise InvalidArgument(_too_long(size, MAX_DATA_BYTES, "bytes of UTF-8"), field=field)
    try:
        data = orjson.loads(data_json)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", field=field) from exc
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(data), "a scalar")
        raise InvalidArgument(f"must be a JSON object, not {kind}", field=field)
    # Depth never exceeds the number of opening brackets, so most documents skip the walk.
    brackets = data_json.count("{") + data_json.count("[")
    if brackets > MAX_DATA_DEPTH and _deeper_than(data, MAX_DATA_DEPTH - 1):
        raise InvalidArgument(f"nested too deep; the limit is {MAX_DATA_DEPTH} levels", field=field)
    return data


def _ascii_problem(value: str, max_length: int) -> str | None:
    if not 0 < len(value) <= max_length:
        return _too_long(len(value), max_length) if value else "empty"
    if value.isascii() and value.isprintable():
        return None
    bad = next(c for c in value if not " " <= c <= "~")
    return f"must be printable ASCII; found U+{ord(bad):04X}"


def _check_recipients(email: delivery_pb2.Email) -> None:
    to, cc, bcc = email.to, email.cc, email.bcc
    check_address(to.email, to.name, "to")
    if cc or bcc:
        total, field = 1 + len(cc) + len(bcc), "bcc" if bcc else "cc"
        _check_count(total, MAX_RECIPIENTS, field, "recipients (to + cc + bcc)")
        seen = {to.email.lower(): "to"}
        for kind, addresses in (("cc", cc), ("bcc", bcc)):
            for i, address in enumerate(addresses):
                check_address(address.email, address.name, path := f"{kind}[{i}]")
                if (first := seen.setdefault(address.email.lower(), path)) != path:
                    problem = f"duplicate recipient: the same address as {first}.email"
                    raise InvalidArgument(problem, field=f"{path}.email")
    if email.HasField("reply_to"):
        check_address(email.reply_to.email, email.reply_to.name, "reply_to")
    if email.HasField("sender"):
        check_address(email.sender.email, email.sender.name, "sender")


def _check_headers(headers: Mapping[str, str]) -> None:
    _check_count(len(headers), MAX_HEADERS, "headers")
    seen: dict[str, str] = {}
    for name, value in headers.items():
        if problem := _header_name_problem(name) or _text_problem(value, MAX_HEADER_VALUE):
            raise InvalidArgument(problem, field=_keyed("headers", name))
        if (first := seen.setdefault(name.lower(), name)) != name:
            problem = f"header given twice, also as {first!r} (names are case-insensitive)"
            raise InvalidArgument(problem, field=_keyed("headers", name))


def _check_tags(tags: Sequence[str]) -> None:
    _check_count(len(tags), MAX_TAGS, "tags")
    for i, tag in enumerate(tags):
        if problem := _ascii_problem(tag, MAX_TAG):
            raise InvalidArgument(problem, field=f"tags[{i}]")


def _check_metadata(metadata: Mapping[str, str]) -> None:
    _check_count(len(metadata), MAX_METADATA_KEYS, "metadata", "keys")
    size, problem = 0, None
    for key, value in metadata.items():
        if not _METADATA_KEY.fullmatch(key):
            problem = "key must be 1-64 letters, digits, '_', '.' or '-'"
        elif key[:4].lower() == "swu_":
            problem = "keys starting with 'swu_' are reserved for the service"
        if problem := problem or _text_problem(value, MAX_METADATA_VALUE):
            raise InvalidArgument(problem, field=_keyed("metadata", key))
        size += len(key) + (len(value) if value.isascii() else len(value.encode()))
    if size > MAX_METADATA_BYTES:
        problem = _too_long(size, MAX_METADATA_BYTES, "bytes of keys and values")
        raise InvalidArgument(problem, field="metadata")


def _attachment_problem(attachment: delivery_pb2.Attachment, cids: set[str]) -> tuple[str, str]:
    """(field, problem) for one attachment; ("", "") when it is fine."""
    filename, content_id = attachment.filename, attachment.content_id.lower()
    if problem := _text_problem(filename, MAX_FILENAME) if filename else "required":
        return "filename", problem
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        return "filename", "must be a bare file name, without '/' or '\\'"
    if _BIDI_CONTROLS.search(filename):
        return "filename", "contains a bidirectional override character"
    if not _CONTENT_TYPE.fullmatch(attachment.content_type):
        return "content_type", "must be a MIME type/subtype without parameters, e.g. text/csv"
    if content_id and not _CONTENT_ID.fullmatch(content_id):
        return "content_id", "must be 1-128 letters, digits, '.', '_', '@' or '-'"
    if content_id and content_id in cids:
        return "content_id", "another attachment has the same content_id"
    cids.add(content_id)
    return "", ""


def _check_attachments(attachments: Sequence[delivery_pb2.Attachment]) -> None:
    _check_count(len(attachments), MAX_ATTACHMENTS, "attachments")
    total, cids = 0, set[str]()
    for i, attachment in enumerate(attachments):
        name, problem = _attachment_problem(attachment, cids)
        if problem:
            raise InvalidArgument(problem, field=f"attachments[{i}].{name}")
        if not (size := len(attachment.content)):
            raise InvalidArgument("empty", field=f"attachments[{i}].content")
        total += size
    if total > MAX_ATTACHMENT_BYTES:
        problem = _too_long(total, MAX_ATTACHMENT_BYTES, "bytes of attachments")
        raise InvalidArgument(problem, field="attachments")


def _check_send_at(email: delivery_pb2.Email, now: float | None) -> None:
    seconds, nanos = email.send_at.seconds, email.send_at.nanos
    if seconds not in _TIMESTAMP_RANGE or not 0 <= nanos < 1_000_000_000:
        raise InvalidArgument("not a valid timestamp", field="send_at")
    ahead = seconds + nanos / 1e9 - (time.time() if now is None else now)
    if ahead > MAX_SCHEDULE_AHEAD:
        problem = f"{ahead / 86400:.1f} days ahead; the limit is {MAX_SCHEDULE_AHEAD // 86400} days"
        raise InvalidArgument(problem, field="send_at")


def validate_email(email: delivery_pb2.Email, *, now: float | None = None) -> None:
    """Check one item; the first problem raises `InvalidArgument` naming its field."""
    if not _TEMPLATE_ID.fullmatch(template_id := email.template_id):
        problem = "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise InvalidArgument(problem if template_id else "required", field="template_id")
    if (locale := email.locale) and (len(locale) > MAX_LOCALE or not _LOCALE.fullmatch(locale)):
        problem = f"must be a BCP 47 tag of at most {MAX_LOCALE} characters, e.g. fr-CA"
        raise InvalidArgument(problem, field="locale")
    if email.priority not in _PRIORITIES:
        raise InvalidArgument(f"unknown priority {email.priority}", field="priority")
    if (key := email.idempotency_key) and (bad_key := _ascii_problem(key, MAX_IDEMPOTENCY_KEY)):
        raise InvalidArgument(bad_key, field="idempotency_key")
    if email.HasField("send_at"):
        _check_send_at(email, now)
    _check_recipients(email)
    if headers := email.headers:
        _check_headers(headers)
    if tags := email.tags:
        _check_tags(tags)
    if metadata := email.metadata:
        _check_metadata(metadata)
    if attachments := email.attachments:
        _check_attachments(attachments)
    parse_data(email.data_json)


def validate_batch_size(n: int, field: str = "emails") -> None:
    """Refuse an empty batch or one over `MAX_BATCH` items."""
    if n <= 0:
        raise InvalidArgument("empty: send at least one item", field=field)
    _check_count(n, MAX_BATCH, field, "items")
