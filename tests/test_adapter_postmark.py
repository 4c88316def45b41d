"""The Postmark adapter over real HTTP against the ESP simulator, and end to end through gRPC."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from adapters.base import AdapterError, Attachment, Mailbox, OutcomeKind
from adapters.postmark import PostmarkAdapter
from tests import adapter_kit as kit
from tests.adapter_kit import message
from tests.conftest import ServerHandle
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import mk

adapter = kit.adapter_fixture("postmark")
postmark_server = kit.server_fixture("postmark")


def records(sim: SimulatorHandle, status: int | None = None) -> list[dict[str, Any]]:
    return sim.requests(provider="postmark", status=status)


async def test_every_field_is_mapped(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """Addresses, bodies, headers, tags, metadata, stream and attachments reach Postmark."""
    email = kit.every_field()
    (outcome,) = await adapter.send([email])
    assert outcome.kind is OutcomeKind.SENT
    (record,) = records(esp_simulator, 200)
    assert record["message_id"] == outcome.esp_message_id
    assert record["recipients"] == 4
    (body,) = record["body"]
    assert body == {
        "From": '"Shop, Inc." <team@shop.example.com>',
        "To": "Jane Doe <jane@example.com>",
        "Cc": '"Ann \\"A\\" Lee" <cc@example.com>, cc2@example.com',
        "Bcc": "bcc@example.com",
        "ReplyTo": "Help Desk <reply@example.com>",
        "Subject": "Order 0 shipped",
        "HtmlBody": "<p>Order 0</p>",
        "TextBody": "Order 0",
        "MessageStream": "outbound",
        "Headers": [
            {"Name": "X-Campaign", "Value": "spring"},
            {"Name": "List-Unsubscribe", "Value": "<https://x.example/u>"},
        ],
        "Tag": "orders",
        "Metadata": {"order": "42", "swu_tags": "orders,shipped", "swu_message_id": "m-0"},
        "Attachments": [
            {"Name": "a.txt", "Content": "aGk=", "ContentType": "text/plain"},
            {
                "Name": "logo.png",
                "Content": "iVBORw==",
                "ContentType": "image/png",
                "ContentID": "cid:logo",
            },
        ],
    }
    headers = {name.lower(): value for name, value in record["headers"].items()}
    assert "x-postmark-server-token" not in headers
    assert headers["accept"] == "application/json"


async def test_message_stream_comes_from_options(esp_simulator: SimulatorHandle) -> None:
    """options.message_stream picks the stream; a non-string one is a config error."""
    acc = kit.account("postmark", esp_simulator.url, options={"message_stream": "broadcast"})
    async with kit.running(acc) as pm:
        (outcome,) = await pm.send([message()])
    assert outcome.kind is OutcomeKind.SENT
    assert records(esp_simulator)[0]["body"][0]["MessageStream"] == "broadcast"
    with pytest.raises(AdapterError, match="message_stream"):
        PostmarkAdapter(kit.account("postmark", esp_simulator.url, options={"message_stream": 3}))


async def test_1200_messages_go_in_three_batches(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """1200 messages make batches of 500, 500 and 200, each message with its own MessageID."""
    outcomes = await adapter.send([message(i) for i in range(1200)])
    assert {o.kind for o in outcomes} == {OutcomeKind.SENT}
    assert len({o.esp_message_id for o in outcomes}) == 1200
    calls = records(esp_simulator, 200)
    assert sorted(len(r["body"]) for r in calls) == [200, 500, 500]
    by_ours = {
        item["Metadata"]["swu_message_id"]: their_id
        for r in calls
        for item, their_id in zip(r["body"], r["message_id"].split(","), strict=True)
    }
    assert [by_ours[f"m-{i}"] for i in range(1200)] == [o.esp_message_id for o in outcomes]


async def test_one_refused_recipient_fails_alone(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """A batch item with ErrorCode 406 (inactive recipient) is rejected; the others are sent."""
    esp_simulator.add_rule(match_recipient="user1@example.com", action="400", provider="postmark")
    outcomes = await adapter.send([message(i) for i in range(3)])
    assert [o.kind for o in outcomes] == [OutcomeKind.SENT, OutcomeKind.REJECTED, OutcomeKind.SENT]
    assert outcomes[1].reason.startswith("Postmark ErrorCode 406: You tried to send to recipient")
    (record,) = records(esp_simulator, 200)
    assert len(record["body"]) == 3


async def test_invalid_message_fails_alone(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """Postmark's own validation (ErrorCode 300) refuses one item and sends the rest."""
    bad = message(1, to=Mailbox("not-an-address"))
    outcomes = await adapter.send([message(0), bad, message(2)])
    assert [o.kind for o in outcomes] == [OutcomeKind.SENT, OutcomeKind.REJECTED, OutcomeKind.SENT]
    assert outcomes[1].reason == "Postmark ErrorCode 300: Invalid 'To' address: 'not-an-address'."
    (record,) = records(esp_simulator, 200)
    assert len(record["message_id"].split(",")) == 2


