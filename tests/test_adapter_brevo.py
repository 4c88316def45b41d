"""The Brevo adapter over real HTTP against the simulator: mapping, ids, limits, Brevo errors."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from adapters.base import Attachment, Mailbox, OutcomeKind, SendOutcome
from adapters.brevo import BrevoAdapter
from tests import adapter_kit as kit
from tests.adapter_kit import message
from tests.conftest import ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import data, mk

adapter = kit.adapter_fixture("brevo")
brevo_server = kit.server_fixture("brevo")


async def test_every_field_is_mapped(esp_simulator: SimulatorHandle, adapter: BrevoAdapter) -> None:
    """Addresses, bodies, headers, our id, tags and attachments reach Brevo."""
    msg = message(
        7,
        cc=[Mailbox("cc@example.com", "C C")],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com", "Support"),
        headers={"X-Campaign": "spring"},
        tags=["orders", "shipped"],
        metadata={"order": "42"},
        attachments=[Attachment("a.txt", "text/plain", b"hi")],
    )
    (outcome,) = await adapter.send([msg])
    (record,) = esp_simulator.requests("brevo", 201)
    assert outcome == SendOutcome.sent(record["message_id"])
    assert record["message_id"].startswith("<") and record["message_id"].endswith(">")
    body = record["body"]
    assert body == {
        "sender": {"email": "orders@shop.example.com", "name": "Shop"},
        "to": [{"email": "user7@example.com"}],
        "cc": [{"email": "cc@example.com", "name": "C C"}],
        "bcc": [{"email": "bcc@example.com"}],
        "replyTo": {"email": "reply@example.com", "name": "Support"},
        "subject": "Order 7 shipped",
        "htmlContent": "<p>Order 7</p>",
        "textContent": "Order 7",
        "headers": {"X-Campaign": "spring", "X-Mailin-custom": body["headers"]["X-Mailin-custom"]},
        "tags": ["orders", "shipped"],
        "attachment": [{"content": "aGk=", "name": "a.txt"}],
    }
    custom = orjson.loads(body["headers"]["X-Mailin-custom"])
    assert custom == {"order": "42", "swu_message_id": "m-7"}
    assert {"api-key", "authorization"}.isdisjoint(name.lower() for name in record["headers"])


async def test_each_message_is_its_own_call(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """Three messages make three calls, each carrying its own id and getting its own messageId."""
    outcomes = await adapter.send([message(i) for i in range(3)])
    records = esp_simulator.requests("brevo", 201)
    custom = [orjson.loads(r["body"]["headers"]["X-Mailin-custom"]) for r in records]
    by_id = {c["swu_message_id"]: r["message_id"] for c, r in zip(custom, records, strict=True)}
    assert outcomes == [SendOutcome.sent(by_id[f"m-{i}"]) for i in range(3)]
    assert len(set(by_id.values())) == 3


async def test_caller_cannot_replace_the_id_header(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """A caller's own X-Mailin-custom header gives way to ours."""
    await adapter.send([message(1, headers={"x-mailin-custom": "theirs"})])
    (record,) = esp_simulator.requests("brevo", 201)
    (name,) = record["body"]["headers"]
    assert orjson.loads(record["body"]["headers"][name])["swu_message_id"] == "m-1"


