"""The Mailjet adapter over real HTTP against the simulator: mapping, batches, partial failure."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.base import AdapterError, Attachment, Mailbox, OutcomeKind, SendOutcome
from adapters.mailjet import MailjetAdapter
from tests import adapter_kit as kit
from tests.adapter_kit import message
from tests.conftest import ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import data, mk

PUBLIC_KEY = kit.MAILJET_PUBLIC_KEY

adapter = kit.adapter_fixture("mailjet")
mailjet_server = kit.server_fixture("mailjet")


def messages(sim: SimulatorHandle, status: int | None = None) -> list[dict[str, Any]]:
    """Every message the simulator received for Mailjet, in order."""
    return [m for r in sim.requests("mailjet", status) for m in r["body"]["Messages"]]


async def test_every_field_is_mapped(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """Addresses, bodies, headers, ids, tags and both kinds of attachment reach Mailjet."""
    msg = message(
        7,
        cc=[Mailbox("cc@example.com", "C C")],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com", "Support"),
        headers={"X-Campaign": "spring"},
        tags=["orders", "shipped"],
        metadata={"order": "42"},
        attachments=[
            Attachment("a.txt", "text/plain", b"hi"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
        ],
    )
    (outcome,) = await adapter.send([msg])
    (record,) = esp_simulator.requests("mailjet", 200)
    assert outcome == SendOutcome.sent(record["message_id"])
    (body,) = record["body"]["Messages"]
    assert body == {
        "From": {"Email": "orders@shop.example.com", "Name": "Shop"},
        "To": [{"Email": "user7@example.com"}],
        "Cc": [{"Email": "cc@example.com", "Name": "C C"}],
        "Bcc": [{"Email": "bcc@example.com"}],
        "ReplyTo": {"Email": "reply@example.com", "Name": "Support"},
        "Subject": "Order 7 shipped",
        "TextPart": "Order 7",
        "HTMLPart": "<p>Order 7</p>",
        "Headers": {"X-Campaign": "spring"},
        "CustomID": "m-7",
        "EventPayload": body["EventPayload"],
        "CustomCampaign": "orders",
        "Attachments": [
            {"ContentType": "text/plain", "Filename": "a.txt", "Base64Content": "aGk="}
        ],
        "InlinedAttachments": [
            {
                "ContentType": "image/png",
                "Filename": "logo.png",
                "Base64Content": base64.b64encode(b"\x89PNG").decode(),
                "ContentID": "logo",
            }
        ],
    }
    assert orjson.loads(body["EventPayload"]) == {
        "order": "42",
        "swu_message_id": "m-7",
        "swu_tags": ["orders", "shipped"],
    }
    assert "SandboxMode" not in record["body"]
    assert "authorization" not in {name.lower() for name in record["headers"]}


async def test_configured_campaign_wins_over_tags(esp_simulator: SimulatorHandle) -> None:
    """The custom_campaign option names the campaign of every message."""
    acc = kit.account("mailjet", esp_simulator.url, options={"custom_campaign": "transactional"})
    await kit.send_once(acc, [message(1, tags=["orders"]), message(2)])
    assert [m["CustomCampaign"] for m in messages(esp_simulator)] == ["transactional"] * 2


async def test_distinct_messages_are_packed_50_per_call(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """120 messages go out in calls of 50, 50 and 20, each with its own content and ids."""
    outcomes = await adapter.send([message(i) for i in range(120)])
    records = esp_simulator.requests("mailjet", 200)
    assert [len(r["body"]["Messages"]) for r in records] == [50, 50, 20]
    sent = messages(esp_simulator)
    assert [m["CustomID"] for m in sent] == [f"m-{i}" for i in range(120)]
    assert [m["HTMLPart"] for m in sent] == [f"<p>Order {i}</p>" for i in range(120)]
    ids = [i for r in records for i in r["message_id"].split(",")]
    assert outcomes == [SendOutcome.sent(i) for i in ids]
    assert len(set(ids)) == 120


async def test_refused_recipient_fails_only_its_message(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """A 400 with mixed results sends the good messages and rejects the refused one."""
    esp_simulator.add_rule(match_recipient="bad@example.com", provider="mailjet", action="400")
    batch = [message(0), message(1, to=Mailbox("bad@example.com")), message(2)]
    first, refused, last = await adapter.send(batch)
    assert (first.kind, last.kind) == (OutcomeKind.SENT, OutcomeKind.SENT)
    assert first.esp_message_id and last.esp_message_id
    assert refused.kind is OutcomeKind.REJECTED
    assert refused.reason.startswith("Mailjet 400: mj-0013 To[0].Email:")
    assert [r["status"] for r in esp_simulator.requests("mailjet")] == [400]


async def test_invalid_message_is_refused_alone(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """A header Mailjet forbids fails its own message with send-0011; the other is sent."""
    batch = [message(0, headers={"X-Mailer": "ours"}), message(1)]
    refused, sent = await adapter.send(batch)
    assert refused.kind is OutcomeKind.REJECTED
    assert 'send-0011 Headers["X-Mailer"]:' in refused.reason
    assert sent.kind is OutcomeKind.SENT and sent.esp_message_id


async def test_bad_secret_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong secret key gets 401 mj-0015, a permanent rejection for the whole call."""
    outcomes = await kit.send_once(
        kit.account("mailjet", esp_simulator.url, api_key="wrong"), [message(0), message(1)]
    )
    assert {o.kind for o in outcomes} == {OutcomeKind.REJECTED}
    assert outcomes[0].reason.startswith("Mailjet 401: mj-0015 API key authentication")


