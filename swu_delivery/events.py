"""Recorded events: ESP webhook events in, live WatchEvents streams and template stats out.

Every event after acceptance lives in the `events` table: the delivery lane's SENT, DEFERRED,
FAILED and SUPPRESSED, and what providers report through webhooks. Webhook events are stored
deduplicated on (ESP account, provider event id) and attached to the message by our message id,
whether or not the lane has recorded the send yet; a message's state is derived from its events
when it is read (swu_delivery/ledger.py). Hard bounces and complaints put the recipient on the
suppression list in the same transaction. `EventHub` wakes WatchEvents streams when anything new
is recorded; the streams read the table, so a stream that resumes from a cursor misses nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.db import Database, transaction
from swu_delivery.errors import InvalidArgument, NotFound
from swu_delivery.webhooks.base import ProviderEvent

__all__ = ["EVENT_COLUMNS", "EventHub", "EventStore", "StoreResult", "event_from_row"]

ET = delivery_pb2
WATCH_PAGE = 500  # events read per query while a stream catches up
MAX_FILTER_VALUES = 100
# A complaint or a hard bounce stops every later send to the address.
SUPPRESS: dict[int, str] = {ET.EVENT_TYPE_COMPLAINED: "complaint"}
EVENT_COLUMNS = (
    "time, type, esp, detail, attempt, provider_event_id, provider_type, recipient, bounce,"
    " response, url, user_agent"
)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def event_from_row(row: Sequence[Any]) -> delivery_pb2.MessageEvent:
    """A MessageEvent from the EVENT_COLUMNS of one events row."""
    time_, type_, esp, detail, attempt, pid, ptype, rcpt, bounce, response, url, agent = row
    return delivery_pb2.MessageEvent(
        time=_ts(time_),
        type=type_,
        esp=esp,
        detail=detail,
        attempt=attempt,
        provider_event_id=pid or "",
        provider_type=ptype,
        recipient=rcpt,
        bounce=bounce,
        response=response,
        url=url,
        user_agent=agent,
    )


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    suppressed: int  # recipients newly added to the suppression list


class EventHub:
    """Wakes every waiting WatchEvents stream when events were recorded."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Take before reading: `wait(ticket)` then returns at once if anything came since."""
        return self._changed

    async def wait(self, ticket: asyncio.Event, poll: float) -> None:
        """Until something new was recorded after `ticket` was taken, or `poll` seconds."""
        with suppress(TimeoutError):
            await asyncio.wait_for(ticket.wait(), poll)


def _suppression_reason(event: ProviderEvent) -> str:
    if event.type == ET.EVENT_TYPE_BOUNCED and event.bounce == ET.BOUNCE_TYPE_HARD:
        return "hard_bounce"
    return SUPPRESS.get(event.type, "")


def _store(
    conn: sqlite3.Connection, esp: str, events: Sequence[ProviderEvent], now: float
) -> StoreResult:
    stored = suppressed = 0
    with transaction(conn):
        for e in events:
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (message_id, time, type, esp, detail,"
                " provider_event_id, provider_type, recipient, bounce, response, url, user_agent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    e.message_id,
                    e.time,
                    e.type,
                    esp,
                    e.reason,
                    e.provider_event_id,
                    e.provider_type,
                    e.recipient,
                    e.bounce,
                    e.response,
                    e.url,
                    e.user_agent,
                ),
            )
            if not cur.rowcount:
                continue  # a redelivery of an event already stored
            stored += 1
            reason = _suppression_reason(e)
            if reason and e.recipient:
                suppressed += conn.execute(
                    "INSERT OR IGNORE INTO suppressions (recipient, reason, esp, event_seq,"
                    " created_at) VALUES (?, ?, ?, ?, ?)",
                    (e.recipient.lower(), reason, esp, cur.lastrowid, now),
                ).rowcount
    return StoreResult(stored, len(events) - stored, suppressed)


