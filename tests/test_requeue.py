"""The Requeue RPC end to end: failed and suppressed messages queued again, by id and by filter."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2, suppression_pb2, suppression_pb2_grpc
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, mk, sent_ids
from tests.test_client_cli import out_json, swu
from tests.test_webhook_effects import HOOK_ENV, HOOK_PASSWORD, PM_ACCOUNT, delivery, post

ET = delivery_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The server with the `order` and `other` templates (en) in place."""
    swu_server.put_template("order", {"en": ORDER})
    swu_server.put_template("other", {"en": ORDER})
    return swu_server


def send(server: ServerHandle, to: str, template_id: str = "order") -> str:
    request = delivery_pb2.SendRequest(email=mk(template_id=template_id, to=to))
    return str(server.delivery.Send(request).message_id)


def fail_permanently(
    server: ServerHandle, *recipients: str, template_id: str = "order"
) -> list[str]:
    """Messages to `recipients` that the simulator refuses with a 400, recorded FAILED."""
    for recipient in recipients:
        server.sim.add_rule(match_recipient=recipient, action="400")
    ids = [send(server, r, template_id) for r in recipients]
    done = server.wait_for_state(ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"FAILED"}
    return ids


def requeue(server: ServerHandle, **fields: Any) -> delivery_pb2.RequeueResponse:
    response: delivery_pb2.RequeueResponse = server.delivery.Requeue(
        delivery_pb2.RequeueRequest(**fields)
    )
    return response


def by_filter(server: ServerHandle, limit: int = 0, **fields: Any) -> int:
    return requeue(server, filter=delivery_pb2.RequeueFilter(**fields), limit=limit).requeued


def test_requeue_by_id_delivers_after_the_fault_is_cleared(server: ServerHandle) -> None:
    """A permanently rejected message is queued again, due now, attempts reset, then sent."""
    (bad,) = fail_permanently(server, "bad@example.com")
    ok = send(server, "ok@example.com")
    server.wait_for_state([ok])
    server.sim.reset()  # the ESP accepts the address now
    response = requeue(server, message_ids=[bad, ok, "no-such-message"])
    assert response.requeued == 1
    first, sent, unknown = response.results
    assert (first.index, first.message_id, first.requeued) == (0, bad, True)
    assert not first.HasField("error")
    assert not sent.requeued and sent.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert sent.error.message == "message_ids[1]: message is SENT, not FAILED or SUPPRESSED"
    assert not unknown.requeued and unknown.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert unknown.error.message.startswith("message_ids[2]: no message")
    message = server.wait_for_state([bad])[bad]
    assert STATE_NAMES[message.state] == "SENT" and message.attempts == 1
    history = [(ET.EventType.Name(e.type), e.detail) for e in message.events]
    assert [kind for kind, _ in history] == [
        "EVENT_TYPE_QUEUED",
        "EVENT_TYPE_FAILED",
        "EVENT_TYPE_QUEUED",
        "EVENT_TYPE_SENT",
    ]
    assert history[1][1].startswith("SendGrid 400") and history[2][1] == "requeued"
    assert sent_ids(server.sim.requests(status=202)) == [bad]


def test_requeue_by_filter_respects_template_time_and_limit(server: ServerHandle) -> None:
    """Only matching FAILED messages move, oldest first, at most `limit` per call."""
    a, b = fail_permanently(server, "a@example.com", "b@example.com")
    c, d = fail_permanently(server, "c@example.com", "d@example.com", template_id="other")
    server.sim.reset()
    assert by_filter(server, template_id="order") == 2
    done = server.wait_for_state([a, b])
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    # Whole seconds at or before both ended: "before" excludes them, "after" includes them.
    ended = Timestamp(seconds=min(server.get(m).updated_at.ToSeconds() for m in (c, d)))
    assert by_filter(server, esp="sg", failed_before=ended) == 0
    assert by_filter(server, esp="nowhere", template_id="other") == 0
    assert by_filter(server, 1, esp="sg", failed_after=ended) == 1
    assert [STATE_NAMES[server.get(m).state] for m in (c, d)].count("FAILED") == 1
    assert by_filter(server, template_id="other") == 1
    assert by_filter(server, template_id="other") == 0
    done = server.wait_for_state([c, d])
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert sorted(sent_ids(server.sim.requests(status=202))) == sorted([a, b, c, d])


