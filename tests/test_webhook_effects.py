"""What webhook events do, end to end: history, state, dedupe, suppression, stream and stats.

The service runs for real; events are posted to its webhook endpoint the way Postmark posts
them (HTTP Basic credentials, one JSON record per request). Per-provider signatures and payload
shapes are tested in tests/test_webhook_<provider>.py.
"""

from __future__ import annotations

import base64
import itertools
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from tests.conftest import SIM_KEY_ENV, STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, data, mk

ET = delivery_pb2
HOOK_USER, HOOK_PASSWORD, HOOK_ENV = "hooks", "pm-hook-password", "SWU_TEST_PM_HOOK"
PM_ACCOUNT = f"""
[[esp]]
name = "pm"
kind = "postmark"
base_url = "http://127.0.0.1:9"
api_key_env = "{SIM_KEY_ENV}"
message_stream = "outbound"

[esp.webhook]
username = "{HOOK_USER}"
secret_env = "{HOOK_ENV}"
"""


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The service with a Postmark account "pm" whose webhook endpoint takes Basic auth."""
    swu_server.stop()
    write_config(swu_server.config, swu_server.data_dir, swu_server.sim.url, extra=PM_ACCOUNT)
    swu_server.env[HOOK_ENV] = HOOK_PASSWORD
    swu_server.start()
    swu_server.put_template("order", {"en": ORDER})
    return swu_server


def post(
    server: ServerHandle, record: dict[str, Any] | bytes, password: str = HOOK_PASSWORD
) -> tuple[int, dict[str, Any]]:
    body = record if isinstance(record, bytes) else orjson.dumps(record)
    credentials = base64.b64encode(f"{HOOK_USER}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{server.webhooks}/webhooks/pm",
        data=body,
        method="POST",
        headers={"Authorization": f"Basic {credentials}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, orjson.loads(exc.read() or b"{}")


def delivery(message_id: str, recipient: str, at: str = "2026-11-28T10:00:00Z") -> dict[str, Any]:
    return {
        "RecordType": "Delivery",
        "ServerID": 23,
        "MessageStream": "outbound",
        "MessageID": f"pm-{message_id}",
        "Recipient": recipient,
        "DeliveredAt": at,
        "Details": "smtp;250 2.0.0 OK",
        "Metadata": {"swu_message_id": message_id},
    }


def hard_bounce(message_id: str, recipient: str, bounce_id: int) -> dict[str, Any]:
    return {
        "RecordType": "Bounce",
        "ID": bounce_id,
        "Type": "HardBounce",
        "TypeCode": 1,
        "Name": "Hard bounce",
        "MessageID": f"pm-{message_id}",
        "ServerID": 23,
        "MessageStream": "outbound",
        "Description": "The server was unable to deliver your message (ex: unknown user).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist",
        "Email": recipient,
        "From": "orders@shop.example.com",
        "BouncedAt": "2026-11-28T10:00:00Z",
        "Inactive": True,
        "CanActivate": True,
        "Subject": "Order",
        "Metadata": {"swu_message_id": message_id},
    }


def send(server: ServerHandle, to: str, **fields: Any) -> str:
    response = server.delivery.SendBatch(
        delivery_pb2.SendBatchRequest(emails=[mk(to=to, payload=data(1), **fields)])
    )
    (result,) = response.results
    assert result.message_id, result.error
    return result.message_id


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_delivery_event_moves_a_sent_message_to_delivered(server: ServerHandle) -> None:
    """The event joins the history with the provider's fields; a redelivery is stored once."""
    message_id = send(server, "jane@example.com")
    server.wait_for_state([message_id], states=("SENT",))
    assert post(server, delivery(message_id, "jane@example.com")) == (
        200,
        {"stored": 1, "duplicates": 0, "skipped": 0},
    )
    assert post(server, delivery(message_id, "jane@example.com"))[1]["duplicates"] == 1
    message = server.get(message_id)
    assert STATE_NAMES[message.state] == "DELIVERED"
    (event,) = webhook_events(message)
    assert (event.type, event.esp, event.recipient, event.provider_type) == (
        ET.EVENT_TYPE_DELIVERED,
        "pm",
        "jane@example.com",
        "Delivery",
    )


