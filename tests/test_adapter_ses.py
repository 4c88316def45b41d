"""The Amazon SES v2 adapter against a real `moto_server` subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import email
import email.policy
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from adapters import adapter_class
from adapters.base import AdapterError, Attachment, Mailbox, OutboundEmail, OutcomeKind
from adapters.ses import SesAdapter, classify_error, email_tags
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.config import EspAccount
from tests import adapter_kit as kit
from tests.conftest import STATE_NAMES
from tests.helpers import mk

REGION = "us-east-1"
VERIFIED_DOMAIN = "shop.example.com"
SENDER = Mailbox(f"orders@{VERIFIED_DOMAIN}", "Shop, Inc")
SECRET_ENV = "SWU_TEST_SES_SECRET"
START_TIMEOUT = 30.0
# moto_server is on loopback; never route through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Moto:
    """A running moto_server: its URL and its /moto-api/ introspection."""

    url: str

    def _call(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(self.url + path, method=method)
        with _OPENER.open(request, timeout=10) as response:
            body = response.read()
        return orjson.loads(body) if body.strip() else None

    def reset(self) -> None:
        """Forget every identity and sent message, then verify our sending domain again."""
        self._call("/moto-api/reset", "POST")
        client = boto3.client(
            "sesv2",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        with contextlib.closing(client):
            client.create_email_identity(EmailIdentity=VERIFIED_DOMAIN)

    def sent(self, model: str) -> list[dict[str, Any]]:
        """moto's record of sent mail: "Message" (Simple content) or "RawMessage"."""
        return list(self._call("/moto-api/data.json")["ses"][model])