async def test_inline_images_are_refused_before_sending(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """Brevo has no Content-ID attachments, so an inline image is rejected without a call."""
    inline = Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo")
    (outcome,) = await adapter.send([message(0, attachments=[inline])])
    assert outcome.kind is OutcomeKind.REJECTED
    assert "inline attachments" in outcome.reason and "logo.png" in outcome.reason
    assert esp_simulator.requests("brevo") == []


async def test_documented_refusal_is_permanent(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """An attachment extension Brevo does not allow gets 400 invalid_parameter: rejected."""
    exe = Attachment("setup.exe", "application/octet-stream", b"MZ")
    (outcome,) = await adapter.send([message(0, attachments=[exe])])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Brevo 400: invalid_parameter: ")
    assert "setup.exe" in outcome.reason


async def test_bad_key_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong api-key gets 401 unauthorized, a permanent rejection."""
    (outcome,) = await kit.send_once(
        kit.account("brevo", esp_simulator.url, api_key="wrong"), [message(0)]
    )
    assert outcome == SendOutcome.rejected("Brevo 401: unauthorized: Key not found")


async def test_rate_limit_waits_for_the_reset(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """A 429 is retried after x-sib-ratelimit-reset seconds, flagged as throttling."""
    esp_simulator.set_faults(retry_after_s=30, rules=[{"action": "429", "provider": "brevo"}])
    (outcome,) = await adapter.send([message(0)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, True)
    assert outcome.retry_after in (30.0, 31.0)  # whole seconds until the reset, rounded up
    (record,) = esp_simulator.requests("brevo", 429)
    assert record["message_id"] is None


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle, adapter: BrevoAdapter
) -> None:
    """Over 20 MB with attachments or 99 recipients is rejected without a call."""
    big = message(0, attachments=[Attachment("big.pdf", "application/pdf", b"x" * 16_000_000)])
    crowded = message(1, bcc=[Mailbox(f"bcc{i}@example.com") for i in range(99)])
    too_big, too_many, fine = await adapter.send([big, crowded, message(2)])
    assert too_big.kind is OutcomeKind.REJECTED and "20971520" in too_big.reason
    assert too_many.kind is OutcomeKind.REJECTED and "100 recipients" in too_many.reason
    assert fine.kind is OutcomeKind.SENT
    (record,) = esp_simulator.requests("brevo")
    assert record["body"]["to"] == [{"email": "user2@example.com"}]


def _version(count: int) -> dict[str, Any]:
    return {"to": [{"email": f"r{i}@example.com"} for i in range(count)]}


BASE = {"sender": {"email": "orders@shop.example.com"}, "subject": "Hi", "textContent": "Hi"}
BREVO_RULES = {
    "no-sender": ({"to": [{"email": "a@example.com"}], "subject": "Hi", "textContent": "Hi"}, 400),
    "bad-to": (BASE | {"to": [{"email": "jane"}]}, 400),
    "no-body": ({**BASE, "textContent": "", "to": [{"email": "a@example.com"}]}, 400),
    "100-in-a-version": (BASE | {"messageVersions": [_version(100)]}, 400),
    "two-versions": (BASE | {"messageVersions": [_version(2), _version(3)]}, 201),
}


@pytest.mark.parametrize(("body", "status"), BREVO_RULES.values(), ids=BREVO_RULES.keys())
async def test_simulator_answers_as_brevo_documents(
    esp_simulator: SimulatorHandle, body: dict[str, Any], status: int
) -> None:
    """The simulated endpoint refuses what Brevo documents and answers versions with ids."""
    async with (
        aiohttp.ClientSession(headers={"api-key": "sim-key"}) as session,
        session.post(f"{esp_simulator.url}/v3/smtp/email", json=body) as response,
    ):
        answer = await response.json()
    assert response.status == status
    if status == 400:
        assert answer["code"] in {"missing_parameter", "invalid_parameter", "out_of_range"}
        assert answer["message"]
    else:
        assert len(answer["messageIds"]) == 2


def test_messages_end_sent_with_brevo_ids(brevo_server: ServerHandle) -> None:
    """Through the gRPC server, 20 messages end SENT, each with the messageId Brevo gave it."""
    emails = [mk(to=f"user{i}@example.com", payload=data(i)) for i in range(20)]
    done = kit.deliver(brevo_server, emails)
    issued = {}
    for record in brevo_server.sim.requests("brevo", 201):
        custom = orjson.loads(record["body"]["headers"]["X-Mailin-custom"])
        issued[custom["swu_message_id"]] = record["message_id"]
    assert kit.final_states(done) == {
        mid: ("SENT", "brevo", their) for mid, their in issued.items()
    }
