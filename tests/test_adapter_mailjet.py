"""The Mailjet adapter over real HTTP against the simulator: mapping, batches, partial failure."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.base import AdapterError, Attachment, Mailbox, OutboundEmail, OutcomeKind, SendOutcome
from adapters.mailjet import MailjetAdapter
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount
from tests.conftest import SIM_KEY_ENV, STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

PUBLIC_KEY = "sim-public"


def account(sim: SimulatorHandle, **fields: Any) -> EspAccount:
    """A Mailjet account at the simulator; `fields` override the defaults."""
    options = {"api_key_public": PUBLIC_KEY, **fields.pop("options", {})}
    defaults: dict[str, Any] = {
        "name": "mj",
        "kind": "mailjet",
        "base_url": sim.url,
        "api_key": "sim-key",
        "sender": "orders@shop.example.com",
        "timeout": 5.0,
    }
    return EspAccount(**(defaults | fields), options=options)


def email(i: int = 0, to: str = "", **fields: Any) -> OutboundEmail:
    """A rendered message numbered `i`."""
    defaults: dict[str, Any] = {
        "message_id": f"m-{i}",
        "sender": Mailbox("orders@shop.example.com", "Shop"),
        "to": Mailbox(to or f"user{i}@example.com"),
        "subject": f"Order {i} shipped",
        "html": f"<p>Order {i}</p>",
        "text": f"Order {i}",
    }
    return OutboundEmail(**(defaults | fields))


async def send(acc: EspAccount, emails: list[OutboundEmail]) -> list[SendOutcome]:
    """One adapter's life: start, send `emails`, close."""
    adapter = MailjetAdapter(acc)
    await adapter.start()
    try:
        return await adapter.send(emails)
    finally:
        await adapter.close()


def messages(sim: SimulatorHandle, status: int | None = None) -> list[dict[str, Any]]:
    """Every message the simulator received for Mailjet, in order."""
    return [m for r in sim.requests("mailjet", status) for m in r["body"]["Messages"]]