def test_event_before_the_send_is_recorded_still_counts(server: ServerHandle) -> None:
    """A message still queued (send_at tomorrow) takes the event and shows it."""
    later = datetime.now(UTC) + timedelta(days=1)
    message_id = send(server, "early@example.com", send_at=_timestamp(later))
    assert STATE_NAMES[server.get(message_id).state] == "QUEUED"
    assert post(server, delivery(message_id, "early@example.com"))[0] == 200
    message = server.get(message_id)
    assert STATE_NAMES[message.state] == "DELIVERED"
    assert [e.type for e in webhook_events(message)] == [ET.EVENT_TYPE_DELIVERED]


def test_hard_bounce_suppresses_later_sends_to_that_address(server: ServerHandle) -> None:
    """After a hard bounce the next message to the address ends SUPPRESSED, unsent; others go."""
    first = send(server, "Gone@Example.com")
    server.wait_for_state([first], states=("SENT",))
    assert post(server, hard_bounce(first, "gone@example.com", 777))[0] == 200
    bounced = server.get(first)
    assert STATE_NAMES[bounced.state] == "BOUNCED"
    (event,) = webhook_events(bounced)
    assert (event.bounce, event.provider_event_id) == (ET.BOUNCE_TYPE_HARD, "777")
    server.sim.reset()
    again, other = send(server, "gone@EXAMPLE.com"), send(server, "still@example.com")
    done = server.wait_for_state([again, other], states=("SENT", "SUPPRESSED"))
    assert STATE_NAMES[done[again].state] == "SUPPRESSED"
    assert done[again].reason.startswith("recipient suppressed: hard_bounce (event ")
    assert STATE_NAMES[done[other].state] == "SENT"
    sent_to = [r["body"]["personalizations"][0]["to"][0]["email"] for r in server.sim.requests()]
    assert sent_to == ["still@example.com"]


def test_refused_requests_store_nothing(server: ServerHandle) -> None:
    """Wrong credentials 401, an unknown account 404, an oversized body 413: nothing stored."""
    message_id = send(server, "jane@example.com")
    server.wait_for_state([message_id], states=("SENT",))
    assert post(server, delivery(message_id, "jane@example.com"), password="guess")[0] == 401
    assert post(server, b"x" * (5 * 1024 * 1024 + 1))[0] == 413
    request = urllib.request.Request(f"{server.webhooks}/webhooks/sg", data=b"[]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    err.value.close()
    assert err.value.code == 404
    message = server.get(message_id)
    assert webhook_events(message) == [] and STATE_NAMES[message.state] == "SENT"
    assert "pm-hook-password" not in "".join(server.log)


def test_webhook_events_stream_and_count(server: ServerHandle) -> None:
    """WatchEvents carries webhook events with their template; stats count them per version."""
    ids = [send(server, f"u{i}@example.com") for i in range(3)]
    server.wait_for_state(ids, states=("SENT",))
    stream = server.delivery.WatchEvents(
        delivery_pb2.WatchEventsRequest(types=[ET.EVENT_TYPE_DELIVERED]), timeout=60
    )
    dict(stream.initial_metadata())  # live from here
    for i, message_id in enumerate(ids[:2]):
        assert post(server, delivery(message_id, f"u{i}@example.com"))[0] == 200
    seen = list(itertools.islice(stream, 2))
    stream.cancel()
    assert [(e.message_id, e.template_id, e.event.esp) for e in seen] == [
        (ids[0], "order", "pm"),
        (ids[1], "order", "pm"),
    ]
    stats = server.delivery.GetTemplateStats(
        delivery_pb2.GetTemplateStatsRequest(template_id="order")
    )
    (version,) = stats.versions
    assert (version.sent, version.delivered, version.bounced) == (3, 2, 0)


def _timestamp(when: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime(when)
    return ts
