"""The SMTP adapter against a real aiosmtpd server (tests/smtp_sink.py) in a subprocess."""

from __future__ import annotations

import contextlib
import email
import email.policy
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import adapter_class
from adapters.base import AdapterError, Attachment, Mailbox, OutboundEmail, OutcomeKind
from adapters.smtp import SmtpAdapter
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.config import EspAccount
from tests import adapter_kit as kit
from tests.conftest import STATE_NAMES
from tests.helpers import mk
from tests.smtp_sink import LISTENING

SINK = Path(__file__).with_name("smtp_sink.py")
SENDER = Mailbox("orders@shop.example.com", "Shop")


@dataclass
class Sink:
    """A running smtp_sink subprocess: its port and its JSON-lines record."""

    port: int
    log: Path

    def events(self, kind: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in map(orjson.loads, lines) if e["event"] == kind]

    def messages(self) -> list[dict[str, Any]]:
        return self.events("message")

    def parsed(self, index: int = -1) -> EmailMessage:
        raw = self.messages()[index]["data"].encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@contextlib.contextmanager
def run_sink(tmp_path: Path, *flags: str) -> Iterator[Sink]:
    """Start tests/smtp_sink.py on a free loopback port; stop it afterwards."""
    log = tmp_path / f"sink-{len(list(tmp_path.glob('sink-*')))}.jsonl"
    with (tmp_path / "sink.stderr").open("a") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SINK), str(log), *flags],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(LISTENING):
            raise RuntimeError(f"smtp sink did not start: {line!r}")
        yield Sink(int(line.removeprefix(LISTENING)), log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """A sink that accepts everyone but temp-fail…/perm-fail… addresses."""
    with run_sink(tmp_path) as handle:
        yield handle


def account(port: int, /, **options: Any) -> EspAccount:
    password = str(options.pop("password", ""))
    options = {"host": "127.0.0.1", "port": port, "tls": "none", **options}
    return EspAccount(name="mail", kind="smtp", api_key=password, timeout=5, options=options)


@pytest.fixture
async def adapter(sink: Sink) -> AsyncIterator[SmtpAdapter]:
    """An SMTP adapter on the sink, plain TCP, no AUTH."""
    async with kit.running(account(sink.port)) as smtp:
        yield smtp


def message(mid: str = "m1", to: str = "jane@example.com", **fields: Any) -> OutboundEmail:
    fields = {"sender": SENDER, "subject": "Your order", "text": "Hello", **fields}
    return OutboundEmail(message_id=mid, to=Mailbox(to), **fields)


async def test_every_field_reaches_the_wire(adapter: SmtpAdapter, sink: Sink) -> None:
    """Addresses, subject, headers, bodies, inline image and attachment arrive as parsed MIME."""
    email_ = OutboundEmail(
        message_id="0190abc",
        sender=Mailbox("team@shop.example.com", 'Böb\'s "Shop", Inc'),
        to=Mailbox("jane@example.com", "Jane, Doe"),
        cc=[Mailbox("cc@example.com", "Çé")],
        bcc=[Mailbox("hidden@example.com")],
        reply_to=Mailbox("reply@example.com"),
        subject=" ".join(["Votre commande n° 42 est expédiée"] * 3),
        text="Bonjour — merci",
        html='<p>Bonjour <img src="cid:logo"></p>',
        headers={"X-Campaign": "spring", "List-Unsubscribe": f"<https://x.example/{'u' * 120}>"},
        attachments=[
            Attachment("facture é.pdf", "application/pdf", b"%PDF-1.7 fake"),
            Attachment("logo.png", "image/png", b"\x89PNG fake", content_id="logo"),
        ],
    )
    (outcome,) = await adapter.send([email_])
    (record,) = sink.messages()
    assert outcome.kind is OutcomeKind.SENT and outcome.esp_message_id == record["queue_id"]
    assert record["mail_from"] == "team@shop.example.com"
    assert record["rcpt_tos"] == ["jane@example.com", "cc@example.com", "hidden@example.com"]
    msg = sink.parsed()
    assert msg["From"].addresses[0].display_name == 'Böb\'s "Shop", Inc'
    assert msg["To"].addresses[0].display_name == "Jane, Doe"
    assert msg["Cc"].addresses[0].display_name == "Çé"
    assert "Bcc" not in msg
    assert str(msg["Reply-To"]) == "reply@example.com"
    assert str(msg["Subject"]) == email_.subject
    assert msg["Message-ID"] == "<0190abc@shop.example.com>"
    assert msg["X-SWU-Message-Id"] == "0190abc"
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == email_.headers["List-Unsubscribe"]  # not an encoded word
    assert msg.get_content_type() == "multipart/mixed"
    alternative, pdf = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = alternative.iter_parts()
    assert text.get_content().rstrip() == "Bonjour — merci"
    html, logo = related.iter_parts()
    assert related.get_content_type() == "multipart/related"
    assert html.get_content().rstrip() == '<p>Bonjour <img src="cid:logo"></p>'
    assert (logo["Content-ID"], logo.get_content_disposition()) == ("<logo>", "inline")
    assert logo.get_content() == b"\x89PNG fake"
    assert (pdf.get_filename(), pdf.get_content()) == ("facture é.pdf", b"%PDF-1.7 fake")
    assert all(ord(c) < 128 for c in record["data"])  # 7-bit on the wire


async def test_recipient_refusals(adapter: SmtpAdapter, sink: Sink) -> None:
    """All refused with a 4xx retries, all 5xx is permanent, a mixed message goes to the rest."""
    temp_and_perm = message("a", "temp-fail@example.com", cc=[Mailbox("perm-fail@example.com")])
    only_perm = message("b", "perm-fail-1@example.com", bcc=[Mailbox("perm-fail-2@example.com")])
    mixed = message(
        "c",
        "ok@example.com",
        cc=[Mailbox("temp-fail@example.com")],
        bcc=[Mailbox("perm-fail@x.io")],
    )
    retry, rejected, sent = await adapter.send([temp_and_perm, only_perm, mixed])
    assert retry.kind is OutcomeKind.RETRY
    assert (
        "temp-fail@example.com (451" in retry.reason
        and "perm-fail@example.com (550" in retry.reason
    )
    assert rejected.kind is OutcomeKind.REJECTED and "550" in rejected.reason
    assert sent.kind is OutcomeKind.SENT and sent.esp_message_id.startswith("SINK")
    assert "sent to 1 of 3" in sent.reason and "temp-fail@example.com (451" in sent.reason
    assert "perm-fail@x.io (550" in sent.reason
    (record,) = sink.messages()
    assert record["rcpt_tos"] == ["ok@example.com"]


async def test_refused_sender_fails_the_transaction(adapter: SmtpAdapter, sink: Sink) -> None:
    """MAIL FROM answered 451 is retryable, 550 permanent; the connection stays usable."""
    temp = message("a", sender=Mailbox("temp-fail@shop.example.com"))
    perm = message("b", sender=Mailbox("perm-fail@shop.example.com"))
    outcomes = [(await adapter.send([m]))[0] for m in (temp, perm, message("c"))]
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.REJECTED, OutcomeKind.SENT]
    assert outcomes[0].reason.startswith("SMTP 451") and outcomes[1].reason.startswith("SMTP 550")
    assert len(sink.events("connect")) == 1


