"""Sending: batches, per-item validation, idempotency, retries and outcomes, end to end."""

from __future__ import annotations

from collections import Counter

import grpc
import orjson
import pytest

from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from tests.conftest import STATE_NAMES, ServerHandle
from tests.helpers import ORDER, data, mk, sent_ids

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The server with the `order` template (en) in place."""
    swu_server.put_template("order", {"en": ORDER})
    return swu_server


def batch(server: ServerHandle, emails: list[delivery_pb2.Email]) -> list[delivery_pb2.SendResult]:
    return list(server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails)).results)


def test_batch_of_1000_delivered_personalized(server: ServerHandle) -> None:
    """1000 items are accepted, each delivered once with its own rendered content."""
    emails = [mk(to=f"user{i}@example.com", payload=data(i)) for i in range(1000)]
    results = batch(server, emails)
    assert [r.index for r in results] == list(range(1000))
    ids = [r.message_id for r in results]
    assert all(ids) and len(set(ids)) == 1000
    done = server.wait_for_state(ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    records = server.sim.requests(provider="sendgrid", status=202)
    by_id = {}
    for rec in records:
        (pers,) = rec["body"]["personalizations"]
        by_id[pers["custom_args"]["swu_message_id"]] = rec
    assert set(by_id) == set(ids)
    for i, mid in enumerate(ids):
        body = by_id[mid]["body"]
        assert body["personalizations"][0]["to"] == [{"email": f"user{i}@example.com"}]
        assert body["subject"] == f"Order {1000 + i} shipped, User{i}"
        assert body["from"] == {"email": "orders@shop.example.com", "name": "Shop"}
        text, html = body["content"]
        assert text["type"] == "text/plain" and f"item{i}-2 x2" in text["value"]
        assert html["type"] == "text/html" and f"<li>item{i}-1 x1</li>" in html["value"]
        assert done[mid].esp == "sg" and done[mid].esp_message_id == by_id[mid]["message_id"]


def test_every_field_reaches_the_esp(server: ServerHandle) -> None:
    """cc, bcc, reply-to, sender override, headers, tags, metadata and attachments are mapped."""
    email = mk(
        to="to@example.com",
        cc=[common_pb2.Address(email="cc@example.com", name="C C")],
        bcc=[common_pb2.Address(email="bcc@example.com")],
        reply_to=common_pb2.Address(email="reply@example.com"),
        sender=common_pb2.Address(email="team@shop.example.com", name="Team"),
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"},
        tags=["orders", "shipped"],
        metadata={"order": "42"},
        attachments=[
            delivery_pb2.Attachment(filename="a.txt", content_type="text/plain", content=b"hi"),
            delivery_pb2.Attachment(
                filename="logo.png", content_type="image/png", content=b"\x89PNG", content_id="logo"
            ),
        ],
    )
    mid = server.delivery.Send(delivery_pb2.SendRequest(email=email)).message_id
    server.wait_for_state([mid])
    (rec,) = server.sim.requests(provider="sendgrid", status=202)
    body = rec["body"]
    pers = body["personalizations"][0]
    assert pers["cc"] == [{"email": "cc@example.com", "name": "C C"}]
    assert pers["bcc"] == [{"email": "bcc@example.com"}]
    assert pers["custom_args"] == {"order": "42", "swu_message_id": mid}
    assert body["reply_to"] == {"email": "reply@example.com"}
    assert body["from"] == {"email": "team@shop.example.com", "name": "Team"}
    assert body["headers"] == {"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"}
    assert body["categories"] == ["orders", "shipped"]
    a, b = body["attachments"]
    assert (a["filename"], a["content"], a["disposition"]) == ("a.txt", "aGk=", "attachment")
    assert (b["disposition"], b["content_id"]) == ("inline", "logo")
    assert "Authorization" not in rec["headers"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"to": common_pb2.Address(email="not-an-address")}, "to.email"),
        ({"to": common_pb2.Address(email="a@example.com, b@example.com")}, "to.email"),
        ({"to": common_pb2.Address(email="a@example.com", name="Eve\r\nBcc: x@y.com")}, "to.name"),
        (
            {"cc": [common_pb2.Address(email="ok@example.com"), common_pb2.Address(email="@x")]},
            "cc[1].email",
        ),
        ({"headers": {"X-Ok": "a\nInjected: b"}}, 'headers["X-Ok"]'),
        ({"headers": {"Content-Type": "text/plain"}}, 'headers["Content-Type"]'),
        ({"headers": {"Bad Name": "v"}}, 'headers["Bad Name"]'),
        ({"data_json": "[1, 2]"}, "data_json"),
        ({"data_json": "{not json"}, "data_json"),
        ({"data_json": orjson.dumps({"x": "a" * 140_000}).decode()}, "data_json"),
        ({"template_id": ""}, "template_id"),
        ({"locale": "not a locale"}, "locale"),
        (
            {
                "attachments": [
                    delivery_pb2.Attachment(
                        filename="a\r\n.txt", content_type="text/plain", content=b"x"
                    )
                ]
            },
            "attachments[0].filename",
        ),
    ],
)
def test_invalid_item_rejected_alone(
    server: ServerHandle, change: dict[str, object], field: str
) -> None:
    """One bad item is INVALID_ARGUMENT naming its field; its neighbours are accepted."""
    bad = mk()
    for key, value in change.items():
        if isinstance(value, list):
            getattr(bad, key).extend(value)
        elif isinstance(value, dict):
            getattr(bad, key).update(value)
        elif isinstance(value, common_pb2.Address):
            getattr(bad, key).CopyFrom(value)
        else:
            setattr(bad, key, value)
    results = batch(server, [mk(to="a@example.com"), bad, mk(to="c@example.com")])
    assert results[0].message_id and results[2].message_id
    assert not results[1].message_id
    assert results[1].error.code == INVALID
    assert results[1].error.field == field
    assert results[1].error.message.startswith(f"emails[1].{field}")
    with pytest.raises(grpc.RpcError) as err:
        server.delivery.Send(delivery_pb2.SendRequest(email=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"email.{field}" in (err.value.details() or "")
    server.wait_for_state([results[0].message_id, results[2].message_id])


def test_unknown_template_and_version_are_not_found(server: ServerHandle) -> None:
    """Unknown templates and versions are per-item NOT_FOUND."""
    results = batch(server, [mk("nope"), mk(template_version=7), mk()])
    code = grpc.StatusCode.NOT_FOUND.value[0]
    assert (results[0].error.code, results[0].error.field) == (code, "template_id")
    assert (results[1].error.code, results[1].error.field) == (code, "template_version")
    assert results[2].message_id


def test_batch_size_limits(server: ServerHandle) -> None:
    """An empty batch or one over 1000 items is refused as a whole."""
    for n in (0, 1001):
        with pytest.raises(grpc.RpcError) as err:
            batch(server, [mk()] * n)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "emails" in (err.value.details() or "")


def test_idempotency(server: ServerHandle) -> None:
    """A repeated key returns the first id and sends once; other content with it is refused."""
    first = batch(server, [mk(idempotency_key="k1"), mk(idempotency_key="k1")])
    assert first[1].message_id == first[0].message_id and first[1].duplicate
    again = server.delivery.Send(delivery_pb2.SendRequest(email=mk(idempotency_key="k1")))
    assert again.message_id == first[0].message_id and again.duplicate
    other = batch(server, [mk(to="else@example.com", idempotency_key="k1")])
    assert other[0].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert other[0].error.field == "idempotency_key"
    server.wait_for_state([first[0].message_id])
    assert sent_ids(server.sim.requests(provider="sendgrid", status=202)) == [first[0].message_id]


def test_send_stream_results_in_order(server: ServerHandle) -> None:
    """SendStream answers each chunk with per-item results indexed across the stream."""
    chunks = [
        delivery_pb2.SendStreamRequest(emails=[mk(to=f"s{c}-{i}@example.com") for i in range(50)])
        for c in range(4)
    ]
    chunks[2].emails[7].to.email = "broken"
    responses = list(server.delivery.SendStream(iter(chunks)))
    results = [r for resp in responses for r in resp.results]
    assert [r.index for r in results] == list(range(200))
    assert results[107].error.field == "to.email"
    ids = [r.message_id for r in results if r.message_id]
    assert len(ids) == 199
    server.wait_for_state(ids)


def test_get_message_history_and_not_found(server: ServerHandle) -> None:
    """GetMessage shows queued then sent, with the ESP id; unknown ids are NOT_FOUND."""
    mid = server.delivery.Send(delivery_pb2.SendRequest(email=mk())).message_id
    msg = server.wait_for_state([mid])[mid]
    assert [delivery_pb2.EventType.Name(e.type) for e in msg.events] == [
        "EVENT_TYPE_QUEUED",
        "EVENT_TYPE_SENT",
    ]
    assert msg.template_id == "order" and msg.template_version == 1 and msg.attempts == 1
    assert msg.to == "jane@example.com" and msg.esp_message_id
    with pytest.raises(grpc.RpcError) as err:
        server.get("does-not-exist")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_version_pinned_at_accept(server: ServerHandle) -> None:
    """A template edit after accept does not change an accepted message."""
    server.sim.set_faults(latency_ms=300)
    mid = server.delivery.Send(delivery_pb2.SendRequest(email=mk())).message_id
    from swu_delivery._proto.swu.delivery.v1 import template_pb2

    server.templates.UpdateTemplate(
        template_pb2.UpdateTemplateRequest(
            template_id="order",
            contents=[template_pb2.LocaleContent(locale="en", subject="CHANGED", text="x")],
        )
    )
    msg = server.wait_for_state([mid])[mid]
    assert msg.template_version == 1
    (rec,) = server.sim.requests(provider="sendgrid", status=202)
    assert rec["body"]["subject"].startswith("Order 1000")


def test_transient_failures_are_retried(server: ServerHandle) -> None:
    """429, 500 and a dropped connection are retried until the ESP accepts."""
    server.sim.add_rule(match_recipient="flaky@example.com", action="429", times=1)
    server.sim.add_rule(match_recipient="flaky@example.com", action="500", times=1)
    server.sim.add_rule(match_recipient="flaky@example.com", action="drop", times=1)
    mid = server.delivery.Send(
        delivery_pb2.SendRequest(email=mk(to="flaky@example.com"))
    ).message_id
    msg = server.wait_for_state([mid])[mid]
    assert STATE_NAMES[msg.state] == "SENT"
    assert msg.attempts == 3  # the 429 did not count (docs/delivery.md#attempts)
    kinds = Counter(delivery_pb2.EventType.Name(e.type) for e in msg.events)
    assert kinds == {"EVENT_TYPE_QUEUED": 1, "EVENT_TYPE_DEFERRED": 3, "EVENT_TYPE_SENT": 1}


def test_permanent_rejection_and_exhausted_retries_fail(server: ServerHandle) -> None:
    """A 400 fails at once with SendGrid's reason; endless 503s fail after max_attempts."""
    server.sim.add_rule(match_recipient="bad@example.com", action="400")
    server.sim.add_rule(match_recipient="down@example.com", action="503")
    ok, bad, down = batch(
        server, [mk(to="ok@example.com"), mk(to="bad@example.com"), mk(to="down@example.com")]
    )
    done = server.wait_for_state([ok.message_id, bad.message_id, down.message_id])
    assert STATE_NAMES[done[ok.message_id].state] == "SENT"
    rejected = done[bad.message_id]
    assert STATE_NAMES[rejected.state] == "FAILED" and rejected.attempts == 1
    assert rejected.reason.startswith("SendGrid 400")
    exhausted = done[down.message_id]
    assert STATE_NAMES[exhausted.state] == "FAILED" and exhausted.attempts == 4
    assert exhausted.reason.startswith("retries exhausted after 4 attempts: SendGrid 503")