async def test_bad_token_is_permanent(esp_simulator: SimulatorHandle) -> None:
    """A wrong server token is a 401 that rejects every message of the call."""
    async with kit.running(kit.account("postmark", esp_simulator.url, api_key="wrong")) as pm:
        outcomes = await pm.send([message(0), message(1)])
    assert {o.kind for o in outcomes} == {OutcomeKind.REJECTED}
    assert outcomes[0].reason.startswith("Postmark 401: ErrorCode 10: The Server Token")
    assert [r["status"] for r in records(esp_simulator)] == [401]


async def test_rate_limit_is_retried_without_a_wait_hint(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """A 429 is a rate-limited retry; Postmark sends no wait header, so retry_after is None."""
    esp_simulator.add_rule(action="429", provider="postmark", times=1)
    outcomes = await adapter.send([message(0), message(1)])
    assert {(o.kind, o.rate_limited, o.retry_after) for o in outcomes} == {
        (OutcomeKind.RETRY, True, None)
    }
    assert outcomes[0].reason == "Postmark 429: ErrorCode 429: " + (
        "Rate limit exceeded. Please slow down the rate of your requests and try again."
    )
    assert (await adapter.send([message(0)]))[0].kind is OutcomeKind.SENT


async def test_oversized_messages_are_refused_before_sending(
    esp_simulator: SimulatorHandle, adapter: PostmarkAdapter
) -> None:
    """Over 10 MB per message, over 5 MB of HTML or over 50 recipients never leave the adapter."""
    big = message(
        0, attachments=[Attachment("big.bin", "application/octet-stream", b"x" * 8_000_000)]
    )
    long_html = message(1, html="x" * (5 * 1024 * 1024 + 1))
    crowded = message(2, cc=[Mailbox(f"cc{i}@example.com") for i in range(50)])
    outcomes = await adapter.send([big, long_html, crowded, message(3)])
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECTED] * 3 + [OutcomeKind.SENT]
    assert "the limit is 10485760 per message" in outcomes[0].reason
    assert outcomes[1].reason == "Postmark: HtmlBody is over 5242880 bytes"
    assert "51 recipients; the limit is 50" in outcomes[2].reason
    (record,) = records(esp_simulator)
    assert [m["To"] for m in record["body"]] == ["user3@example.com"]


async def post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    """POST a JSON body to the simulator's /email/batch; returns status and parsed answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/email/batch", json=body, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_simulator_refuses_whole_requests(esp_simulator: SimulatorHandle) -> None:
    """The simulator answers Postmark's whole-request errors: 401, JSON required, batch size."""
    item = {"From": "a@shop.example.com", "To": "b@example.com", "TextBody": "hi"}
    token = {"X-Postmark-Server-Token": "SIM-KEY"}  # the token is not case-sensitive
    json_headers = token | {"Accept": "application/json"}
    status, answer = await post(esp_simulator.url, [item], {})
    assert (status, answer["ErrorCode"]) == (401, 10)
    assert answer["Message"].startswith("No Account or Server API tokens were supplied")
    status, answer = await post(esp_simulator.url, [item], token)
    assert (status, answer["ErrorCode"]) == (422, 409)
    status, answer = await post(esp_simulator.url, [item] * 501, json_headers)
    assert (status, answer["ErrorCode"]) == (422, 410)
    status, answer = await post(esp_simulator.url, [item], json_headers)
    assert status == 200 and answer[0]["ErrorCode"] == 0 and answer[0]["To"] == "b@example.com"


def test_end_to_end_through_postmark(postmark_server: ServerHandle) -> None:
    """Messages sent through the gRPC API end SENT with Postmark's MessageIDs."""
    done = kit.deliver(postmark_server, [mk(to=f"user{i}@example.com") for i in range(5)])
    theirs = {}
    for record in postmark_server.sim.requests(provider="postmark", status=200):
        for item, their_id in zip(record["body"], record["message_id"].split(","), strict=True):
            theirs[item["Metadata"]["swu_message_id"]] = their_id
    assert kit.final_states(done) == {mid: ("SENT", "pm", their) for mid, their in theirs.items()}
