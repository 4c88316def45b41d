"""The Mailgun adapter over real HTTP against the simulator, and one message end to end."""

from __future__ import annotations

import base64
import dataclasses
from email.utils import getaddresses
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.base import AdapterError, Attachment, Mailbox, OutcomeKind
from adapters.mailgun import MailgunAdapter
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount
from tests import adapter_kit as kit
from tests.adapter_kit import message
from tests.conftest import STATE_NAMES, ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import mk

DOMAIN = kit.MAILGUN_DOMAIN

mailgun = kit.adapter_fixture("mailgun")
mailgun_server = kit.server_fixture("mailgun")


def account(**changes: Any) -> EspAccount:
    """A Mailgun account with no endpoint set: the adapter's own default applies."""
    return kit.account("mailgun", "", **changes)


async def test_every_field_is_mapped(
    mailgun: MailgunAdapter, esp_simulator: SimulatorHandle
) -> None:
    """Addresses, bodies, headers, tags, metadata and files reach Mailgun's form fields."""
    tricky = 'Doe, "JJ" <Jr>'
    email = message(
        1,
        to=Mailbox("jane@example.com"),
        sender=Mailbox("team@mg.example.com", tricky),
        cc=[Mailbox("cc@example.com", "Zoë")],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com", "Help, Desk"),
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"},
        tags=["orders", "shipped", "ünïcode", "eu", "late"],
        metadata={"order": "42", "swu_message_id": "spoofed"},
        attachments=[
            Attachment("a.txt", "text/plain", b"hi"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
        ],
    )
    (outcome,) = await mailgun.send([email])
    (record,) = esp_simulator.requests(provider="mailgun", status=200)
    assert outcome.kind is OutcomeKind.SENT
    assert outcome.esp_message_id == record["message_id"]
    assert "<" not in outcome.esp_message_id and outcome.esp_message_id.endswith(DOMAIN)
    body = record["body"]
    fields = body["fields"]
    assert body["domain"] == DOMAIN
    assert getaddresses(fields["from"]) == [(tricky, "team@mg.example.com")]
    assert fields["to"] == ["jane@example.com"]
    assert fields["cc"] == ["=?utf-8?q?Zo=C3=AB?= <cc@example.com>"]
    assert fields["bcc"] == ["bcc@example.com"]
    assert getaddresses(fields["h:Reply-To"]) == [("Help, Desk", "reply@example.com")]
    assert (fields["subject"], fields["text"], fields["html"]) == (
        ["Order 1 shipped"],
        ["Order 1"],
        ["<p>Order 1</p>"],
    )
    assert fields["h:X-Campaign"] == ["spring"]
    assert fields["h:List-Unsubscribe"] == ["<https://x.example/u>"]
    assert fields["o:tag"] == ["orders", "shipped", "eu"]
    assert orjson.loads(fields["v:swu_tags"][0]) == ["orders", "shipped", "ünïcode", "eu", "late"]
    assert fields["v:order"] == ["42"]
    assert fields["v:swu_message_id"] == ["m-1"]
    attachment, inline = body["files"]
    assert (attachment["field"], attachment["filename"], attachment["content_type"]) == (
        "attachment",
        "a.txt",
        "text/plain",
    )
    assert base64.b64decode(attachment["content"]) == b"hi"
    assert (inline["field"], inline["filename"], inline["content_type"]) == (
        "inline",
        "logo",
        "image/png",
    )
    assert "Authorization" not in record["headers"]
    assert record["headers"]["Content-Type"].startswith("multipart/form-data")


def test_domain_and_region_come_from_options() -> None:
    """`domain` is required and bare; `region = "eu"` picks the EU endpoint when no base_url."""
    eu = MailgunAdapter(account(options={"region": "eu"}))
    assert (eu.base_url, eu.path) == ("https://api.eu.mailgun.net", f"/v3/{DOMAIN}/messages")
    assert MailgunAdapter(account()).base_url == "https://api.mailgun.net"
    for options in ({}, {"domain": "a/b"}, {"domain": DOMAIN, "region": "ap"}):
        with pytest.raises(AdapterError, match=r"esp mg: (domain|region)"):
            MailgunAdapter(dataclasses.replace(account(), options=options))


async def test_bad_key_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong API key is refused with 401 and rejected without retry."""
    async with kit.running(kit.account("mailgun", esp_simulator.url, api_key="wrong")) as adapter:
        (outcome,) = await adapter.send([message()])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason == "Mailgun 401: Forbidden"


async def test_scripted_400_is_permanent(
    mailgun: MailgunAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A 400 naming the recipient's field is a permanent rejection carrying Mailgun's message."""
    esp_simulator.add_rule(match_recipient="cc@example.com", provider="mailgun", action="400")
    email = message(cc=[Mailbox("cc@example.com")])
    (outcome,) = await mailgun.send([email])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Mailgun 400: cc parameter is not a valid address")


async def test_rate_limit_waits_as_told(
    mailgun: MailgunAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A 429 is retryable, flagged as throttling, with the wait from Retry-After."""
    esp_simulator.set_faults(retry_after_s=30)
    esp_simulator.add_rule(provider="mailgun", action="429", times=1)
    (outcome,) = await mailgun.send([message()])
    assert outcome.kind is OutcomeKind.RETRY and outcome.rate_limited
    assert outcome.retry_after is not None and 1 <= outcome.retry_after <= 31


async def test_oversized_message_is_rejected_before_sending(
    mailgun: MailgunAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A message over 25 MB once base64-encoded is rejected without a request."""
    big = Attachment("big.bin", "application/octet-stream", bytes(19 * 1024 * 1024))
    small = message(1, to=Mailbox("ok@example.com"))
    huge, sent = await mailgun.send([message(attachments=[big]), small])
    assert huge.kind is OutcomeKind.REJECTED and "25000000" in huge.reason
    assert sent.kind is OutcomeKind.SENT
    (record,) = esp_simulator.requests(provider="mailgun")
    assert record["body"]["fields"]["to"] == ["ok@example.com"]


@pytest.mark.parametrize(
    ("drop", "extra", "problem"),
    [
        ("to", [], "to parameter is missing"),
        ("subject", [], "subject parameter is missing"),
        ("text", [], "Need at least one of 'text', 'html', 'amp-html' or 'template'"),
        ("", [("o:tag", t) for t in "abcd"], "Too many tags: at most 3 per message"),
        ("", [("cc", "Jane <jane@>")], "cc parameter is not a valid address"),
        ("", [("v:big", "x" * 17_000)], "Sending options (o:, h:, v:) are limited to 16 kB"),
    ],
)
async def test_simulator_refuses_what_mailgun_documents(
    esp_simulator: SimulatorHandle, drop: str, extra: list[tuple[str, str]], problem: str
) -> None:
    """The simulated endpoint answers 400 with Mailgun's one-problem message."""
    form = [("from", "a@mg.example.com"), ("to", "b@example.com"), ("subject", "s")]
    form = [(k, v) for k, v in [*form, ("text", "t"), *extra] if k != drop]
    token = base64.b64encode(b"api:sim-key").decode()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Basic {token}"}) as session,
        session.post(f"{esp_simulator.url}/v3/{DOMAIN}/messages", data=form) as response,
    ):
        answer = await response.json()
    assert response.status == 400 and answer["message"].startswith(problem)


def test_message_sent_through_mailgun_end_to_end(mailgun_server: ServerHandle) -> None:
    """A Send through the gRPC server ends SENT with Mailgun's message id."""
    request = delivery_pb2.SendRequest(email=mk(to="jane@example.com", tags=["orders"]))
    mid = mailgun_server.delivery.Send(request).message_id
    done = mailgun_server.wait_for_state([mid])[mid]
    (record,) = mailgun_server.sim.requests(provider="mailgun", status=200)
    assert STATE_NAMES[done.state] == "SENT"
    assert (done.esp, done.esp_message_id) == ("mg", record["message_id"])
    fields = record["body"]["fields"]
    assert fields["v:swu_message_id"] == [mid]
    assert fields["subject"] == ["Order 1000 shipped, User0"]
    assert fields["o:tag"] == ["orders"]