def test_suppressed_message_is_suppressed_again_until_the_entry_is_removed(
    server: ServerHandle,
) -> None:
    """A requeued SUPPRESSED message is checked again: suppressed while listed, sent after."""
    suppressions = suppression_pb2_grpc.SuppressionServiceStub(server.channel)
    entry = suppression_pb2.SuppressionEntry(
        email="held@example.com", reason=suppression_pb2.SUPPRESSION_REASON_MANUAL
    )
    suppressions.AddSuppression(suppression_pb2.AddSuppressionRequest(entries=[entry]))
    mid = send(server, "held@example.com")
    assert STATE_NAMES[server.wait_for_state([mid], ("SUPPRESSED",))[mid].state] == "SUPPRESSED"
    assert by_filter(server, state=ET.MESSAGE_STATE_SUPPRESSED, template_id="order") == 1
    message = server.wait_for_state([mid], ("SUPPRESSED", "SENT"))[mid]
    assert STATE_NAMES[message.state] == "SUPPRESSED"
    assert [e.type for e in message.events].count(ET.EVENT_TYPE_SUPPRESSED) == 2
    suppressions.RemoveSuppression(
        suppression_pb2.RemoveSuppressionRequest(emails=["held@example.com"])
    )
    assert requeue(server, message_ids=[mid]).requeued == 1
    assert STATE_NAMES[server.wait_for_state([mid], ("SUPPRESSED", "SENT"))[mid].state] == "SENT"
    assert sent_ids(server.sim.requests(status=202)) == [mid]


def test_message_the_esp_reported_delivered_is_not_requeued(swu_server: ServerHandle) -> None:
    """A FAILED message with a webhook delivery event would be sent twice: it is refused."""
    swu_server.stop()
    write_config(swu_server.config, swu_server.data_dir, swu_server.sim.url, extra=PM_ACCOUNT)
    swu_server.env[HOOK_ENV] = HOOK_PASSWORD
    swu_server.start()
    swu_server.put_template("order", {"en": ORDER})
    (mid,) = fail_permanently(swu_server, "late@example.com")
    assert post(swu_server, delivery(mid, "late@example.com"))[0] == 200
    assert by_filter(swu_server, template_id="order") == 0
    (result,) = requeue(swu_server, message_ids=[mid]).results
    assert not result.requeued
    assert result.error.message.endswith("the ESP reported that it reached the recipient")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "message_ids"),
        ({"filter": delivery_pb2.RequeueFilter()}, "filter"),
        ({"filter": delivery_pb2.RequeueFilter(state=ET.MESSAGE_STATE_FAILED)}, "filter"),
        ({"message_ids": ["x"], "filter": delivery_pb2.RequeueFilter(esp="sg")}, "filter"),
        ({"message_ids": ["x", ""]}, "message_ids[1]"),
        ({"message_ids": ["x"], "limit": 5}, "limit"),
        ({"message_ids": [f"m{i}" for i in range(1001)]}, "message_ids"),
        (
            {"filter": delivery_pb2.RequeueFilter(esp="sg", state=ET.MESSAGE_STATE_SENT)},
            "filter.state",
        ),
        ({"filter": delivery_pb2.RequeueFilter(template_id="bad id!")}, "filter.template_id"),
        ({"filter": delivery_pb2.RequeueFilter(esp="sg"), "limit": 100_001}, "limit"),
        (
            {
                "filter": delivery_pb2.RequeueFilter(
                    failed_after=Timestamp(seconds=200), failed_before=Timestamp(seconds=100)
                )
            },
            "filter.failed_before",
        ),
        (
            {"filter": delivery_pb2.RequeueFilter(failed_after=Timestamp(seconds=1, nanos=-1))},
            "filter.failed_after",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    swu_server: ServerHandle, fields: dict[str, Any], field: str
) -> None:
    """Empty filters, mixed forms and bad fields are refused before anything moves."""
    with pytest.raises(grpc.RpcError) as err:
        requeue(swu_server, **fields)
    assert err.value.code() == INVALID
    assert err.value.details().startswith(f"{field}: ")


def test_requeue_cli_by_id_and_by_filter(server: ServerHandle) -> None:
    """`requeue ID...` prints a result per id; `requeue --template T` prints the count."""
    t = ("--target", server.target)
    first, second = fail_permanently(server, "one@example.com", "two@example.com")
    server.sim.reset()
    (result,) = out_json(swu("requeue", first, *t))
    assert result["message_id"] == first and result["requeued"] is True
    assert out_json(swu("requeue", "--template", "order", "--since", "2000-01-01", *t)) == {
        "requeued": 1
    }
    server.wait_for_state([first, second], ("SENT",))
    again = swu("requeue", second, *t)
    assert again.returncode == 1
    assert "not FAILED or SUPPRESSED" in again.stdout
    nothing = swu("requeue", *t)
    assert nothing.returncode == 2 and "requeue: give message ids" in nothing.stderr
