"""Reads of a message's recorded state and history, for GetMessage."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.db import Database
from swu_delivery.errors import NotFound
from swu_delivery.events import EVENT_COLUMNS, event_from_row

__all__ = ["Ledger", "derived_state"]

ET = delivery_pb2
ST = delivery_pb2


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _get(conn: sqlite3.Connection, message_id: str) -> delivery_pb2.Message | None:
    row = conn.execute(
        "SELECT id, state, template_id, template_version, locale, recipient, esp, esp_message_id,"
        " attempts, reason, created_at, updated_at, idempotency_key, lease_until"
        " FROM messages WHERE id = ?",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    attempts = row[8]
    if row[1] == delivery_pb2.MESSAGE_STATE_QUEUED and row[13] > 0:
        attempts -= 1  # the attempt under way is counted when it ends
    message = delivery_pb2.Message(
        message_id=row[0],
        state=row[1],
        template_id=row[2],
        template_version=row[3],
        locale=row[4],
        to=row[5],
        esp=row[6],
        esp_message_id=row[7],
        attempts=attempts,
        reason=row[9],
        created_at=_ts(row[10]),
        updated_at=_ts(row[11]),
        idempotency_key=row[12] or "",
    )
    # The queued event is implied by the row itself; storing it would double intake writes.
    message.events.append(
        delivery_pb2.MessageEvent(time=_ts(row[10]), type=delivery_pb2.EVENT_TYPE_QUEUED)
    )
    for event_row in conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE message_id = ? ORDER BY seq", (message_id,)
    ):
        message.events.append(event_from_row(event_row))
    message.state = delivery_pb2.MessageState.ValueType(
        derived_state(message.state, message.events)
    )
    return message


# What ESP events make of a sent message, by rank: a later event of a lower rank (an open
# after a complaint, a delayed "delivered" after a bounce) does not undo a higher one.
_EVENT_STATES = {
    ET.EVENT_TYPE_SENT: (1, ST.MESSAGE_STATE_SENT),
    ET.EVENT_TYPE_DELIVERED: (2, ST.MESSAGE_STATE_DELIVERED),
    ET.EVENT_TYPE_OPENED: (2, ST.MESSAGE_STATE_DELIVERED),
    ET.EVENT_TYPE_CLICKED: (2, ST.MESSAGE_STATE_DELIVERED),
    ET.EVENT_TYPE_UNSUBSCRIBED: (2, ST.MESSAGE_STATE_DELIVERED),
    ET.EVENT_TYPE_REJECTED: (3, ST.MESSAGE_STATE_FAILED),
    ET.EVENT_TYPE_FAILED: (3, ST.MESSAGE_STATE_FAILED),
    ET.EVENT_TYPE_COMPLAINED: (4, ST.MESSAGE_STATE_COMPLAINED),
}


def derived_state(recorded: int, events: Iterable[delivery_pb2.MessageEvent]) -> int:
    """The state a reader sees: the lane's own record, refined by what the ESP reported.

    Webhook events can arrive before the lane records the send; they count all the same, and
    they outrank a failure the lane recorded (an ESP call that timed out may have been sent).
    A hard bounce makes the message BOUNCED; a soft bounce does not change it.
    """
    if recorded == ST.MESSAGE_STATE_SUPPRESSED:
        return recorded  # never handed to an ESP
    rank, state = 0, recorded
    for event in events:
        if not event.provider_event_id and event.type != ET.EVENT_TYPE_SENT:
            continue  # the lane's own DEFERRED/FAILED are already in `recorded`
        if event.type == ET.EVENT_TYPE_BOUNCED:
            found = (3, ST.MESSAGE_STATE_BOUNCED) if event.bounce == ET.BOUNCE_TYPE_HARD else None
        else:
            found = _EVENT_STATES.get(event.type)
        if found is not None and found[0] > rank:
            rank, state = found
    return state


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, message_id: str) -> delivery_pb2.Message:
        message = await self.db.run(_get, message_id)
        if message is None:
            raise NotFound(f"no message {message_id!r}", field="message_id")
        return message