def test_render_error_fails_that_message_only(server: ServerHandle) -> None:
    """A message whose render raises ends FAILED with the reason; the rest are sent."""
    from swu_delivery._proto.swu.delivery.v1 import template_pb2

    server.templates.CreateTemplate(
        template_pb2.CreateTemplateRequest(
            template_id="div",
            contents=[template_pb2.LocaleContent(locale="en", subject="s", text="{{ 10 / n }}")],
        )
    )
    good, bad = batch(server, [mk("div", payload={"n": 2}), mk("div", payload={"n": 0})])
    done = server.wait_for_state([good.message_id, bad.message_id])
    assert STATE_NAMES[done[good.message_id].state] == "SENT"
    failed = done[bad.message_id]
    assert STATE_NAMES[failed.state] == "FAILED"
    assert failed.reason.startswith("render error")


def test_validate_render_rejects_at_accept(server: ServerHandle) -> None:
    """With validate_render, a render error rejects the item at accept time."""
    from swu_delivery._proto.swu.delivery.v1 import template_pb2

    server.templates.CreateTemplate(
        template_pb2.CreateTemplateRequest(
            template_id="div",
            contents=[template_pb2.LocaleContent(locale="en", subject="s", text="{{ 10 / n }}")],
        )
    )
    ok, bad = batch(
        server,
        [
            mk("div", payload={"n": 2}, validate_render=True),
            mk("div", payload={"n": 0}, validate_render=True),
        ],
    )
    assert ok.message_id
    assert bad.error.code == INVALID and bad.error.field == "data_json"


def test_subject_injection_from_data_fails(server: ServerHandle) -> None:
    """Data that would put a line break into the rendered subject fails the message."""
    from swu_delivery._proto.swu.delivery.v1 import template_pb2

    server.templates.CreateTemplate(
        template_pb2.CreateTemplateRequest(
            template_id="subj",
            contents=[template_pb2.LocaleContent(locale="en", subject="Hi {{ n }}", text="x")],
        )
    )
    mid = server.delivery.Send(
        delivery_pb2.SendRequest(email=mk("subj", payload={"n": "x\r\nBcc: evil@example.com"}))
    ).message_id
    msg = server.wait_for_state([mid])[mid]
    assert STATE_NAMES[msg.state] == "FAILED" and "subject" in msg.reason
    assert server.sim.requests(provider="sendgrid", status=202) == []
