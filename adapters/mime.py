"""MIME for one rendered message (stdlib `email`), every header checked by our validation rules.

Shared by the SMTP adapter and the SES adapter's raw path. Header output goes through
`WirePolicy`, which works around this Python's header-folding bugs.
"""

from __future__ import annotations

from email.header import Header
from email.headerregistry import Address, UnstructuredHeader
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from email.utils import formataddr, formatdate
from typing import Any

from adapters.base import Attachment, Mailbox, OutboundEmail
from swu_delivery.errors import InvalidArgument
from swu_delivery.validation import check_header_name, check_header_text

__all__ = ["MESSAGE_ID_HEADER", "POLICY", "WirePolicy", "ascii_address", "build_mime"]

MESSAGE_ID_HEADER = "X-SWU-Message-Id"  # our id, for correlating bounces and replies


class WirePolicy(EmailPolicy):
    """EmailPolicy with header output that avoids this Python's folding bugs (a space lost between
    encoded words; long ASCII URLs turned into encoded words): ASCII goes out as is, non-ASCII
    text as compat32 `Header` encoded words, addresses through `formataddr`."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        text, addresses = str(value), getattr(value, "addresses", None)
        if addresses is not None:
            pairs = ((a.display_name, a.addr_spec) for a in addresses)
            text = f",{self.linesep} ".join(formataddr(pair, "utf-8") for pair in pairs)
        elif not text.isascii() and isinstance(value, UnstructuredHeader):
            text = Header(text, "utf-8", header_name=name).encode(linesep=self.linesep)
        elif not text.isascii() or len(name) + len(text) > 990:
            return super().fold_binary(name, value)
        return f"{name}: {text}{self.linesep}".encode("ascii")


POLICY = WirePolicy(linesep="\r\n", cte_type="7bit")  # parts 7bit, quoted-printable or base64


def ascii_address(email: str) -> str:
    """`email` with an internationalized domain in its IDNA (punycode) form."""
    local, _, domain = email.rpartition("@")
    return email if domain.isascii() else f"{local}@{domain.encode('idna').decode('ascii')}"


def _address(box: Mailbox, field: str) -> Address:
    check_header_text(box.email, f"{field}.email")
    check_header_text(box.name, f"{field}.name")
    local, _, domain = ascii_address(box.email).rpartition("@")
    return Address(display_name=box.name, username=local, domain=domain)


def _add_file(part: MIMEPart, a: Attachment, field: str, *, related: bool = False) -> None:
    for key in ("filename", "content_type", "content_id"):
        check_header_text(getattr(a, key), f"{field}.{key}")
    maintype, _, subtype = a.content_type.partition("/")
    kwargs: dict[str, Any] = {"filename": a.filename}
    if a.content_id:
        kwargs.update(cid=f"<{a.content_id}>", disposition="inline")
    add = part.add_related if related else part.add_attachment
    add(a.content, maintype, subtype, **kwargs)


def build_mime(email: OutboundEmail, *, message_id: str) -> EmailMessage:
    """text+html as multipart/alternative, inline images in related, files in mixed; no Bcc."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _address(email.sender, "sender")
    msg["To"] = _address(email.to, "to")
    if email.cc:
        msg["Cc"] = [_address(box, f"cc[{i}]") for i, box in enumerate(email.cc)]
    if email.reply_to is not None:
        msg["Reply-To"] = _address(email.reply_to, "reply_to")
    check_header_text(email.subject, "subject")
    msg["Subject"] = email.subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id
    msg[MESSAGE_ID_HEADER] = email.message_id
    for name, value in email.headers.items():
        check_header_name(name, f"headers[{name!r}]")
        if name.lower() == MESSAGE_ID_HEADER.lower():
            raise InvalidArgument("set by the service", field=f"headers[{name!r}]")
        check_header_text(value, f"headers[{name!r}]")
        msg[name] = value
    if email.text or not email.html:
        msg.set_content(email.text)
    if email.html:
        (msg.add_alternative if email.text else msg.set_content)(email.html, subtype="html")
    html = msg.get_body(("html",)) if email.html else None
    # Inline images first: they join the html in multipart/related before files make it mixed.
    for i, a in sorted(enumerate(email.attachments), key=lambda item: not item[1].content_id):
        part = html if a.content_id and html is not None else msg
        _add_file(part, a, f"attachments[{i}]", related=part is not msg)
    return msg