async def test_connections_are_pooled_and_reused(sink: Sink) -> None:
    """Nine messages over a pool of two use at most two connections."""
    async with kit.running(account(sink.port, pool_size=2)) as adapter:
        first = await adapter.send([message(f"m{i}") for i in range(6)])
        rest = [(await adapter.send([message(f"n{i}")]))[0] for i in range(3)]
        assert {o.kind for o in first + rest} == {OutcomeKind.SENT}
        assert adapter.pool.opened <= 2
    assert len(sink.messages()) == 9
    assert len(sink.events("connect")) <= 2
    assert len({o.esp_message_id for o in first + rest}) == 9


async def test_dropped_connection_is_replaced(tmp_path: Path) -> None:
    """A pooled connection the server closed is replaced, and the message still goes out."""
    with run_sink(tmp_path, "--drop-after-data") as sink:
        async with kit.running(account(sink.port, pool_size=1)) as adapter:
            outcomes = [(await adapter.send([message(f"m{i}")]))[0] for i in range(3)]
        assert [o.kind for o in outcomes] == [OutcomeKind.SENT] * 3
        assert len(sink.events("connect")) == 3


async def test_server_down_is_retryable() -> None:
    """Connection refused is a retryable outcome, not an exception."""
    async with kit.running(account(kit.free_port())) as adapter:
        (outcome,) = await adapter.send([message()])
    assert outcome.kind is OutcomeKind.RETRY and "SMTP" in outcome.reason


