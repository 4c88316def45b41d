"""The Brevo adapter over real HTTP against the simulator: mapping, ids, limits and faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from adapters.base import Attachment, Mailbox, OutboundEmail, OutcomeKind, SendOutcome
from adapters.brevo import BrevoAdapter
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount
from tests.conftest import SIM_KEY_ENV, STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk


def account(sim: SimulatorHandle, **fields: Any) -> EspAccount:
    """A Brevo account at the simulator; `fields` override the defaults."""
    defaults: dict[str, Any] = {
        "name": "brevo",
        "kind": "brevo",
        "base_url": sim.url,
        "api_key": "sim-key",
        "sender": "orders@shop.example.com",
        "timeout": 5.0,
    }
    return EspAccount(**(defaults | fields))


def email(i: int = 0, **fields: Any) -> OutboundEmail:
    """A rendered message numbered `i`."""
    defaults: dict[str, Any] = {
        "message_id": f"m-{i}",
        "sender": Mailbox("orders@shop.example.com", "Shop"),
        "to": Mailbox(f"user{i}@example.com"),
        "subject": f"Order {i} shipped",
        "html": f"<p>Order {i}</p>",
        "text": f"Order {i}",
    }
    return OutboundEmail(**(defaults | fields))


async def send(acc: EspAccount, emails: list[OutboundEmail]) -> list[SendOutcome]:
    """One adapter's life: start, send `emails`, close."""
    adapter = BrevoAdapter(acc)
    await adapter.start()
    try:
        return await adapter.send(emails)
    finally:
        await adapter.close()


async def test_every_field_is_mapped(esp_simulator: SimulatorHandle) -> None:
    """Addresses, bodies, headers, our id, tags and attachments reach Brevo."""
    message = email(
        7,
        cc=[Mailbox("cc@example.com", "C C")],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com", "Support"),
        headers={"X-Campaign": "spring"},
        tags=["orders", "shipped"],
        metadata={"order": "42"},
        attachments=[Attachment("a.txt", "text/plain", b"hi")],
    )
    (outcome,) = await send(account(esp_simulator), [message])
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


async def test_each_message_is_its_own_call(esp_simulator: SimulatorHandle) -> None:
    """Three messages make three calls, each carrying its own id and getting its own messageId."""
    outcomes = await send(account(esp_simulator), [email(i) for i in range(3)])
    records = esp_simulator.requests("brevo", 201)
    custom = [orjson.loads(r["body"]["headers"]["X-Mailin-custom"]) for r in records]
    by_id = {c["swu_message_id"]: r["message_id"] for c, r in zip(custom, records, strict=True)}
    assert outcomes == [SendOutcome.sent(by_id[f"m-{i}"]) for i in range(3)]
    assert len(set(by_id.values())) == 3


async def test_caller_cannot_replace_the_id_header(esp_simulator: SimulatorHandle) -> None:
    """A caller's own X-Mailin-custom header gives way to ours."""
    await send(account(esp_simulator), [email(1, headers={"x-mailin-custom": "theirs"})])
    (record,) = esp_simulator.requests("brevo", 201)
    (name,) = record["body"]["headers"]
    assert orjson.loads(record["body"]["headers"][name])["swu_message_id"] == "m-1"


async def test_inline_images_are_refused_before_sending(esp_simulator: SimulatorHandle) -> None:
    """Brevo has no Content-ID attachments, so an inline image is rejected without a call."""
    inline = Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo")
    (outcome,) = await send(account(esp_simulator), [email(0, attachments=[inline])])
    assert outcome.kind is OutcomeKind.REJECTED
    assert "inline attachments" in outcome.reason and "logo.png" in outcome.reason
    assert esp_simulator.requests("brevo") == []


async def test_documented_refusal_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """An attachment extension Brevo does not allow gets 400 invalid_parameter: rejected."""
    exe = Attachment("setup.exe", "application/octet-stream", b"MZ")
    (outcome,) = await send(account(esp_simulator), [email(0, attachments=[exe])])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("Brevo 400: invalid_parameter: ")
    assert "setup.exe" in outcome.reason