def test_public_key_is_required(esp_simulator: SimulatorHandle) -> None:
    """Without options.api_key_public the adapter cannot be built."""
    with pytest.raises(AdapterError, match="api_key_public"):
        MailjetAdapter(kit.account("mailjet", esp_simulator.url, options={"api_key_public": ""}))


async def test_rate_limit_is_retried_without_a_wait_signal(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """Mailjet's 429 is retryable and rate-limited; it documents no header saying how long."""
    esp_simulator.add_rule(provider="mailjet", action="429", times=1)
    outcomes = await adapter.send([message(0), message(1)])
    assert {(o.kind, o.rate_limited, o.retry_after) for o in outcomes} == {
        (OutcomeKind.RETRY, True, None)
    }


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle, adapter: MailjetAdapter
) -> None:
    """Over 15 MB of attachments or 50 recipients is rejected without a call."""
    big = message(0, attachments=[Attachment("big.bin", "application/pdf", b"x" * 12_000_000)])
    crowded = message(1, cc=[Mailbox(f"cc{i}@example.com") for i in range(50)])
    too_big, too_many, fine = await adapter.send([big, crowded, message(2)])
    assert too_big.kind is OutcomeKind.REJECTED and "15728640" in too_big.reason
    assert too_many.kind is OutcomeKind.REJECTED and "51 recipients" in too_many.reason
    assert fine.kind is OutcomeKind.SENT
    assert [m["CustomID"] for m in messages(esp_simulator)] == ["m-2"]


def _raw(message: dict[str, Any]) -> dict[str, Any]:
    """A valid Send API v3.1 message with `message`'s changes."""
    return {
        "From": {"Email": "orders@shop.example.com"},
        "To": [{"Email": "jane@example.com"}],
        "Subject": "Hi",
        "TextPart": "Hi",
    } | message


NOT_BASE64 = {"Filename": "a.txt", "Base64Content": "h i"}
MAILJET_RULES = {
    "51-messages": ({"Messages": [_raw({})] * 51}, 400, "mj-0008", None),
    "no-content": ({"Messages": [_raw({"TextPart": ""})]}, 400, "send-0003", "HTMLPart"),
    "bad-to": ({"Messages": [_raw({"To": [{"Email": "jane"}]})]}, 400, "mj-0013", "To[0]"),
    "not-base64": (
        {"Messages": [_raw({"Attachments": [{"ContentType": "text/plain", **NOT_BASE64}]})]},
        400,
        "mj-0004",
        "Attachments[0].Base64Content",
    ),
    "sandbox": ({"Messages": [_raw({})], "SandboxMode": True}, 200, "", None),
}


@pytest.mark.parametrize(
    ("body", "status", "code", "related"), MAILJET_RULES.values(), ids=MAILJET_RULES.keys()
)
async def test_simulator_answers_as_mailjet_documents(
    esp_simulator: SimulatorHandle, body: dict[str, Any], status: int, code: str, related: Any
) -> None:
    """The simulated Send API refuses what Mailjet documents, globally or per message."""
    pair = base64.b64encode(f"{PUBLIC_KEY}:sim-key".encode()).decode()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Basic {pair}"}) as session,
        session.post(f"{esp_simulator.url}/v3.1/send", json=body) as response,
    ):
        answer = await response.json()
    assert response.status == status
    if related is None and code:
        assert answer["ErrorCode"] == code
    elif code:
        (error,) = answer["Messages"][0]["Errors"]
        assert (error["ErrorCode"], error["ErrorRelatedTo"][0]) == (code, related)
    else:
        assert answer["Messages"][0]["To"][0]["MessageUUID"] == ""


def test_messages_end_sent_with_mailjet_ids(mailjet_server: ServerHandle) -> None:
    """Through the gRPC server, 60 messages end SENT, each with the id Mailjet gave it."""
    emails = [mk(to=f"user{i}@example.com", payload=data(i)) for i in range(60)]
    done = kit.deliver(mailjet_server, emails)
    issued = {}
    for record in mailjet_server.sim.requests("mailjet", 200):
        uuids = record["message_id"].split(",")
        for sent, uuid in zip(record["body"]["Messages"], uuids, strict=True):
            issued[sent["CustomID"]] = uuid
    assert kit.final_states(done) == {mid: ("SENT", "mj", their) for mid, their in issued.items()}