async def test_auth_plain_without_tls(tmp_path: Path) -> None:
    """AUTH works on a plain local connection; a wrong password or no AUTH is permanent."""
    with run_sink(tmp_path, "--auth", "mailer:s3cret") as sink:
        async with kit.running(account(sink.port, username="mailer", password="s3cret")) as good:
            (ok,) = await good.send([message()])
        async with kit.running(account(sink.port, username="mailer", password="nope")) as bad:
            (wrong,) = await bad.send([message()])
        async with kit.running(account(sink.port)) as anonymous:
            (none,) = await anonymous.send([message()])
        assert ok.kind is OutcomeKind.SENT
        assert wrong.kind is OutcomeKind.REJECTED and wrong.reason.startswith("SMTP 535")
        assert none.kind is OutcomeKind.REJECTED and none.reason.startswith("SMTP 530")
        good_auth, *bad_auths = sink.events("auth")
        assert (good_auth["mechanism"], good_auth["login"], good_auth["ok"]) == (
            "PLAIN",
            "mailer",
            True,
        )
        assert bad_auths and not any(e["ok"] for e in bad_auths)  # aiosmtplib tries each method
        assert len(sink.messages()) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "Hi\r\nBcc: victim@example.com"},
        {"headers": {"X-Note": "a\nBcc: victim@example.com"}},
        {"headers": {"X-SWU-Message-Id": "forged"}},
        {"headers": {"Bcc": "victim@example.com"}},
        {"reply_to": Mailbox("r@example.com", "R\r\nBcc: victim@example.com")},
        {"attachments": [Attachment("a\r\n.txt", "text/plain", b"x")]},
    ],
)
async def test_header_injection_never_reaches_the_wire(
    adapter: SmtpAdapter, sink: Sink, fields: dict[str, Any]
) -> None:
    """CR/LF in any header, or a header the service owns, is refused before connecting."""
    (outcome,) = await adapter.send([message(**fields)])
    assert outcome.kind is OutcomeKind.REJECTED and outcome.reason.startswith("SMTP: ")
    assert sink.messages() == [] and sink.events("connect") == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"host": ""}, "host is required"),
        ({"tls": "ssl"}, "tls must be one of ['implicit', 'none', 'starttls']"),
        ({"pool_size": 0}, "pool_size must be at least 1"),
        ({"port": "25"}, "port must be an integer"),
        ({"validate_certs": "no"}, "validate_certs must be true or false"),
        ({"hots": "x"}, "unknown key 'hots' for kind 'smtp'"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], problem: str) -> None:
    """Missing, mistyped or unknown options fail at start-up, naming the option."""
    with pytest.raises(AdapterError) as err:
        SmtpAdapter(account(25, **options))
    assert str(err.value).startswith(f"esp mail: {problem}")


def test_registered_as_smtp() -> None:
    """`kind = "smtp"` resolves to this adapter."""
    assert adapter_class("smtp") is SmtpAdapter


def test_end_to_end_through_the_server(tmp_path: Path, sink: Sink) -> None:
    """A Send through the real gRPC server ends SENT via SMTP with the server's queue id."""
    esp = {
        "name": "mail",
        "kind": "smtp",
        "sender": "orders@shop.example.com",
        "sender_name": "Shop",
        "timeout": 5,
        "host": "127.0.0.1",
        "port": sink.port,
        "tls": "none",
        "pool_size": 2,
    }
    with kit.serving(tmp_path, esp) as server:
        email_ = mk(to="jane@example.com", cc=[common_pb2.Address(email="perm-fail@example.com")])
        mid = server.delivery.Send(delivery_pb2.SendRequest(email=email_)).message_id
        done = server.wait_for_state([mid])[mid]
    (record,) = sink.messages()
    assert STATE_NAMES[done.state] == "SENT"
    assert (done.esp, done.esp_message_id) == ("mail", record["queue_id"])
    assert record["rcpt_tos"] == ["jane@example.com"]
    assert sink.parsed()["X-SWU-Message-Id"] == mid
