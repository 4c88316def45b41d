"""The SparkPost adapter over real HTTP against the simulator, and one message end to end."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from adapters.base import (
    AdapterError,
    Attachment,
    HttpResponse,
    Mailbox,
    OutcomeKind,
)
from adapters.sparkpost import SparkPostAdapter
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount
from tests import adapter_kit as kit
from tests.adapter_kit import message
from tests.conftest import STATE_NAMES, ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import mk

sparkpost = kit.adapter_fixture("sparkpost")
sparkpost_server = kit.server_fixture("sparkpost", region="us")


def account(**changes: Any) -> EspAccount:
    """A SparkPost account with no endpoint set: the adapter's own default applies."""
    return kit.account("sparkpost", "", **changes)


async def test_every_field_is_mapped(
    sparkpost: SparkPostAdapter, esp_simulator: SimulatorHandle
) -> None:
    """Recipients, content, headers, tags, metadata and files reach the transmission."""
    email = message(
        1,
        to=Mailbox("jane@example.com", "Jane Roe"),
        html="<p>Hi {{ name }}</p>",
        sender=Mailbox("team@shop.example.com", "Team"),
        cc=[Mailbox("cc@example.com", 'Doe, "JJ"')],
        bcc=[Mailbox("bcc@example.com")],
        reply_to=Mailbox("reply@example.com", "Help Desk"),
        headers={"X-Campaign": "spring"},
        tags=["orders", "shipped"],
        metadata={"order": "42", "swu_message_id": "spoofed"},
        attachments=[
            Attachment("a.txt", "text/plain", b"hi"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
        ],
    )
    (outcome,) = await sparkpost.send([email])
    (record,) = esp_simulator.requests(provider="sparkpost", status=200)
    assert outcome.kind is OutcomeKind.SENT
    assert outcome.esp_message_id == record["message_id"] and outcome.esp_message_id.isdigit()
    body = record["body"]
    to, cc, bcc = body["recipients"]
    tags = ["orders", "shipped"]
    assert to == {"address": {"email": "jane@example.com", "name": "Jane Roe"}, "tags": tags}
    visible = "Jane Roe <jane@example.com>"
    assert cc == {"address": {"email": "cc@example.com", "header_to": visible}, "tags": tags}
    assert bcc == {"address": {"email": "bcc@example.com", "header_to": visible}, "tags": tags}
    content = body["content"]
    assert content["from"] == {"email": "team@shop.example.com", "name": "Team"}
    assert (content["subject"], content["text"]) == ("Order 1 shipped", "Order 1")
    assert content["html"] == "<p>Hi {{ name }}</p>"
    assert content["reply_to"] == "Help Desk <reply@example.com>"
    assert content["headers"] == {"X-Campaign": "spring", "CC": '"Doe, \\"JJ\\"" <cc@example.com>'}
    assert content["attachments"] == [{"name": "a.txt", "type": "text/plain", "data": "aGk="}]
    assert content["inline_images"] == [{"name": "logo", "type": "image/png", "data": "iVBORw=="}]
    assert body["metadata"] == {"order": "42", "swu_message_id": "m-1"}
    assert body["campaign_id"] == "orders"
    assert body["options"] == {"perform_substitutions": False}
    assert record["recipients"] == 3
    assert "Authorization" not in record["headers"]


async def test_rejected_copy_still_sends(
    sparkpost: SparkPostAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A recipient SparkPost rejects on its own leaves the message sent to the others."""
    (outcome,) = await sparkpost.send([message(cc=[Mailbox("not-an-address")])])
    (record,) = esp_simulator.requests(provider="sparkpost", status=200)
    assert outcome.kind is OutcomeKind.SENT and outcome.esp_message_id == record["message_id"]
    assert record["recipients"] == 1


async def test_no_valid_recipient_is_permanent(sparkpost: SparkPostAdapter) -> None:
    """A transmission with no valid recipient is refused and rejected without retry."""
    (outcome,) = await sparkpost.send([message(to=Mailbox("not-an-address"))])
    assert outcome.kind is OutcomeKind.REJECTED
    assert "recipients[0].address.email" in outcome.reason and "(code 1300)" in outcome.reason


def test_region_and_subaccount_come_from_options() -> None:
    """`region = "eu"` picks the EU endpoint; `subaccount` becomes X-MSYS-SUBACCOUNT."""
    eu = SparkPostAdapter(account(options={"region": "eu", "subaccount": 7}))
    assert eu.base_url == "https://api.eu.sparkpost.com"
    assert eu.auth_headers() == {"Authorization": "sim-key", "X-MSYS-SUBACCOUNT": "7"}
    assert SparkPostAdapter(account()).base_url == "https://api.sparkpost.com"
    for options in ({"region": "ap"}, {"subaccount": "seven"}):
        with pytest.raises(AdapterError, match=r"esp sp: (region|subaccount)"):
            SparkPostAdapter(account(options=options))


async def test_bad_key_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong API key is refused with 401 and rejected without retry."""
    acc = kit.account("sparkpost", esp_simulator.url, api_key="wrong")
    async with kit.running(acc) as adapter:
        (outcome,) = await adapter.send([message()])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason == "SparkPost 401: Unauthorized."


async def test_scripted_rejection_is_permanent(
    sparkpost: SparkPostAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A scripted rejection of the recipient is permanent and carries SparkPost's error."""
    esp_simulator.add_rule(match_recipient="user0@example.com", provider="sparkpost", action="400")
    (outcome,) = await sparkpost.send([message()])
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.reason.startswith("SparkPost 422: invalid data format/type: recipients[0]")


async def test_rate_limit_waits_as_told(
    sparkpost: SparkPostAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A 429 is retryable, flagged as throttling, with the wait from Retry-After."""
    esp_simulator.set_faults(retry_after_s=30)
    esp_simulator.add_rule(provider="sparkpost", action="429", times=1)
    (outcome,) = await sparkpost.send([message()])
    assert outcome.kind is OutcomeKind.RETRY and outcome.rate_limited
    assert outcome.retry_after is not None and 1 <= outcome.retry_after <= 31


def test_sending_limit_420_is_throttling() -> None:
    """SparkPost's 420 (hourly/daily sending limit exceeded) is retried as throttling."""
    adapter = SparkPostAdapter(account())
    body = b'{"errors":[{"message":"Exceed Sending Limit (daily)","code":"2102"}]}'
    (outcome,) = adapter.classify_error([message()], HttpResponse(420, {}, body))
    assert outcome.kind is OutcomeKind.RETRY and outcome.rate_limited
    assert outcome.reason == "SparkPost 420: Exceed Sending Limit (daily) (code 2102)"


async def test_oversized_message_is_rejected_before_sending(
    sparkpost: SparkPostAdapter, esp_simulator: SimulatorHandle
) -> None:
    """A message over 15 MB once base64-encoded is rejected without a request."""
    big = Attachment("big.bin", "application/octet-stream", bytes(12 * 1024 * 1024))
    (outcome,) = await sparkpost.send([message(attachments=[big])])
    assert outcome.kind is OutcomeKind.REJECTED and "15000000" in outcome.reason
    assert esp_simulator.requests(provider="sparkpost") == []


@pytest.mark.parametrize(
    ("change", "description"),
    [
        ({"content": {"subject": "s", "text": "t"}}, "content.from is a required field"),
        ({"recipients": []}, "recipients is a required non-empty array"),
        ({"campaign_id": "c" * 65}, "campaign_id must be a string of at most 64 bytes"),
        (
            {
                "content": {
                    "from": "a@shop.example.com",
                    "subject": "s",
                    "text": "t",
                    "headers": {"To": "x@example.com"},
                }
            },
            "content.headers: To is not allowed here",
        ),
        (
            {
                "content": {
                    "from": "a@shop.example.com",
                    "subject": "s",
                    "text": "t",
                    "attachments": [{"name": "a", "type": "text/plain", "data": "a\nb"}],
                }
            },
            "content.attachments[0].data must be base64 without line breaks",
        ),
    ],
)
async def test_simulator_refuses_what_sparkpost_documents(
    esp_simulator: SimulatorHandle, change: dict[str, Any], description: str
) -> None:
    """The simulated endpoint answers 422 with SparkPost's error code and our description."""
    body = {
        "recipients": [{"address": "b@example.com"}],
        "content": {"from": "a@shop.example.com", "subject": "s", "text": "t"},
    } | change
    async with (
        aiohttp.ClientSession(headers={"Authorization": "sim-key"}) as session,
        session.post(f"{esp_simulator.url}/api/v1/transmissions", json=body) as response,
    ):
        (error,) = (await response.json())["errors"]
    assert response.status == 422 and error["description"] == description
    assert error["code"] in ("1300", "1400")


def test_message_sent_through_sparkpost_end_to_end(sparkpost_server: ServerHandle) -> None:
    """A Send through the gRPC server ends SENT with SparkPost's transmission id."""
    request = delivery_pb2.SendRequest(email=mk(to="jane@example.com"))
    mid = sparkpost_server.delivery.Send(request).message_id
    done = sparkpost_server.wait_for_state([mid])[mid]
    (record,) = sparkpost_server.sim.requests(provider="sparkpost", status=200)
    assert STATE_NAMES[done.state] == "SENT"
    assert (done.esp, done.esp_message_id) == ("sp", record["message_id"])
    body = record["body"]
    assert body["metadata"] == {"swu_message_id": mid}
    assert body["content"]["subject"] == "Order 1000 shipped, User0"