async def test_bad_key_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong api-key gets 401 unauthorized, a permanent rejection."""
    (outcome,) = await send(account(esp_simulator, api_key="wrong"), [email(0)])
    assert outcome == SendOutcome.rejected("Brevo 401: unauthorized: Key not found")


async def test_rate_limit_waits_for_the_reset(esp_simulator: SimulatorHandle) -> None:
    """A 429 is retried after x-sib-ratelimit-reset seconds, flagged as throttling."""
    esp_simulator.set_faults(retry_after_s=30, rules=[{"action": "429", "provider": "brevo"}])
    (outcome,) = await send(account(esp_simulator), [email(0)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, True)
    assert outcome.retry_after in (30.0, 31.0)  # whole seconds until the reset, rounded up
    (record,) = esp_simulator.requests("brevo", 429)
    assert record["message_id"] is None


@pytest.mark.parametrize("action", ["500", "503"])
async def test_server_errors_are_retried(esp_simulator: SimulatorHandle, action: str) -> None:
    """A 5xx is retryable, not throttled."""
    esp_simulator.add_rule(provider="brevo", action=action, times=1)
    (outcome,) = await send(account(esp_simulator), [email(0)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, False)
    assert outcome.reason.startswith(f"Brevo {action}: internal_error")


async def test_timeout_is_retried(esp_simulator: SimulatorHandle) -> None:
    """An answer slower than the account's timeout is a retry."""
    esp_simulator.add_rule(provider="brevo", action="latency", latency_ms=1500, times=1)
    (outcome,) = await send(account(esp_simulator, timeout=0.3), [email(0)])
    assert outcome.kind is OutcomeKind.RETRY
    assert "TimeoutError" in outcome.reason
    _await_records(esp_simulator, 1)  # the late answer must not spill into the next test


async def test_dropped_connection_is_retried(esp_simulator: SimulatorHandle) -> None:
    """A connection closed without an answer is a retry."""
    esp_simulator.add_rule(provider="brevo", action="drop", times=1)
    (outcome,) = await send(account(esp_simulator), [email(0)])
    assert outcome.kind is OutcomeKind.RETRY
    assert "Disconnected" in outcome.reason


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle,
) -> None:
    """Over 20 MB with attachments or 99 recipients is rejected without a call."""
    big = email(0, attachments=[Attachment("big.pdf", "application/pdf", b"x" * 16_000_000)])
    crowded = email(1, bcc=[Mailbox(f"bcc{i}@example.com") for i in range(99)])
    too_big, too_many, fine = await send(account(esp_simulator), [big, crowded, email(2)])
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


def _await_records(sim: SimulatorHandle, count: int) -> None:
    """Wait (bounded) until the simulator has recorded `count` requests."""
    deadline = time.monotonic() + 10
    while len(sim.requests()) < count and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def brevo_server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The real service delivering through a Brevo account at the simulator."""
    extra = f"""
[[esp]]
name = "brevo"
kind = "brevo"
base_url = "{esp_simulator.url}"
api_key_env = "{SIM_KEY_ENV}"
sender = "orders@shop.example.com"
sender_name = "Shop"
timeout = 5
"""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url, extra, "brevo")
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.start()
    yield handle
    handle.stop()


def test_messages_end_sent_with_brevo_ids(brevo_server: ServerHandle) -> None:
    """Through the gRPC server, 20 messages end SENT, each with the messageId Brevo gave it."""
    brevo_server.put_template("order", {"en": ORDER})
    emails = [mk(to=f"user{i}@example.com", payload=data(i)) for i in range(20)]
    request = delivery_pb2.SendBatchRequest(emails=emails)
    ids = [r.message_id for r in brevo_server.delivery.SendBatch(request).results]
    done = brevo_server.wait_for_state(ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    issued = {}
    for record in brevo_server.sim.requests("brevo", 201):
        custom = orjson.loads(record["body"]["headers"]["X-Mailin-custom"])
        issued[custom["swu_message_id"]] = record["message_id"]
    assert {mid: (m.esp, m.esp_message_id) for mid, m in done.items()} == {
        mid: ("brevo", issued[mid]) for mid in ids
    }
