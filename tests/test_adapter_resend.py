"""The Resend adapter over real HTTP against the ESP simulator, and end to end through gRPC."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from adapters.base import Attachment, Mailbox, OutboundEmail, OutcomeKind
from adapters.resend import ResendAdapter
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from tests import adapter_kit as kit
from tests.conftest import ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import mk

RUN = {"prefix": ""}


@pytest.fixture(autouse=True)
def fresh_ids() -> None:
    """Message ids unique to each test: the simulator remembers Idempotency-Keys for 24 hours."""
    RUN["prefix"] = uuid.uuid4().hex[:8]


def mid(i: int) -> str:
    """Our message id for message `i` of the running test."""
    return f"{RUN['prefix']}-{i}"


def message(i: int = 0, **fields: Any) -> OutboundEmail:
    return kit.message(i, message_id=mid(i), **fields)


def with_file(i: int) -> OutboundEmail:
    return message(i, attachments=[Attachment("a.txt", "text/plain", b"hi")])


adapter = kit.adapter_fixture("resend")
resend_server = kit.server_fixture("resend")


def records(sim: SimulatorHandle, status: int | None = None) -> list[dict[str, Any]]:
    return sim.requests(provider="resend", status=status)


def header(record: dict[str, Any], name: str) -> str | None:
    return {k.lower(): v for k, v in record["headers"].items()}.get(name.lower())


async def test_every_field_is_mapped(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """Addresses, bodies, headers, tags, metadata and attachments reach POST /emails."""
    email = kit.every_field(
        message_id=mid(0), tags=["orders", "shipped now"], metadata={"order id": "42/A"}
    )
    (outcome,) = await adapter.send([email])
    assert outcome.kind is OutcomeKind.SENT
    (record,) = records(esp_simulator, 200)
    assert record["message_id"] == outcome.esp_message_id
    assert record["recipients"] == 4
    assert record["body"] == {
        "from": "Shop Inc. <team@shop.example.com>",
        "to": ["Jane Doe <jane@example.com>"],
        "cc": ["Ann A Lee <cc@example.com>", "cc2@example.com"],
        "bcc": ["bcc@example.com"],
        "reply_to": ["Help Desk <reply@example.com>"],
        "subject": "Order 0 shipped",
        "html": "<p>Order 0</p>",
        "text": "Order 0",
        "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"},
        "tags": [
            {"name": "orders", "value": "true"},
            {"name": "shipped_now", "value": "true"},
            {"name": "order_id", "value": "42_A"},
            {"name": "swu_message_id", "value": mid(0)},
        ],
        "attachments": [
            {"filename": "a.txt", "content": "aGk=", "content_type": "text/plain"},
            {
                "filename": "logo.png",
                "content": "iVBORw==",
                "content_type": "image/png",
                "content_id": "logo",
            },
        ],
    }
    assert header(record, "Idempotency-Key") == f"swu/{mid(0)}"
    assert header(record, "Authorization") is None


async def test_250_messages_go_in_three_batches(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """250 plain messages make permissive batches of 100, 100 and 50, each keyed."""
    outcomes = await adapter.send([message(i) for i in range(250)])
    assert {o.kind for o in outcomes} == {OutcomeKind.SENT}
    assert len({o.esp_message_id for o in outcomes}) == 250
    calls = records(esp_simulator, 200)
    assert sorted(len(r["body"]) for r in calls) == [50, 100, 100]
    assert {header(r, "x-batch-validation") for r in calls} == {"permissive"}
    keys = {header(r, "Idempotency-Key") for r in calls}
    assert len(keys) == 3 and all(k and k.startswith("swu-batch/") for k in keys)
    by_ours = {
        email["tags"][-1]["value"]: their_id
        for r in calls
        for email, their_id in zip(r["body"], r["message_id"].split(","), strict=True)
    }
    assert [by_ours[mid(i)] for i in range(250)] == [o.esp_message_id for o in outcomes]


async def test_messages_with_attachments_go_alone(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """Attachments are refused in batches, so those messages go one by one to POST /emails."""
    outcomes = await adapter.send([message(0), message(1), with_file(2), message(3), with_file(4)])
    assert {o.kind for o in outcomes} == {OutcomeKind.SENT}
    shapes = sorted(
        ",".join(e["tags"][-1]["value"] for e in r["body"])
        if isinstance(r["body"], list)
        else "single " + r["body"]["tags"][-1]["value"]
        for r in records(esp_simulator, 200)
    )
    assert shapes == [f"{mid(0)},{mid(1)}", *(f"single {mid(i)}" for i in (2, 3, 4))]


async def test_one_refused_recipient_fails_alone(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """In a permissive batch, a refused email is rejected by index; the others are sent."""
    esp_simulator.add_rule(match_recipient="user1@example.com", action="400", provider="resend")
    bad = message(3, to=Mailbox("not-an-address"))
    outcomes = await adapter.send([message(0), message(1), message(2), bad])
    kinds = [o.kind for o in outcomes]
    assert kinds == [OutcomeKind.SENT, OutcomeKind.REJECTED, OutcomeKind.SENT, OutcomeKind.REJECTED]
    assert outcomes[1].reason.startswith("Resend validation_error: Invalid `to` field.")
    (record,) = records(esp_simulator, 200)
    assert len(record["body"]) == 4
    assert outcomes[0].esp_message_id != outcomes[2].esp_message_id


async def test_invalid_single_email_is_rejected(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """A lone invalid email is Resend's 422 validation_error, which is permanent."""
    (outcome,) = await adapter.send([message(0, to=Mailbox("not-an-address"))])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Resend 422: validation_error: Invalid `to` field.")


