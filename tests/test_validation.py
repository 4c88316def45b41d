"""Validation of caller input: every rule, the hostile inputs it exists for, and valid items."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

import orjson
import pytest

from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.errors import InvalidArgument
from swu_delivery.validation import (
    MAX_ATTACHMENT_BYTES,
    MAX_BATCH,
    MAX_DATA_BYTES,
    MAX_RECIPIENTS,
    check_address,
    check_header_name,
    check_header_text,
    parse_data,
    validate_batch_size,
    validate_email,
)

NOW = 1_800_000_000.0
JP_LABEL = "日本語のテキストドメイン名前です"  # 16 characters, 44 once IDNA-encoded
DAY = 86400
Mutation = Callable[[delivery_pb2.Email], object]


def b_word(text: str, charset: str = "utf-8", marker: str = "b") -> str:
    """An RFC 2047 B-encoded word for `text`."""
    return f"=?{charset}?{marker}?{base64.b64encode(text.encode(charset)).decode()}?="


def nested(depth: int, kind: str = "{") -> str:
    """A JSON object whose deepest container sits at `depth` (the top-level object is 1)."""
    if kind == "{":
        inner = '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)
    else:
        inner = "[" * (depth - 1) + "]" * (depth - 1)
    return '{"x":' + inner + "}"


def minimal() -> delivery_pb2.Email:
    """The smallest valid item."""
    return delivery_pb2.Email(template_id="order", to=common_pb2.Address(email="jane@example.com"))


def full() -> delivery_pb2.Email:
    """A valid item with every field set."""
    email = delivery_pb2.Email(
        template_id="order_shipped.v2",
        template_version=4_294_967_295,
        locale="fr-CA",
        to=common_pb2.Address(email="jane.doe+orders@example.com", name="Doe, Jane"),
        cc=[common_pb2.Address(email="boss@bücher.de", name="José Ñúñez")],
        bcc=[common_pb2.Address(email="audit@example.org", name="=?utf-8?q?Audit_=C3=A9?=")],
        reply_to=common_pb2.Address(email="support@example.com", name="Support"),
        sender=common_pb2.Address(email="orders@shop.example.com", name="Shop 👩‍💻"),
        data_json=orjson.dumps({"order": {"items": [{"sku": "A1", "qty": 2}]}}).decode(),
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://example.com/u?t=1>"},
        tags=["orders", "shipping"],
        metadata={"customer_id": "42", "order.number": "1000"},
        idempotency_key="order-1000-shipped",
        attachments=[
            delivery_pb2.Attachment(
                filename="invoice.pdf", content_type="application/pdf", content=b"%PDF-1.7"
            ),
            delivery_pb2.Attachment(
                filename="logo.png", content_type="image/png", content=b"\x89PNG", content_id="logo"
            ),
        ],
        priority=delivery_pb2.PRIORITY_BULK,
        validate_render=True,
    )
    email.send_at.FromSeconds(int(NOW) + DAY)
    return email


def raises(fn: Callable[[], object], field: str, fragment: str) -> InvalidArgument:
    """Run `fn`, expect InvalidArgument with `field` and `fragment` in its message."""
    with pytest.raises(InvalidArgument) as info:
        fn()
    assert info.value.field == field
    assert fragment in info.value.message, info.value.message
    return info.value


GOOD_ADDRESSES = [
    pytest.param("a@b.co", id="shortest"),
    pytest.param("jane.doe+tag@example.com", id="plus-tag"),
    pytest.param("o'brien@example.ie", id="apostrophe"),
    pytest.param("!#$%&'*+-/=?^_`{|}~@example.com", id="every-atext-symbol"),
    pytest.param("Jane.Doe@EXAMPLE.COM", id="upper-case"),
    pytest.param("a@1example.com", id="label-starts-with-digit"),
    pytest.param("a@my-host.example.c0m", id="tld-with-digit"),
    pytest.param("x@bücher.de", id="idn-domain"),
    pytest.param("x@BÜCHER.de", id="idn-domain-upper"),
    pytest.param("x@xn--bcher-kva.de", id="punycode-domain"),
    pytest.param("x@例え.テスト", id="idn-japanese"),
    pytest.param("l" * 64 + "@example.com", id="local-64"),
    pytest.param("a@" + "d" * 63 + ".com", id="label-63"),
    pytest.param("a@" + ("d" * 62 + ".") * 3 + "d" * 62 + "x", id="total-254"),
]

BAD_ADDRESSES = [
    pytest.param("", "required", id="empty"),
    pytest.param("a@b.com, c@d.com", "found ','", id="two-addresses-comma"),
    pytest.param("a@b.com;c@d.com", "found ';'", id="two-addresses-semicolon"),
    pytest.param('"x@y" <a@b.com>', "found '\"'", id="quoted-name-angle"),
    pytest.param('"a b"@example.com', "found '\"'", id="quoted-local-part"),
    pytest.param("a(b@c.com)@d.com", "found '('", id="comment-in-local"),
    pytest.param("a@b.com (c@d.com)", "found ' '", id="trailing-comment"),
    pytest.param("<a@b.com>", "found '<'", id="angle-brackets"),
    pytest.param("Jane <a@b.com>", "found ' '", id="name-addr"),
    pytest.param("undisclosed:a@b.com;", "found ':'", id="group-syntax"),
    pytest.param("a\\@b.com", "found '\\\\'", id="backslash"),
    pytest.param("a@b.com\r\nBcc: c@d.com", "found '\\r'", id="crlf"),
    pytest.param("a@b.com\n", "found '\\n'", id="trailing-lf"),
    pytest.param("a\x00@b.com", "found '\\x00'", id="nul"),
    pytest.param("a@b.com\u2028", "found '\\u2028'", id="line-separator"),
    pytest.param("a@b.com\x85", "found '\\x85'", id="nel"),
    pytest.param("a@b.com\t", "found '\\t'", id="tab"),
    pytest.param("a@b@c.com", "one '@'", id="two-at"),
    pytest.param("@b.com", "one '@'", id="no-local"),
    pytest.param("a@", "one '@'", id="no-domain"),
    pytest.param("ab.com", "one '@'", id="no-at"),
    pytest.param("a@[127.0.0.1]", "IP-literal", id="ipv4-literal"),
    pytest.param("a@[IPv6:::1]", "IP-literal", id="ipv6-literal"),
    pytest.param("a@127.0.0.1", "all-numeric", id="bare-ip"),
    pytest.param("a@b.com.", "empty label", id="trailing-dot"),
    pytest.param("a@.b.com", "empty label", id="leading-dot-domain"),
    pytest.param("a@b..com", "empty label", id="double-dot-domain"),
    pytest.param("a..b@c.com", "single inner dots", id="double-dot-local"),
    pytest.param(".a@c.com", "single inner dots", id="leading-dot-local"),
    pytest.param("a.@c.com", "single inner dots", id="trailing-dot-local"),
    pytest.param("a@localhost", "at least one dot", id="dotless-domain"),
    pytest.param("a@-b.com", "inner hyphens", id="leading-hyphen"),
    pytest.param("a@b-.com", "inner hyphens", id="trailing-hyphen"),
    pytest.param("a@b_c.com", "inner hyphens", id="underscore-domain"),
    pytest.param("a@" + "d" * 64 + ".com", "the limit is 63", id="label-64"),
    pytest.param("l" * 65 + "@example.com", "65 characters; the limit is 64", id="local-65"),
    pytest.param("a@" + ("d" * 62 + ".") * 3 + "d" * 62 + "xy", "255", id="total-255"),
    pytest.param("jösé@example.com", "non-ASCII local", id="utf8-local"),
    pytest.param("a@straße.de", "changes under IDNA", id="idn-sharp-s-maps"),
    pytest.param("a@exam\u200bple.com", "changes under IDNA", id="idn-zero-width-space"),
    pytest.param("a@ex\u00adample.com", "changes under IDNA", id="idn-soft-hyphen"),
    pytest.param("a@example\u3002com", "changes under IDNA", id="idn-ideographic-dot"),
    pytest.param("a@ex\uff20mple.com", "changes under IDNA", id="idn-fullwidth-at"),
    pytest.param("a@b\u202ec.com", "does not IDNA-encode", id="idn-bidi-override"),
    pytest.param("a@" + "ü" * 70 + ".de", "does not IDNA-encode", id="idn-label-too-long"),
    pytest.param("a@bücher", "at least one dot", id="idn-dotless"),
    pytest.param("a@" + ".".join([JP_LABEL] * 6) + ".jp", "272 octets", id="idn-domain-too-long"),
    pytest.param(
        "l" * 60 + "@" + ".".join([JP_LABEL] * 5) + ".jp", "288 octets", id="idn-total-too-long"
    ),
]


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_valid_address_passes(address: str) -> None:
    """A strict single mailbox is accepted."""
    check_address(address, "", "to")


@pytest.mark.parametrize(("address", "fragment"), BAD_ADDRESSES)
def test_invalid_address_refused(address: str, fragment: str) -> None:
    """Lists, comments, quotes, IP literals and malformed parts are refused at `<field>.email`."""
    raises(lambda: check_address(address, "Jane", "cc[2]"), "cc[2].email", fragment)


def test_every_ascii_refusal_names_a_reason() -> None:
    """Fuzzed ASCII addresses are refused with a precise reason, never the generic fallback."""
    rng = random.Random(2047)
    alphabet = "ab1-.@_ :\"<>(),;[]'+\\"
    reasons: dict[str, str] = {}
    for _ in range(20000):
        candidate = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        try:
            check_address(candidate, "", "to")
        except InvalidArgument as exc:
            reasons.setdefault(exc.message, candidate)
    assert "not a valid address" not in reasons
    assert len(reasons) > 10  # the fuzzing reached many distinct rules


GOOD_TEXT = [
    pytest.param("Jane Doe", id="plain"),
    pytest.param("Doe, Jane <CEO>", id="specials-are-quoted-later"),
    pytest.param("José Ñúñez", id="latin"),
    pytest.param("山田 太郎", id="cjk"),
    pytest.param("👩‍💻 Dev Team", id="emoji-zwj"),
    pytest.param("=?utf-8?q?Jos=C3=A9?=", id="encoded-word-q"),
    pytest.param(b_word("José"), id="encoded-word-b"),
    pytest.param("50% off =? maybe", id="lone-encoded-word-marker"),
    pytest.param("x" * 256, id="max-length"),
]

HOSTILE_TEXT = [
    pytest.param("Bob\r\nBcc: x@y.com", "line break (U+000D)", id="crlf"),
    pytest.param("Bob\nBcc: x@y.com", "line break (U+000A)", id="lf"),
    pytest.param("Bob\rX", "line break (U+000D)", id="cr"),
    pytest.param("Bob\x00", "control character (U+0000)", id="nul"),
    pytest.param("Bob\u2028Bcc", "line break (U+2028)", id="line-separator"),
    pytest.param("Bob\u2029Bcc", "line break (U+2029)", id="paragraph-separator"),
    pytest.param("Bob\x85Bcc", "line break (U+0085)", id="nel"),
    pytest.param("Bob\vX", "line break (U+000B)", id="vertical-tab"),
    pytest.param("Bob\fX", "line break (U+000C)", id="form-feed"),
    pytest.param("Bob\x1cX", "line break (U+001C)", id="file-separator"),
    pytest.param("Bob\x1eX", "line break (U+001E)", id="record-separator"),
    pytest.param("Bob\tX", "control character (U+0009)", id="tab"),
    pytest.param("Bob\x1b[31m", "control character (U+001B)", id="escape"),
    pytest.param("Bob\x7f", "control character (U+007F)", id="del"),
    pytest.param("José\x9b", "control character (U+009B)", id="c1-in-unicode"),
    pytest.param("=?utf-8?q?Bob=0D=0ABcc:_x@y?=", "hides a line break (U+000D)", id="q-crlf"),
    pytest.param("=?UTF-8?Q?Bob=0d=0aBcc:_x@y?=", "hides a line break (U+000D)", id="Q-upper"),
    pytest.param(b_word("Bob\r\nBcc: x@y"), "hides a line break (U+000D)", id="b-crlf"),
    pytest.param(b_word("Bob\nX", "UTF-8", "B"), "hides a line break (U+000A)", id="B-upper"),
    pytest.param(b_word("Bob\nX").replace("=?=", "?="), "U+000A", id="b-unpadded"),
    pytest.param("Hi =?utf-8?q?a=00b?= there", "hides a control character (U+0000)", id="q-nul"),
    pytest.param("=?utf-8?q?=E2=80=A8?=", "hides a line break (U+2028)", id="q-u2028"),
    pytest.param("=?utf-8?q?=C2=85?=", "hides a line break (U+0085)", id="q-utf8-nel"),
    pytest.param("=?iso-8859-1?q?=85?=", "hides a line break (U+0085)", id="q-latin1-nel"),
    pytest.param("=?utf-8?q?=E2=80?= =?utf-8?q?=A8?=", "U+2028", id="split-across-words"),
    pytest.param("=?utf-8*en?q?a=0Ab?=", "hides a line break (U+000A)", id="rfc2231-language"),
    pytest.param("=?utf-8?q?a b=0A?=", "hides a line break (U+000A)", id="lenient-space"),
    pytest.param(b_word("=?utf-8?q?=0D=0A?="), "hides a line break (U+000D)", id="nested"),
    pytest.param("=?x-nope?q?abc?=", "unknown charset", id="unknown-charset"),
    pytest.param("=?base64?q?abc?=", "unknown charset", id="bytes-codec-charset"),
    pytest.param("=?utf-8?q?=FF?=", "not valid utf-8", id="invalid-utf8"),
    pytest.param("=?utf-8?q?=E2=80?=x=?utf-8?q?=A8?=", "not valid utf-8", id="split-not-adjacent"),
    pytest.param("=?utf-8?b?Q?=", "malformed", id="bad-base64"),
    pytest.param("x" * 257, "257 characters; the limit is 256", id="too-long"),
]


@pytest.mark.parametrize("name", GOOD_TEXT)
def test_valid_display_name_passes(name: str) -> None:
    """Single-line names, including non-ASCII and clean encoded words, are accepted."""
    check_address("jane@example.com", name, "to")


@pytest.mark.parametrize(("name", "fragment"), HOSTILE_TEXT)
def test_hostile_display_name_refused(name: str, fragment: str) -> None:
    """Line breaks and controls are refused in names, also when RFC 2047-encoded."""
    raises(lambda: check_address("jane@example.com", name, "reply_to"), "reply_to.name", fragment)


@pytest.mark.parametrize(("value", "fragment"), HOSTILE_TEXT[:-1])
def test_hostile_header_text_refused(value: str, fragment: str) -> None:
    """check_header_text applies the same rule to header values and rendered subjects."""
    raises(lambda: check_header_text(value, "subject"), "subject", fragment)


def test_header_text_length_limit() -> None:
    """Header text is limited to 998 characters unless the caller says otherwise."""
    check_header_text("x" * 998, "subject")
    raises(lambda: check_header_text("x" * 999, "subject"), "subject", "the limit is 998")
    raises(lambda: check_header_text("x" * 11, "f", max_length=10), "f", "11 characters")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, id=n)
        for n in [
            "X-Campaign",
            "x-custom-id",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
            "Precedence",
            "Auto-Submitted",
            "In-Reply-To",
            "References",
            "X-" + "a" * 74,
        ]
    ],
)
def test_allowed_header_name_passes(name: str) -> None:
    """Custom and list headers may be set."""
    check_header_name(name, "headers")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        pytest.param(n, "set by the service", id=n)
        for n in [
            "From",
            "to",
            "CC",
            "bCc",
            "Reply-To",
            "SENDER",
            "subject",
            "Date",
            "message-id",
            "Mime-Version",
            "cOnTeNt-TyPe",
            "content-transfer-encoding",
            "Content-Disposition",
            "CONTENT-ID",
            "Return-Path",
            "received",
            "dkim-signature",
            "Resent-From",
            "rEsEnT-Message-Id",
            "X-SMTPAPI",
            "x-ses-configuration-set",
            "X-Mailgun-Variables",
            "X-PM-Message-Stream",
        ]
    ]
    + [
        pytest.param("", "empty", id="empty"),
        pytest.param("X-Foo:", "contains ':'", id="colon"),
        pytest.param("X Foo", "contains ' '", id="space"),
        pytest.param("X-Foo\r\nBcc", "contains '\\r'", id="crlf"),
        pytest.param("X-\x00", "contains '\\x00'", id="nul"),
        pytest.param("X-Föö", "contains 'ö'", id="non-ascii"),
        pytest.param("X-" + "a" * 75, "77 characters; the limit is 76", id="too-long"),
    ],
)
def test_bad_header_name_refused(name: str, fragment: str) -> None:
    """Owned headers (any case), ESP control headers and malformed field names are refused."""
    raises(lambda: check_header_name(name, 'headers["n"]'), 'headers["n"]', fragment)


def test_valid_items_pass() -> None:
    """A minimal item and an item with every field set are both accepted."""
    validate_email(minimal(), now=NOW)
    validate_email(full(), now=NOW)


def put(name: str, value: object) -> Mutation:
    """Set a scalar field."""
    return lambda e: setattr(e, name, value)


def put_map(name: str, entries: dict[str, str]) -> Mutation:
    """Add entries to a map field (headers, metadata)."""
    return lambda e: getattr(e, name).update(entries)


def tags(*values: str) -> Mutation:
    """Append tags."""
    return lambda e: e.tags.extend(values)


def many(template: str, n: int, value: str = "v") -> dict[str, str]:
    """n distinct map entries."""
    return {template.format(i): value for i in range(n)}


def recipients(cc: int, bcc: int = 0) -> Mutation:
    """Add `cc` cc and `bcc` bcc recipients with distinct addresses."""

    def mutate(e: delivery_pb2.Email) -> None:
        e.cc.extend(common_pb2.Address(email=f"cc{i}@example.com") for i in range(cc))
        e.bcc.extend(common_pb2.Address(email=f"bcc{i}@example.com") for i in range(bcc))

    return mutate


def address(role: str, email: str, name: str = "") -> Mutation:
    """Add (cc, bcc) or set (to, reply_to, sender) an address."""

    def mutate(e: delivery_pb2.Email) -> None:
        if role in ("cc", "bcc"):
            getattr(e, role).add(email=email, name=name)
        else:
            getattr(e, role).MergeFrom(common_pb2.Address(email=email, name=name))

    return mutate


def send_at(seconds: float, nanos: int = 0) -> Mutation:
    """Schedule the item at `seconds` (epoch) with `nanos`."""

    def mutate(e: delivery_pb2.Email) -> None:
        e.send_at.seconds, e.send_at.nanos = int(seconds), nanos

    return mutate


def attach(*attachments: delivery_pb2.Attachment) -> Mutation:
    """Append attachments."""
    return lambda e: e.attachments.extend(attachments)


def pdf(filename: str = "a.pdf", content: bytes = b"%PDF", **kw: str) -> delivery_pb2.Attachment:
    """An attachment, valid unless told otherwise."""
    kw.setdefault("content_type", "application/pdf")
    return delivery_pb2.Attachment(filename=filename, content=content, **kw)


def data(size: int, char: str = "x") -> str:
    """A JSON object of exactly `size` characters of `char` plus 8 bytes of syntax."""
    return '{"a":"' + char * size + '"}'


ONE_MIB = MAX_ATTACHMENT_BYTES // 10

VALID_VARIANTS = [
    pytest.param(put("locale", "zh-Hant-TW"), id="locale-script-region"),
    pytest.param(put("template_id", "a" * 128), id="template-id-128"),
    pytest.param(recipients(MAX_RECIPIENTS - 1), id="recipients-50"),
    pytest.param(recipients(25, 24), id="recipients-50-split"),
    pytest.param(address("cc", "Jane@Example.org"), id="same-local-part-other-domain"),
    pytest.param(put("data_json", ""), id="data-empty"),
    pytest.param(put("data_json", nested(32)), id="data-depth-32"),
    pytest.param(put("data_json", nested(32, "[")), id="data-depth-32-lists"),
    pytest.param(put("data_json", '{"a": "' + "[{" * 100 + '"}'), id="data-brackets-in-string"),
    pytest.param(put("data_json", data(MAX_DATA_BYTES - 8)), id="data-at-limit"),
    pytest.param(put("data_json", data(MAX_DATA_BYTES // 2 - 4, "é")), id="data-at-limit-utf8"),
    pytest.param(put_map("headers", many("X-H{}", 50)), id="headers-50"),
    pytest.param(put_map("headers", {"X-Url": "https://x.test/?a=?b?q?c"}), id="header-eq-q"),
    pytest.param(tags(*["t" * 255] * 10), id="tags-10x255"),
    pytest.param(put_map("metadata", many("k{}", 32, "v" * 280)), id="metadata-32"),
    pytest.param(put("idempotency_key", "k " * 127 + "k"), id="idempotency-255"),
    pytest.param(send_at(0), id="send-at-past"),
    pytest.param(send_at(NOW + 30 * DAY), id="send-at-30-days"),
    pytest.param(
        attach(*(pdf(f"{i}.pdf", b"x" * (ONE_MIB // 2)) for i in range(20))), id="attach-20"
    ),
    pytest.param(attach(pdf("a.pdf", content_id="x"), pdf("b.pdf")), id="one-content-id"),
    pytest.param(attach(pdf("März.xls", content_type="application/vnd.ms-excel")), id="unicode"),
]


@pytest.mark.parametrize("mutate", VALID_VARIANTS)
def test_valid_variant_passes(mutate: Mutation) -> None:
    """Items at (not over) each limit are accepted."""
    email = minimal()
    mutate(email)
    validate_email(email, now=NOW)


def three_with_dup(e: delivery_pb2.Email) -> None:
    """cc x, cc z, bcc Z: the bcc repeats cc[1]."""
    e.cc.add(email="x@y.com")
    e.cc.add(email="z@y.com")
    e.bcc.add(email="Z@Y.com")


INVALID_ITEMS = [
    # template_id, locale
    pytest.param(put("template_id", ""), "template_id", "required", id="template-missing"),
    pytest.param(put("template_id", "-x"), "template_id", "starting with", id="template-dash"),
    pytest.param(put("template_id", "a b"), "template_id", "1-128", id="template-space"),
    pytest.param(put("template_id", "a" * 129), "template_id", "1-128", id="template-129"),
    pytest.param(put("template_id", "tëmplate"), "template_id", "1-128", id="template-non-ascii"),
    pytest.param(put("locale", "fr_CA"), "locale", "BCP 47", id="locale-underscore"),
    pytest.param(put("locale", "f"), "locale", "BCP 47", id="locale-short"),
    pytest.param(put("locale", "en-"), "locale", "BCP 47", id="locale-dangling"),
    pytest.param(put("locale", "en" + "-abcdefgh" * 4), "locale", "35", id="locale-36"),
    # recipients
    pytest.param(lambda e: e.ClearField("to"), "to.email", "required", id="to-missing"),
    pytest.param(address("to", "a@b.com, c@d.com"), "to.email", "','", id="to-list"),
    pytest.param(address("to", "a@b.com", "A\r\nBcc: x@y.z"), "to.name", "U+000D", id="to-crlf"),
    pytest.param(address("cc", "<x@y.com>"), "cc[0].email", "'<'", id="cc-angle"),
    pytest.param(address("bcc", "x@y.com", "A\u2028B"), "bcc[0].name", "U+2028", id="bcc-name"),
    pytest.param(recipients(MAX_RECIPIENTS), "cc", "(to + cc + bcc): 51; the limit is 50", id="cc"),
    pytest.param(recipients(25, 25), "bcc", "51; the limit is 50", id="bcc-51"),
    pytest.param(address("cc", "JANE@Example.com"), "cc[0].email", "to.email", id="dup-to-cc"),
    pytest.param(address("bcc", "jane@example.com"), "bcc[0].email", "to.email", id="dup-bcc"),
    pytest.param(three_with_dup, "bcc[0].email", "same address as cc[1].email", id="dup-cc-bcc"),
    pytest.param(address("reply_to", ""), "reply_to.email", "required", id="reply-to-empty"),
    pytest.param(address("reply_to", "a@b.c\n"), "reply_to.email", "'\\n'", id="reply-to-lf"),
    pytest.param(address("sender", "a@[1.2.3.4]"), "sender.email", "IP-literal", id="sender-ip"),
    pytest.param(address("sender", "a@b.com", "\x00"), "sender.name", "U+0000", id="sender-nul"),
    # data_json
    pytest.param(
        put("data_json", data(MAX_DATA_BYTES)),
        "data_json",
        f"{MAX_DATA_BYTES + 8} bytes of UTF-8; the limit is {MAX_DATA_BYTES}",
        id="data-too-big",
    ),
    pytest.param(
        put("data_json", data(MAX_DATA_BYTES // 2, "é")),
        "data_json",
        f"{MAX_DATA_BYTES + 8} bytes of UTF-8",
        id="data-too-big-utf8",
    ),
    pytest.param(put("data_json", "{"), "data_json", "not valid JSON", id="data-broken"),
    pytest.param(put("data_json", "[1]"), "data_json", "not an array", id="data-array"),
    pytest.param(put("data_json", '"s"'), "data_json", "not a string", id="data-string"),
    pytest.param(put("data_json", "true"), "data_json", "not a boolean", id="data-bool"),
    pytest.param(put("data_json", "null"), "data_json", "JSON object", id="data-null"),
    pytest.param(put("data_json", '{"a":NaN}'), "data_json", "not valid JSON", id="data-nan"),
    pytest.param(put("data_json", nested(33)), "data_json", "limit is 32", id="data-depth-33"),
    pytest.param(put("data_json", nested(33, "[")), "data_json", "limit is 32", id="data-33-list"),
    pytest.param(put("data_json", nested(2000)), "data_json", "depth", id="data-depth-2000"),
    # headers
    pytest.param(put_map("headers", many("X-H{}", 51)), "headers", "51; the limit is 50", id="h51"),
    pytest.param(
        put_map("headers", {"cOnTeNt-TyPe": "text/html"}),
        'headers["cOnTeNt-TyPe"]',
        "set by the service",
        id="header-owned-odd-case",
    ),
    pytest.param(put_map("headers", {"X-A B": "v"}), 'headers["X-A B"]', "' '", id="name-space"),
    pytest.param(put_map("headers", {"X-A:": "v"}), 'headers["X-A:"]', "':'", id="name-colon"),
    pytest.param(
        put_map("headers", {"X-A\nBcc": "v"}), 'headers["X-A\\nBcc"]', "'\\n'", id="name-lf"
    ),
    pytest.param(
        put_map("headers", {"X-Foo": "a\r\nBcc: x@y.z"}), 'headers["X-Foo"]', "U+000D", id="crlf"
    ),
    pytest.param(put_map("headers", {"X-Foo": "a\x00"}), 'headers["X-Foo"]', "U+0000", id="nul"),
    pytest.param(put_map("headers", {"X-Foo": "a\u2028"}), 'headers["X-Foo"]', "U+2028", id="ls"),
    pytest.param(put_map("headers", {"X-Foo": "a\x85"}), 'headers["X-Foo"]', "U+0085", id="nel"),
    pytest.param(
        put_map("headers", {"X-Foo": "=?utf-8?Q?=0A?="}), 'headers["X-Foo"]', "hides", id="q-word"
    ),
    pytest.param(
        put_map("headers", {"X-Foo": "v" * 999}), 'headers["X-Foo"]', "the limit is 998", id="999"
    ),
    # tags, metadata, idempotency key
    pytest.param(tags(*["t"] * 11), "tags", "11; the limit is 10", id="tags-11"),
    pytest.param(tags("ok", ""), "tags[1]", "empty", id="tag-empty"),
    pytest.param(tags("t" * 256), "tags[0]", "256 characters; the limit is 255", id="tag-256"),
    pytest.param(tags("a\nb"), "tags[0]", "U+000A", id="tag-lf"),
    pytest.param(tags("café"), "tags[0]", "printable ASCII; found U+00E9", id="tag-non-ascii"),
    pytest.param(put_map("metadata", many("k{}", 33)), "metadata", "33; the limit is 32", id="m33"),
    pytest.param(put_map("metadata", {"a b": "v"}), 'metadata["a b"]', "1-64", id="key-space"),
    pytest.param(put_map("metadata", {"k" * 65: "v"}), f'metadata["{"k" * 65}"]', "1-64", id="k65"),
    pytest.param(
        put_map("metadata", {"swu_id": "x"}), 'metadata["swu_id"]', "reserved", id="key-swu"
    ),
    pytest.param(put_map("metadata", {"SWU_x": "x"}), 'metadata["SWU_x"]', "reserved", id="SWU"),
    pytest.param(
        put_map("metadata", {"k": "v" * 1025}), 'metadata["k"]', "the limit is 1024", id="v1025"
    ),
    pytest.param(put_map("metadata", {"k": "a\r\nb"}), 'metadata["k"]', "U+000D", id="m-crlf"),
    pytest.param(
        put_map("metadata", many("k{}", 6, "é" * 1000)),
        "metadata",
        "12012 bytes of keys and values; the limit is 9216",
        id="metadata-total",
    ),
    pytest.param(put("idempotency_key", "k" * 256), "idempotency_key", "limit is 255", id="i256"),
    pytest.param(put("idempotency_key", "k\n"), "idempotency_key", "U+000A", id="idem-lf"),
    pytest.param(put("idempotency_key", "ключ"), "idempotency_key", "printable ASCII", id="idem"),
    # attachments
    pytest.param(
        attach(*(pdf(f"{i}.pdf") for i in range(21))), "attachments", "21; the limit is 20", id="21"
    ),
    pytest.param(attach(pdf("")), "attachments[0].filename", "required", id="filename-missing"),
    pytest.param(attach(pdf(), pdf("a\r\n.pdf")), "attachments[1].filename", "U+000D", id="f-crlf"),
    pytest.param(attach(pdf("a\x00.pdf")), "attachments[0].filename", "U+0000", id="f-nul"),
    pytest.param(attach(pdf("a\x85.pdf")), "attachments[0].filename", "U+0085", id="f-nel"),
    pytest.param(attach(pdf("a\u2028.pdf")), "attachments[0].filename", "U+2028", id="f-u2028"),
    pytest.param(
        attach(pdf("=?utf-8?b?YQ0KLnBkZg==?=")), "attachments[0].filename", "hides", id="f-b-word"
    ),
    pytest.param(
        attach(pdf("../etc/passwd")), "attachments[0].filename", "bare file name", id="f-slash"
    ),
    pytest.param(
        attach(pdf("..\\boot.ini")), "attachments[0].filename", "bare file name", id="f-backslash"
    ),
    pytest.param(attach(pdf("..")), "attachments[0].filename", "bare file name", id="f-dotdot"),
    pytest.param(
        attach(pdf("invoice\u202efdp.exe")), "attachments[0].filename", "bidirectional", id="rlo"
    ),
    pytest.param(attach(pdf("a" * 256)), "attachments[0].filename", "limit is 255", id="f-256"),
    pytest.param(
        attach(pdf(content_type="")), "attachments[0].content_type", "type/subtype", id="ct-empty"
    ),
    pytest.param(
        attach(pdf(content_type="pdf")), "attachments[0].content_type", "type/subtype", id="ct-pdf"
    ),
    pytest.param(
        attach(pdf(content_type="text/plain; charset=utf-8")),
        "attachments[0].content_type",
        "without parameters",
        id="ct-params",
    ),
    pytest.param(
        attach(pdf(content_type="text/plain\r\nX: y")),
        "attachments[0].content_type",
        "type/subtype",
        id="ct-crlf",
    ),
    pytest.param(attach(pdf(content=b"")), "attachments[0].content", "empty", id="content-empty"),
    pytest.param(
        attach(pdf("a.pdf", b"x" * 5 * ONE_MIB), pdf("b.pdf", b"x" * (5 * ONE_MIB + 1))),
        "attachments",
        f"{MAX_ATTACHMENT_BYTES + 1} bytes of attachments; the limit is {MAX_ATTACHMENT_BYTES}",
        id="attachments-total",
    ),
    pytest.param(attach(pdf(content_id="<x>")), "attachments[0].content_id", "1-128", id="cid<>"),
    pytest.param(attach(pdf(content_id="a b")), "attachments[0].content_id", "1-128", id="cid-sp"),
    pytest.param(
        attach(pdf(content_id="c" * 129)), "attachments[0].content_id", "1-128", id="c129"
    ),
    pytest.param(
        attach(pdf("a.pdf", content_id="Logo"), pdf("b.pdf", content_id="logo")),
        "attachments[1].content_id",
        "same content_id",
        id="cid-duplicate",
    ),
    # priority, send_at
    pytest.param(put("priority", 7), "priority", "unknown priority 7", id="priority-unknown"),
    pytest.param(
        send_at(NOW + 31 * DAY), "send_at", "31.0 days ahead; the limit is 30 days", id="31"
    ),
    pytest.param(send_at(NOW + 30 * DAY, 10**6), "send_at", "limit is 30 days", id="30-days-plus"),
    pytest.param(send_at(NOW, -1), "send_at", "not a valid timestamp", id="nanos-negative"),
    pytest.param(send_at(NOW, 10**9), "send_at", "not a valid timestamp", id="nanos-overflow"),
    pytest.param(send_at(-(10**12)), "send_at", "not a valid timestamp", id="before-year-1"),
]


@pytest.mark.parametrize(("mutate", "field", "fragment"), INVALID_ITEMS)
def test_invalid_item_refused(mutate: Mutation, field: str, fragment: str) -> None:
    """Each rule refuses its item with InvalidArgument naming the field and the limit."""
    email = minimal()
    mutate(email)
    raises(lambda: validate_email(email, now=NOW), field, fragment)


def test_same_header_twice_in_different_case_refused() -> None:
    """Header names are case-insensitive, so X-Foo and x-foo collide."""
    email = minimal()
    email.headers.update({"X-Foo": "1", "x-foo": "2"})
    with pytest.raises(InvalidArgument) as info:
        validate_email(email, now=NOW)
    assert info.value.field in ('headers["X-Foo"]', 'headers["x-foo"]')
    assert "header given twice" in info.value.message


def test_first_problem_wins() -> None:
    """With several problems, the one checked first is reported."""
    email = full()
    email.template_id = ""
    email.to.email = "bad"
    raises(lambda: validate_email(email, now=NOW), "template_id", "required")


def test_send_at_uses_the_clock_when_now_is_not_given() -> None:
    """Without `now`, the real clock decides: a year ahead is refused."""
    email = minimal()
    email.send_at.GetCurrentTime()
    validate_email(email)
    email.send_at.seconds += 365 * DAY
    raises(lambda: validate_email(email), "send_at", "the limit is 30 days")


@pytest.mark.parametrize(
    ("data_json", "expected"),
    [
        pytest.param("", {}, id="empty-is-empty-object"),
        pytest.param('{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}, id="nested"),
        pytest.param('{"name": "José \\u2028"}', {"name": "José \u2028"}, id="unicode"),
    ],
)
def test_parse_data_returns_the_object(data_json: str, expected: dict[str, object]) -> None:
    """parse_data gives Render the parsed object."""
    assert parse_data(data_json) == expected


def test_parse_data_names_the_given_field() -> None:
    """Render's errors point at its own field."""
    raises(lambda: parse_data("[]", "request.data_json"), "request.data_json", "JSON object")


def test_parse_data_empty_gives_a_fresh_dict() -> None:
    """Mutating the result for empty data never leaks into the next call."""
    parse_data("")["x"] = 1
    assert parse_data("") == {}


@pytest.mark.parametrize(
    ("n", "fragment"),
    [
        pytest.param(0, "empty", id="zero"),
        pytest.param(-1, "empty", id="negative"),
        pytest.param(MAX_BATCH + 1, "1001; the limit is 1000", id="1001"),
    ],
)
def test_bad_batch_size_refused(n: int, fragment: str) -> None:
    """A batch needs 1 to 1000 items."""
    raises(lambda: validate_batch_size(n), "emails", fragment)


@pytest.mark.parametrize("n", [pytest.param(1, id="one"), pytest.param(MAX_BATCH, id="max")])
def test_good_batch_size_passes(n: int) -> None:
    """1 and 1000 items are fine, and the field name is the caller's."""
    validate_batch_size(n, "chunk")