def _watch_page(
    conn: sqlite3.Connection, after: int, request: delivery_pb2.WatchEventsRequest
) -> tuple[list[delivery_pb2.WatchEventsResponse], int]:
    """The next matching events after `after`, and the cursor to continue from.

    When the page is not full, every event up to the newest one was looked at, so the cursor
    moves there even if the filters matched none of them (this runs on the database thread,
    so no event can be added between the two statements).
    """
    where: list[str] = ["e.seq > ?"]
    args: list[Any] = [after]
    filters: tuple[tuple[str, list[Any]], ...] = (
        ("e.esp", list(request.esps)),
        ("m.template_id", list(request.template_ids)),
        ("e.type", [int(t) for t in request.types]),
    )
    for column, values in filters:
        if values:
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            args += values
    columns = ", ".join(f"e.{c.strip()}" for c in EVENT_COLUMNS.split(","))
    rows = conn.execute(
        f"SELECT e.seq, e.message_id, m.template_id, m.template_version, {columns}"
        " FROM events e LEFT JOIN messages m ON m.id = e.message_id"
        f" WHERE {' AND '.join(where)} ORDER BY e.seq LIMIT {WATCH_PAGE}",
        args,
    ).fetchall()
    page = [
        delivery_pb2.WatchEventsResponse(
            cursor=str(row[0]),
            message_id=row[1],
            template_id=row[2] or "",
            template_version=row[3] or 0,
            event=event_from_row(row[4:]),
        )
        for row in rows
    ]
    if len(rows) == WATCH_PAGE:
        return page, rows[-1][0]
    return page, max(after, _last_seq(conn))


def _last_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])


# Template stats count distinct messages per event type; SENT counts the lane's SENT events.
_STAT_FIELDS = {
    ET.EVENT_TYPE_SENT: "sent",
    ET.EVENT_TYPE_DELIVERED: "delivered",
    ET.EVENT_TYPE_BOUNCED: "bounced",
    ET.EVENT_TYPE_OPENED: "opened",
    ET.EVENT_TYPE_CLICKED: "clicked",
    ET.EVENT_TYPE_COMPLAINED: "complained",
    ET.EVENT_TYPE_UNSUBSCRIBED: "unsubscribed",
    ET.EVENT_TYPE_FAILED: "failed",
}


def _stats(conn: sqlite3.Connection, template_id: str) -> delivery_pb2.GetTemplateStatsResponse:
    known = conn.execute("SELECT 1 FROM templates WHERE template_id = ?", (template_id,)).fetchone()
    if known is None:
        raise NotFound(f"no template {template_id!r}", field="template_id")
    types = ", ".join(str(t) for t in _STAT_FIELDS)
    rows = conn.execute(
        "SELECT m.template_version, e.type, count(DISTINCT e.message_id)"
        " FROM messages m JOIN events e ON e.message_id = m.id"
        f" WHERE m.template_id = ? AND e.type IN ({types})"
        " GROUP BY m.template_version, e.type ORDER BY m.template_version",
        (template_id,),
    ).fetchall()
    versions: dict[int, delivery_pb2.TemplateVersionStats] = {}
    for version, type_, count in rows:
        stats = versions.setdefault(
            version, delivery_pb2.TemplateVersionStats(template_version=version)
        )
        setattr(stats, _STAT_FIELDS[type_], count)
    return delivery_pb2.GetTemplateStatsResponse(
        template_id=template_id, versions=[versions[v] for v in sorted(versions)]
    )


class EventStore:
    """Async facade over the events table for webhooks, WatchEvents and stats."""

    def __init__(self, db: Database, hub: EventHub, *, poll: float = 1.0) -> None:
        self.db = db
        self.hub = hub
        # WatchEvents reads the table at least this often: the hub only hears this process's
        # events, so with several workers the poll is how a stream sees its siblings'.
        self.poll = poll

    async def store(self, esp: str, events: Sequence[ProviderEvent]) -> StoreResult:
        if not events:
            return StoreResult(0, 0, 0)
        result = await self.db.run(_store, esp, events, time.time())
        if result.stored:
            self.hub.notify()
        return result

    async def template_stats(self, template_id: str) -> delivery_pb2.GetTemplateStatsResponse:
        return await self.db.run(_stats, template_id)

    async def start_cursor(self, request: delivery_pb2.WatchEventsRequest) -> int:
        """Where a stream for `request` starts: its cursor, or the newest event when empty."""
        for values, name in ((request.esps, "esps"), (request.template_ids, "template_ids")):
            if len(values) > MAX_FILTER_VALUES:
                raise InvalidArgument(f"at most {MAX_FILTER_VALUES} values", field=name)
        if request.cursor:
            try:
                after = int(request.cursor)
            except ValueError:
                raise InvalidArgument("not a cursor from WatchEvents", field="cursor") from None
            if after < 0:
                raise InvalidArgument("not a cursor from WatchEvents", field="cursor")
            return after
        return await self.db.run(_last_seq)

    async def watch(
        self, request: delivery_pb2.WatchEventsRequest, after: int, *, poll: float | None = None
    ) -> AsyncIterator[delivery_pb2.WatchEventsResponse]:
        """Events after `after`, then live ones, until the caller goes away."""
        while True:
            ticket = self.hub.ticket()
            page, after = await self.db.run(_watch_page, after, request)
            for item in page:
                yield item
            if len(page) < WATCH_PAGE:
                await self.hub.wait(ticket, self.poll if poll is None else poll)