async def test_retried_call_is_answered_without_a_second_send(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """The same messages again carry the same Idempotency-Key and get the first ids back."""
    first = await adapter.send([message(0), message(1)])
    again = await adapter.send([message(0), message(1)])
    assert [o.esp_message_id for o in again] == [o.esp_message_id for o in first]
    sent, replayed = records(esp_simulator, 200)
    assert header(sent, "Idempotency-Key") == header(replayed, "Idempotency-Key")
    assert sent["message_id"] and replayed["message_id"] is None  # nothing new was sent


async def test_changed_payload_under_a_used_key_is_permanent(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """Resend's 409 invalid_idempotent_request (same key, other body) is not retried."""
    await adapter.send([message(0)])
    (outcome,) = await adapter.send([message(0, subject="Changed")])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Resend 409: invalid_idempotent_request:")


async def test_bad_key_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong API key rejects every message of the call."""
    async with kit.running(kit.account("resend", esp_simulator.url, api_key="wrong")) as rs:
        outcomes = await rs.send([message(0), message(1)])
    assert {o.kind for o in outcomes} == {OutcomeKind.REJECTED}
    assert outcomes[0].reason == "Resend 401: validation_error: API key is invalid"


async def test_rate_limit_carries_the_wait(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """A 429 is a rate-limited retry whose wait comes from retry-after."""
    esp_simulator.set_faults(retry_after_s=7)
    esp_simulator.add_rule(action="429", provider="resend", times=1)
    outcomes = await adapter.send([message(0), message(1)])
    assert {(o.kind, o.rate_limited) for o in outcomes} == {(OutcomeKind.RETRY, True)}
    assert outcomes[0].retry_after is not None and 6 <= outcomes[0].retry_after <= 8
    assert outcomes[0].reason.startswith("Resend 429: rate_limit_exceeded: Too many requests.")
    assert len(records(esp_simulator, 429)) == 1
    assert (await adapter.send([message(0)]))[0].kind is OutcomeKind.SENT


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle, adapter: ResendAdapter
) -> None:
    """Over 40 MB after base64 or over 50 recipients never leaves the adapter."""
    raw = b"x" * 32_000_000  # 42.7 MB once base64-encoded; the limit is 40 MiB
    big = message(0, attachments=[Attachment("big.bin", "application/octet-stream", raw)])
    crowded = message(1, bcc=[Mailbox(f"bcc{i}@example.com") for i in range(50)])
    outcomes = await adapter.send([big, crowded, message(2)])
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECTED] * 2 + [OutcomeKind.SENT]
    assert "the limit is 41943040" in outcomes[0].reason
    assert "51 recipients; the limit is 50" in outcomes[1].reason
    assert len(records(esp_simulator)) == 1


async def test_simulator_strict_batch_fails_whole(esp_simulator: SimulatorHandle) -> None:
    """Without x-batch-validation (strict), one invalid email fails the batch with a 422."""
    good = {"from": "a@shop.example.com", "to": "b@example.com", "subject": "s", "text": "t"}
    bad = good | {"to": "nobody"}
    headers = {"Authorization": "Bearer sim-key"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{esp_simulator.url}/emails/batch", json=[good, bad], headers=headers) as r,
    ):
        status, answer = r.status, await r.json()
    assert (status, answer["name"]) == (422, "validation_error")
    assert answer["message"].startswith("emails[1]: Invalid `to` field.")
    assert records(esp_simulator, 422)[0]["message_id"] is None


def test_end_to_end_through_resend(resend_server: ServerHandle) -> None:
    """Messages sent through the gRPC API, one with a file, end SENT with Resend's ids."""
    attachment = delivery_pb2.Attachment(filename="a.txt", content_type="text/plain", content=b"hi")
    emails = [mk(to=f"user{i}@example.com") for i in range(4)]
    emails.append(mk(to="file@example.com", attachments=[attachment]))
    emails.append(mk(to="cc@example.com", cc=[common_pb2.Address(email="copy@example.com")]))
    done = kit.deliver(resend_server, emails)
    theirs = {}
    for record in resend_server.sim.requests(provider="resend", status=200):
        body = record["body"] if isinstance(record["body"], list) else [record["body"]]
        for email, their_id in zip(body, record["message_id"].split(","), strict=True):
            theirs[email["tags"][-1]["value"]] = their_id
            assert ("attachments" in email) == (email["to"] == ["file@example.com"])
    assert kit.final_states(done) == {mid: ("SENT", "rs", their) for mid, their in theirs.items()}
