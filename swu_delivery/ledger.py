"""Reads of a message's recorded state and history, for GetMessage."""

from __future__ import annotations

import sqlite3

from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.db import Database
from swu_delivery.errors import NotFound

__all__ = ["Ledger"]


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
    for time_, type_, esp, detail, attempt in conn.execute(
        "SELECT time, type, esp, detail, attempt FROM events WHERE message_id = ? ORDER BY seq",
        (message_id,),
    ):
        message.events.append(
            delivery_pb2.MessageEvent(
                time=_ts(time_), type=type_, esp=esp, detail=detail, attempt=attempt
            )
        )
    return message


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, message_id: str) -> delivery_pb2.Message:
        message = await self.db.run(_get, message_id)
        if message is None:
            raise NotFound(f"no message {message_id!r}", field="message_id")
        return message
