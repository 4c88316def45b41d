"""WatchEvents and GetTemplateStats through the real server, on the delivery lane's own events.

ESP webhook events (and what they do to state and suppression) are tested per provider in
tests/test_webhook_*.py and end to end in tests/test_webhook_effects.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc
import orjson
import pytest

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2, template_pb2
from tests.conftest import ServerHandle
from tests.helpers import ORDER, data, mk
from tests.test_client_cli import swu

ET = delivery_pb2
STREAM_DEADLINE = 60.0  # generous: only a hang reaches it


def _send(server: ServerHandle, template_id: str, count: int, start: int = 0) -> list[str]:
    emails = [mk(template_id, to=f"u{i}@example.com", payload=data(i)) for i in range(count)]
    for i, email in enumerate(emails):
        email.to.email = f"u{start + i}@example.com"
    response = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
    ids = [r.message_id for r in response.results]
    assert all(ids)
    return ids


def _watch(server: ServerHandle, **request: object) -> Iterator[delivery_pb2.WatchEventsResponse]:
    return server.delivery.WatchEvents(
        delivery_pb2.WatchEventsRequest(**request), timeout=STREAM_DEADLINE
    )


def test_watch_from_the_start_then_resume_from_a_cursor(swu_server: ServerHandle) -> None:
    """Cursor "0" replays every recorded event in order; a cursor resumes right after itself."""
    swu_server.put_template("order", {"en": ORDER})
    first = _send(swu_server, "order", 3)
    swu_server.wait_for_state(first, states=("SENT",))
    stream = _watch(swu_server, cursor="0")
    seen = list(itertools.islice(stream, 3))
    stream.cancel()
    assert sorted(e.message_id for e in seen) == sorted(first)
    assert {(e.event.type, e.template_id, e.template_version) for e in seen} == {
        (ET.EVENT_TYPE_SENT, "order", 1)
    }
    assert all(e.event.esp == "sg" and e.event.detail for e in seen)  # the ESP's message id
    cursors = [int(e.cursor) for e in seen]
    assert cursors == sorted(cursors)

    later = _send(swu_server, "order", 2, start=10)
    swu_server.wait_for_state(later, states=("SENT",))
    stream = _watch(swu_server, cursor=seen[-1].cursor)
    resumed = list(itertools.islice(stream, 2))
    stream.cancel()
    assert sorted(e.message_id for e in resumed) == sorted(later)


def test_live_stream_with_filters(swu_server: ServerHandle) -> None:
    """With no cursor the stream starts now; template and type filters hold."""
    swu_server.put_template("order", {"en": ORDER})
    swu_server.put_template("other", {"en": ORDER})
    before = _send(swu_server, "order", 2)
    swu_server.wait_for_state(before, states=("SENT",))
    stream = _watch(swu_server, template_ids=["order"], types=[ET.EVENT_TYPE_SENT])
    start = dict(stream.initial_metadata())["swu-cursor"]  # the stream is live from here
    assert int(start) >= 2  # the SENT events of `before` are behind it
    _send(swu_server, "other", 2, start=20)  # filtered out by template
    wanted = _send(swu_server, "order", 2, start=30)
    live = list(itertools.islice(stream, 2))
    stream.cancel()
    assert sorted(e.message_id for e in live) == sorted(wanted)  # nothing from before the call


def test_watch_rejects_a_bad_cursor(swu_server: ServerHandle) -> None:
    with pytest.raises(grpc.RpcError) as err:
        next(iter(_watch(swu_server, cursor="abc")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cursor" in (err.value.details() or "")


def test_template_stats_per_version(swu_server: ServerHandle) -> None:
    """Sent counts per pinned version; an unknown template is NOT_FOUND."""
    swu_server.put_template("order", {"en": ORDER})
    v1 = _send(swu_server, "order", 3)
    swu_server.templates.UpdateTemplate(
        template_pb2.UpdateTemplateRequest(
            template_id="order",
            contents=[template_pb2.LocaleContent(locale="en", subject="v2", text="two")],
        )
    )
    v2 = _send(swu_server, "order", 2, start=5)
    swu_server.wait_for_state(v1 + v2, states=("SENT",))
    stats = swu_server.delivery.GetTemplateStats(
        delivery_pb2.GetTemplateStatsRequest(template_id="order")
    )
    assert [(v.template_version, v.sent, v.delivered, v.failed) for v in stats.versions] == [
        (1, 3, 0, 0),
        (2, 2, 0, 0),
    ]
    with pytest.raises(grpc.RpcError) as err:
        swu_server.delivery.GetTemplateStats(
            delivery_pb2.GetTemplateStatsRequest(template_id="nope")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_events_and_stats(swu_server: ServerHandle) -> None:
    """`swu-delivery events --cursor 0 --limit N` prints JSON lines; `stats` prints the counts."""
    swu_server.put_template("order", {"en": ORDER})
    ids = _send(swu_server, "order", 2)
    swu_server.wait_for_state(ids, states=("SENT",))
    target = ("--target", swu_server.target)
    events = swu("events", "--cursor", "0", "--type", "sent", "--limit", "2", *target)
    assert events.returncode == 0, events.stderr
    lines = [orjson.loads(line) for line in events.stdout.splitlines()]
    assert sorted(line["message_id"] for line in lines) == sorted(ids)
    assert {line["event"]["type"] for line in lines} == {"SENT"}
    stats = swu("stats", "order", *target)
    assert stats.returncode == 0, stats.stderr
    counts = {"delivered", "bounced", "opened", "clicked", "complained", "unsubscribed", "failed"}
    # uint64 is a string in proto3 JSON
    assert orjson.loads(stats.stdout)["versions"] == [
        {"template_version": 1, "sent": "2", **dict.fromkeys(counts, "0")}
    ]