async def test_every_field_is_mapped(esp_simulator: SimulatorHandle) -> None:
    """Addresses, bodies, headers, ids, tags and both kinds of attachment reach Mailjet."""
    message = email(
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
    (outcome,) = await send(account(esp_simulator), [message])
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
    acc = account(esp_simulator, options={"custom_campaign": "transactional"})
    await send(acc, [email(1, tags=["orders"]), email(2)])
    assert [m["CustomCampaign"] for m in messages(esp_simulator)] == ["transactional"] * 2


async def test_distinct_messages_are_packed_50_per_call(esp_simulator: SimulatorHandle) -> None:
    """120 messages go out in calls of 50, 50 and 20, each with its own content and ids."""
    outcomes = await send(account(esp_simulator), [email(i) for i in range(120)])
    records = esp_simulator.requests("mailjet", 200)
    assert [len(r["body"]["Messages"]) for r in records] == [50, 50, 20]
    sent = messages(esp_simulator)
    assert [m["CustomID"] for m in sent] == [f"m-{i}" for i in range(120)]
    assert [m["HTMLPart"] for m in sent] == [f"<p>Order {i}</p>" for i in range(120)]
    ids = [i for r in records for i in r["message_id"].split(",")]
    assert outcomes == [SendOutcome.sent(i) for i in ids]
    assert len(set(ids)) == 120


async def test_refused_recipient_fails_only_its_message(esp_simulator: SimulatorHandle) -> None:
    """A 400 with mixed results sends the good messages and rejects the refused one."""
    esp_simulator.add_rule(match_recipient="bad@example.com", provider="mailjet", action="400")
    batch = [email(0), email(1, to="bad@example.com"), email(2)]
    first, refused, last = await send(account(esp_simulator), batch)
    assert (first.kind, last.kind) == (OutcomeKind.SENT, OutcomeKind.SENT)
    assert first.esp_message_id and last.esp_message_id
    assert refused.kind is OutcomeKind.REJECTED
    assert refused.reason.startswith("Mailjet 400: mj-0013 To[0].Email:")
    assert [r["status"] for r in esp_simulator.requests("mailjet")] == [400]


async def test_invalid_message_is_refused_alone(esp_simulator: SimulatorHandle) -> None:
    """A header Mailjet forbids fails its own message with send-0011; the other is sent."""
    batch = [email(0, headers={"X-Mailer": "ours"}), email(1)]
    refused, sent = await send(account(esp_simulator), batch)
    assert refused.kind is OutcomeKind.REJECTED
    assert 'send-0011 Headers["X-Mailer"]:' in refused.reason
    assert sent.kind is OutcomeKind.SENT and sent.esp_message_id


async def test_bad_secret_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong secret key gets 401 mj-0015, a permanent rejection for the whole call."""
    outcomes = await send(account(esp_simulator, api_key="wrong"), [email(0), email(1)])
    assert {o.kind for o in outcomes} == {OutcomeKind.REJECTED}
    assert outcomes[0].reason.startswith("Mailjet 401: mj-0015 API key authentication")


def test_public_key_is_required(esp_simulator: SimulatorHandle) -> None:
    """Without options.api_key_public the adapter cannot be built."""
    with pytest.raises(AdapterError, match="api_key_public"):
        MailjetAdapter(account(esp_simulator, options={"api_key_public": ""}))


async def test_rate_limit_is_retried_without_a_wait_signal(esp_simulator: SimulatorHandle) -> None:
    """Mailjet's 429 is retryable and rate-limited; it documents no header saying how long."""
    esp_simulator.add_rule(provider="mailjet", action="429", times=1)
    outcomes = await send(account(esp_simulator), [email(0), email(1)])
    assert {(o.kind, o.rate_limited, o.retry_after) for o in outcomes} == {
        (OutcomeKind.RETRY, True, None)
    }


@pytest.mark.parametrize("action", ["500", "503"])
async def test_server_errors_are_retried(esp_simulator: SimulatorHandle, action: str) -> None:
    """A 5xx makes every message of the call retryable, not throttled."""
    esp_simulator.add_rule(provider="mailjet", action=action, times=1)
    (outcome,) = await send(account(esp_simulator), [email(0)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, False)
    assert outcome.reason.startswith(f"Mailjet {action}:")


async def test_timeout_is_retried(esp_simulator: SimulatorHandle) -> None:
    """An answer slower than the account's timeout is a retry."""
    esp_simulator.add_rule(provider="mailjet", action="latency", latency_ms=1500, times=1)
    (outcome,) = await send(account(esp_simulator, timeout=0.3), [email(0)])
    assert outcome.kind is OutcomeKind.RETRY
    assert "TimeoutError" in outcome.reason
    _await_records(esp_simulator, 1)  # the late answer must not spill into the next test


async def test_dropped_connection_is_retried(esp_simulator: SimulatorHandle) -> None:
    """A connection closed without an answer is a retry."""
    esp_simulator.add_rule(provider="mailjet", action="drop", times=1)
    (outcome,) = await send(account(esp_simulator), [email(0)])
    assert outcome.kind is OutcomeKind.RETRY
    assert "Disconnected" in outcome.reason


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle,
) -> None:
    """Over 15 MB of attachments or 50 recipients is rejected without a call."""
    big = email(0, attachments=[Attachment("big.bin", "application/pdf", b"x" * 12_000_000)])
    crowded = email(1, cc=[Mailbox(f"cc{i}@example.com") for i in range(50)])
    too_big, too_many, fine = await send(account(esp_simulator), [big, crowded, email(2)])
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


def _await_records(sim: SimulatorHandle, count: int) -> None:
    """Wait (bounded) until the simulator has recorded `count` requests."""
    deadline = time.monotonic() + 10
    while len(sim.requests()) < count and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def mailjet_server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The real service delivering through a Mailjet account at the simulator."""
    extra = f"""
[[esp]]
name = "mj"
kind = "mailjet"
base_url = "{esp_simulator.url}"
api_key_env = "{SIM_KEY_ENV}"
api_key_public = "{PUBLIC_KEY}"
sender = "orders@shop.example.com"
sender_name = "Shop"
timeout = 5
"""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url, extra, "mj")
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.start()
    yield handle
    handle.stop()


def test_messages_end_sent_with_mailjet_ids(mailjet_server: ServerHandle) -> None:
    """Through the gRPC server, 60 messages end SENT, each with the id Mailjet gave it."""
    mailjet_server.put_template("order", {"en": ORDER})
    emails = [mk(to=f"user{i}@example.com", payload=data(i)) for i in range(60)]
    request = delivery_pb2.SendBatchRequest(emails=emails)
    ids = [r.message_id for r in mailjet_server.delivery.SendBatch(request).results]
    done = mailjet_server.wait_for_state(ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    issued = {}
    for record in mailjet_server.sim.requests("mailjet", 200):
        uuids = record["message_id"].split(",")
        for message, uuid in zip(record["body"]["Messages"], uuids, strict=True):
            issued[message["CustomID"]] = uuid
    assert {mid: (m.esp, m.esp_message_id) for mid, m in done.items()} == {
        mid: ("mj", issued[mid]) for mid in ids
    }