@pytest.fixture(scope="module")
def moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """`python -m moto.server` on a free loopback port, for this module's tests."""
    port = kit.free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    moto = Moto(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                moto._call("/moto-api/data.json")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start:\n" + log.read_text()) from None
                time.sleep(0.1)
        yield moto
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def moto(moto_process: Moto) -> Moto:
    """The shared moto_server, reset, with shop.example.com verified."""
    moto_process.reset()
    return moto_process


def account(base_url: str, **options: Any) -> EspAccount:
    return EspAccount(
        name="ses",
        kind="ses",
        base_url=base_url,
        api_key=str(options.pop("secret", "testing")),
        timeout=5,
        options={"region": REGION, "access_key_id": "testing", **options},
    )


@pytest.fixture
async def adapter(moto: Moto) -> AsyncIterator[SesAdapter]:
    """An SES adapter with explicit (fake) credentials, pointed at moto."""
    async with kit.running(account(moto.url)) as ses:
        yield ses


def message(mid: str = "m1", **fields: Any) -> OutboundEmail:
    to = Mailbox("jane@example.com", "Jane")
    fields = {"sender": SENDER, "to": to, "subject": "Your order", "text": "Hello", **fields}
    return OutboundEmail(message_id=mid, **fields)


async def test_simple_send_maps_addresses_and_content(adapter: SesAdapter, moto: Moto) -> None:
    """A plain message goes as Simple content; moto records sender, recipients and bodies."""
    email_ = message(
        "0190abc",
        cc=[Mailbox("cc@example.com")],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com"),
        html="<p>Hello</p>",
        tags=["orders"],
        metadata={"order": "42"},
    )
    (outcome,) = await adapter.send([email_])
    (record,) = moto.sent("Message")
    assert outcome.kind is OutcomeKind.SENT and outcome.esp_message_id == record["id"]
    assert record["source"] == '"Shop, Inc" <orders@shop.example.com>'
    assert record["subject"] == "Your order" and record["body"] == "<p>Hello</p>"
    assert record["destinations"] == {
        "ToAddresses": ["Jane <jane@example.com>"],
        "CcAddresses": ["cc@example.com"],
        "BccAddresses": ["bcc@example.com"],
    }
    assert moto.sent("RawMessage") == []


def test_request_carries_tags_charset_and_configuration_set() -> None:
    """Tags are sanitized to SES's charset; names are encoded, IDN domains punycoded."""
    adapter = SesAdapter(account("", configuration_set="transactional"))
    email_ = message(
        "0190abc",
        sender=Mailbox("news@bücher.example", "Bücher & Co"),
        reply_to=Mailbox("reply@example.com", "Help desk"),
        tags=["orders", "black friday!"],
        metadata={"order.id": "A-42/7", "empty": ""},
    )
    request = adapter.build_request(email_)
    assert (
        request["FromEmailAddress"] == "=?utf-8?b?QsO8Y2hlciAmIENv?= <news@xn--bcher-kva.example>"
    )
    assert request["ReplyToAddresses"] == ["Help desk <reply@example.com>"]
    assert request["ConfigurationSetName"] == "transactional"
    assert request["EmailTags"] == [
        {"Name": "swu_message_id", "Value": "0190abc"},
        {"Name": "swu_tag_orders", "Value": "1"},
        {"Name": "swu_tag_black_friday_", "Value": "1"},
        {"Name": "order_id", "Value": "A-42_7"},
    ]
    simple = request["Content"]["Simple"]
    assert simple["Subject"] == {"Data": "Your order", "Charset": "UTF-8"}
    assert simple["Body"] == {"Text": {"Data": "Hello", "Charset": "UTF-8"}}


def test_tags_first_wins_and_values_are_capped() -> None:
    """A metadata key colliding with ours after sanitizing is dropped; values stop at 256."""
    email_ = message(tags=["x"], metadata={"swu.tag_x": "other", "long": "v" * 300})
    tags = {t["Name"]: t["Value"] for t in email_tags(email_)}
    assert tags["swu_tag_x"] == "1" and len(tags["long"]) == 256


async def test_unverified_sender_is_permanent(adapter: SesAdapter, moto: Moto) -> None:
    """SES's MessageRejected for an unverified identity fails the message for good."""
    (outcome,) = await adapter.send([message(sender=Mailbox("someone@elsewhere.example"))])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Amazon SES 400 MessageRejected: ")
    assert "someone@elsewhere.example" in outcome.reason
    assert moto.sent("Message") == []


async def test_raw_path_for_attachments_and_headers(adapter: SesAdapter, moto: Moto) -> None:
    """Attachments or custom headers switch to Raw content: our MIME, Bcc only in the envelope."""
    email_ = message(
        "0190def",
        bcc=[Mailbox("bcc@example.com")],
        html='<p>Hi <img src="cid:logo"></p>',
        headers={"X-Campaign": "spring"},
        attachments=[
            Attachment("invoice.pdf", "application/pdf", b"%PDF fake"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
        ],
    )
    (outcome,) = await adapter.send([email_])
    (record,) = moto.sent("RawMessage")
    assert outcome.kind is OutcomeKind.SENT and outcome.esp_message_id == record["id"]
    assert "bcc@example.com" in record["destinations"]
    parsed = email.message_from_string(record["raw_data"], policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["X-Campaign"] == "spring" and parsed["X-SWU-Message-Id"] == "0190def"
    assert "Bcc" not in parsed
    assert parsed["From"].addresses[0].display_name == "Shop, Inc"
    (attachment,) = parsed.iter_attachments()
    assert (attachment.get_filename(), attachment.get_content()) == ("invoice.pdf", b"%PDF fake")
    assert moto.sent("Message") == []


async def test_prechecks_refuse_without_calling_ses(adapter: SesAdapter, moto: Moto) -> None:
    """51 recipients, or over 40 MB once attachments are base64-encoded, never reach SES."""
    crowd = message(cc=[Mailbox(f"cc{i}@example.com") for i in range(50)])
    big = message(
        attachments=[Attachment("big.bin", "application/octet-stream", b"\0" * (31 << 20))]
    )
    crowd_outcome, big_outcome = await adapter.send([crowd, big])
    assert crowd_outcome.kind is OutcomeKind.REJECTED and "51 recipients" in crowd_outcome.reason
    assert big_outcome.kind is OutcomeKind.REJECTED and "base64" in big_outcome.reason
    assert moto.sent("Message") == [] and moto.sent("RawMessage") == []


async def test_connection_refused_is_retryable() -> None:
    """Nothing listening at the endpoint is a retryable outcome, not an exception."""
    async with kit.running(account(f"http://127.0.0.1:{kit.free_port()}")) as adapter:
        (outcome,) = await adapter.send([message()])
    assert outcome.kind is OutcomeKind.RETRY and not outcome.rate_limited
    assert "EndpointConnectionError" in outcome.reason


async def test_default_credential_chain(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without access_key_id the AWS default chain (here: environment variables) is used."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "chain-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret")
    acc = EspAccount(name="ses", kind="ses", base_url=moto.url, options={"region": REGION})
    async with kit.running(acc) as adapter:
        (outcome,) = await adapter.send([message()])
    assert outcome.kind is OutcomeKind.SENT


@pytest.mark.parametrize(
    ("code", "status", "kind", "rate_limited"),
    [
        ("MessageRejected", 400, OutcomeKind.REJECTED, False),
        ("MailFromDomainNotVerifiedException", 400, OutcomeKind.REJECTED, False),
        ("AccountSuspendedException", 400, OutcomeKind.REJECTED, False),
        ("SendingPausedException", 400, OutcomeKind.REJECTED, False),
        ("BadRequestException", 400, OutcomeKind.REJECTED, False),
        ("NotFoundException", 404, OutcomeKind.REJECTED, False),
        ("TooManyRequestsException", 429, OutcomeKind.RETRY, True),
        ("LimitExceededException", 400, OutcomeKind.RETRY, True),
        ("Throttling", 400, OutcomeKind.RETRY, True),
        ("InternalFailure", 500, OutcomeKind.RETRY, False),
        ("SomethingNew", 503, OutcomeKind.RETRY, False),
    ],
)
def test_error_classification(
    code: str, status: int, kind: OutcomeKind, rate_limited: bool
) -> None:
    """SES error codes map to permanent, retryable or throttled outcomes."""
    response = {
        "Error": {"Code": code, "Message": "why"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    outcome = classify_error(response)
    assert (outcome.kind, outcome.rate_limited) == (kind, rate_limited)
    assert outcome.reason == f"Amazon SES {status} {code}: why"


async def test_header_injection_is_refused(adapter: SesAdapter, moto: Moto) -> None:
    """CR/LF in a display name or header value is refused before any SES call."""
    outcomes = await adapter.send(
        [
            message(to=Mailbox("jane@example.com", "Jane\r\nBcc: x@example.com")),
            message(headers={"X-Note": "a\r\nBcc: x@example.com"}),
        ]
    )
    assert {o.kind for o in outcomes} == {OutcomeKind.REJECTED}
    assert moto.sent("Message") == [] and moto.sent("RawMessage") == []


@pytest.mark.parametrize(
    "change",
    [{"region": ""}, {"access_key_id": ""}, {"secret": ""}, {"region": 1}],
)
def test_bad_options_are_refused(change: dict[str, Any]) -> None:
    """A missing region, half a key pair or a mistyped option fail at start-up."""
    with pytest.raises(AdapterError, match="esp ses"):
        SesAdapter(account("http://127.0.0.1:1", **change))


def test_registered_as_ses() -> None:
    """`kind = "ses"` resolves to this adapter."""
    assert adapter_class("ses") is SesAdapter


def test_end_to_end_through_the_server(
    tmp_path: Path, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Send through the real gRPC server ends SENT with SES's MessageId."""
    monkeypatch.setenv(SECRET_ENV, "testing")
    esp = {
        "name": "ses",
        "kind": "ses",
        "base_url": moto.url,
        "api_key_env": SECRET_ENV,
        "sender": f"orders@{VERIFIED_DOMAIN}",
        "sender_name": "Shop",
        "timeout": 5,
        "region": REGION,
        "access_key_id": "testing",
    }
    with kit.serving(tmp_path, esp) as server:
        email_ = mk(to="jane@example.com", cc=[common_pb2.Address(email="cc@example.com")])
        mid = server.delivery.Send(delivery_pb2.SendRequest(email=email_)).message_id
        done = server.wait_for_state([mid])[mid]
    (record,) = moto.sent("Message")
    assert STATE_NAMES[done.state] == "SENT"
    assert (done.esp, done.esp_message_id) == ("ses", record["id"])
    assert record["source"] == f"Shop <orders@{VERIFIED_DOMAIN}>"
    assert record["destinations"]["CcAddresses"] == ["cc@example.com"]
