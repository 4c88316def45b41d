"""The durable outbox: accept batches in one transaction, lease due messages, record outcomes.

A message row moves QUEUED → SENT or FAILED. A lane claims due rows by setting a lease; a lease
that outlives its holder (a crash) expires and the row is claimed again, so delivery is
at-least-once towards the ESP and nothing accepted is ever lost.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.db import Database, execute_rows, transaction
from swu_delivery.errors import FailedPrecondition, NotFound, SwuError

__all__ = ["Accepted", "Claimed", "Completion", "NewMessage", "Outbox", "RequeueFilter"]

QUEUED = delivery_pb2.MESSAGE_STATE_QUEUED
SENT = delivery_pb2.MESSAGE_STATE_SENT
FAILED = delivery_pb2.MESSAGE_STATE_FAILED
SUPPRESSED = delivery_pb2.MESSAGE_STATE_SUPPRESSED
# Stored priority (messages.priority); the fresh lane claims them in this order.
TRANSACTIONAL, BULK = 1, 2
PRIORITIES = (TRANSACTIONAL, BULK)


@dataclass(slots=True)
class NewMessage:
    id: str
    priority: int
    due_at: float
    template_id: str
    template_version: int
    locale: str
    recipient: str
    payload: bytes
    idempotency_key: str | None = None
    digest: bytes | None = None


@dataclass(slots=True)
class Accepted:
    """What intake did with one NewMessage."""

    message_id: str
    duplicate: bool = False  # the idempotency key matched: message_id is the original
    conflict: bool = False  # the key was used before with different content


@dataclass(slots=True)
class Claimed:
    id: str
    payload: bytes
    template_id: str
    template_version: int
    locale: str
    attempts: int  # including this one
    recipient: str  # the To address
    esp: str = ""  # the account of the previous attempt, if any
    maybe_sent: bool = False  # the previous attempt may have reached that account
    reason: str = ""  # why the previous attempt did not end the message


@dataclass(slots=True)
class Completion:
    """The result of one attempt, to record: a final state, or QUEUED again with a due time."""

    message_id: str
    state: int
    event: int
    attempt: int
    esp: str = ""
    esp_message_id: str = ""
    reason: str = ""
    due_at: float = 0.0
    # QUEUED again without counting the attempt: no call was made (the account's rate limit
    # had no room) or the provider only throttled us; neither says anything about the message.
    refund: bool = False
    maybe_sent: bool = False  # QUEUED again after a call that may have reached `esp`
    failover: str = ""  # set: this attempt moved the message to another account, and why


def _accept(
    conn: sqlite3.Connection, rows: Sequence[NewMessage], ttl: float, now: float
) -> list[Accepted]:
    results: list[Accepted] = []
    inserts: list[NewMessage] = []
    keyed = [r for r in rows if r.idempotency_key]
    with transaction(conn):
        known: dict[str, tuple[str, bytes]] = {}
        if keyed:
            keys = [r.idempotency_key for r in keyed]
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                cur = conn.execute(
                    f"SELECT key, message_id, digest FROM idempotency "
                    f"WHERE key IN ({marks}) AND created_at >= ?",
                    (*chunk, now - ttl),
                )
                known.update((k, (m, d)) for k, m, d in cur)
        new_keys: list[tuple[str, str, bytes, float]] = []
        for row in rows:
            key = row.idempotency_key
            if key:
                if key in known:
                    original, digest = known[key]
                    same = digest == row.digest
                    results.append(Accepted(original, duplicate=same, conflict=not same))
                    continue
                assert row.digest is not None
                known[key] = (row.id, row.digest)
                new_keys.append((key, row.id, row.digest, now))
            inserts.append(row)
            results.append(Accepted(row.id))
        # Explicit payload ids: this transaction holds the write lock, so none is taken meanwhile.
        (base,) = conn.execute("SELECT coalesce(max(id), 0) FROM payloads").fetchone()
        execute_rows(
            conn,
            "INSERT INTO payloads (id, payload)",
            [(base + n, r.payload) for n, r in enumerate(inserts, 1)],
        )
        execute_rows(
            conn,
            "INSERT INTO messages (id, state, priority, due_at, template_id, template_version,"
            " locale, recipient, payload_id, idempotency_key, created_at, updated_at)",
            [
                (
                    r.id,
                    QUEUED,
                    r.priority,
                    r.due_at,
                    r.template_id,
                    r.template_version,
                    r.locale,
                    r.recipient,
                    base + n,
                    r.idempotency_key,
                    now,
                    now,
                )
                for n, r in enumerate(inserts, 1)
            ],
        )
        remember = "INSERT OR REPLACE INTO idempotency (key, message_id, digest, created_at)"
        execute_rows(conn, remember, new_keys)
    return results


# The fresh lane is read one priority at a time: `priority = ?` with `due_at <= ?` is one range
# of index messages_fresh, where ORDER BY priority, due_at would walk every message that is not
# due yet (scheduled with send_at) before reaching the next priority's due ones.
_FRESH = (
    "SELECT id FROM messages WHERE state = 1 AND attempts = 0 AND priority = ? AND due_at <= ?"
    " AND lease_until <= ? ORDER BY due_at LIMIT ?"
)  # index messages_fresh
_RETRY = (
    "SELECT id FROM messages WHERE state = 1 AND attempts > 0 AND due_at <= ?"
    " AND lease_until <= ? ORDER BY due_at LIMIT ? OFFSET ?"
)  # index messages_retry


def _retries(conn: sqlite3.Connection, now: float, limit: int, skip: int) -> list[str]:
    if limit <= 0:
        return []
    return [row[0] for row in conn.execute(_RETRY, (now, now, limit, skip))]


def _fresh(conn: sqlite3.Connection, now: float, limit: int) -> list[str]:
    ids: list[str] = []
    for priority in PRIORITIES:
        if len(ids) >= limit:
            break
        rows = conn.execute(_FRESH, (priority, now, now, limit - len(ids)))
        ids += [row[0] for row in rows]
    return ids


def _claim(
    conn: sqlite3.Connection, limit: int, lease: float, now: float, retry_share: float
) -> list[Claimed]:
    """Lease up to `limit` due messages: fresh ones first by priority, retries in their lane.

    Retries get up to `retry_share` of the claim, fresh mail the rest, and each lane takes what
    the other leaves: a backlog of retries never starves fresh mail, nor the reverse.
    """
    # A claim also moves due_at to the lease's expiry: claimed rows then sort after every due
    # one in the lane indexes, so the next claim does not walk past them, and a claim left by a
    # crashed process becomes due again when its lease runs out.
    quota = math.ceil(limit * retry_share)
    with transaction(conn):
        retries = _retries(conn, now, quota, 0)
        fresh = _fresh(conn, now, limit - len(retries))
        if len(retries) == quota:  # fresh mail left room: more retries fill it
            retries += _retries(conn, now, limit - len(fresh) - quota, quota)
        ids = fresh + retries
        if not ids:
            return []
        cur = conn.execute(
            "UPDATE messages SET lease_until = ?1, due_at = ?1, attempts = attempts + 1,"
            " updated_at = ?2 WHERE id IN (SELECT value FROM json_each(?3))"
            " RETURNING id, (SELECT payload FROM payloads WHERE payloads.id = payload_id),"
            " template_id, template_version, locale, attempts, recipient,"
            " esp, maybe_sent, reason",
            (now + lease, now, orjson.dumps(ids).decode()),
        )
        by_id = {
            m: Claimed(m, payload, tid, version, locale, n, to, esp, bool(maybe), reason)
            for m, payload, tid, version, locale, n, to, esp, maybe, reason in cur.fetchall()
        }
        return [by_id[i] for i in ids]  # fresh by priority, then retries


def _record(conn: sqlite3.Connection, completions: Sequence[Completion], now: float) -> None:
    with transaction(conn):
        execute_rows(
            conn,
            "UPDATE messages SET state = v.column2, esp = v.column3, esp_message_id = v.column4,"
            " reason = v.column5, lease_until = 0, updated_at = v.column6 FROM (",
            [
                (c.message_id, c.state, c.esp, c.esp_message_id, c.reason, now)
                for c in completions
                if c.state != QUEUED
            ],
            ") AS v WHERE messages.id = v.column1",
        )
        execute_rows(
            conn,
            "UPDATE messages SET due_at = v.column2, reason = v.column3, esp = v.column4,"
            " maybe_sent = v.column5, lease_until = 0, updated_at = v.column6,"
            " attempts = max(attempts - v.column7, 0) FROM (",
            [
                (c.message_id, c.due_at, c.reason, c.esp, int(c.maybe_sent), now, int(c.refund))
                for c in completions
                if c.state == QUEUED
            ],
            ") AS v WHERE messages.id = v.column1",
        )
        execute_rows(
            conn,
            "INSERT INTO events (message_id, time, type, esp, detail, attempt)",
            [
                (c.message_id, now, _EV.EVENT_TYPE_QUEUED, c.esp, c.failover, c.attempt)
                for c in completions
                if c.failover
            ]
            + [
                (c.message_id, now, c.event, c.esp, c.esp_message_id or c.reason, c.attempt)
                for c in completions
            ],
        )


def _release(
    conn: sqlite3.Connection,
    ids: Sequence[str] | None,
    interrupted: Mapping[str, str],
    now: float,
) -> int:
    """Give claimed messages back, due now (all of them when ids is None).

    Released by id (a graceful stop) the attempt is not counted when no ESP call was made; a
    message in `interrupted` had its call cut mid-flight, so the attempt counts and the message
    stays with that account (maybe sent), as after a timeout.
    """
    with transaction(conn):
        if ids is None:
            cur = conn.execute(
                "UPDATE messages SET lease_until = 0, due_at = ?"
                " WHERE state = 1 AND lease_until > 0",
                (now,),
            )
            return cur.rowcount
        leased = ") AS v WHERE messages.id = v.column1 AND state = 1 AND lease_until > 0"
        execute_rows(
            conn,
            "UPDATE messages SET lease_until = 0, due_at = v.column2,"
            " attempts = max(attempts - 1, 0) FROM (",
            [(i, now) for i in ids if i not in interrupted],
            leased,
        )
        execute_rows(
            conn,
            "UPDATE messages SET lease_until = 0, due_at = v.column2, esp = v.column3,"
            " maybe_sent = 1, reason = 'call interrupted by shutdown; it may have reached the ESP'"
            " FROM (",
            [(i, now, esp) for i, esp in interrupted.items()],
            leased,
        )
        return len(ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequeueFilter:
    """Which finished messages a filtered Requeue puts back; times are when they ended."""

    state: int = FAILED  # FAILED or SUPPRESSED
    template_id: str = ""
    esp: str = ""
    ended_after: float | None = None  # inclusive
    ended_before: float | None = None  # exclusive


_EV = delivery_pb2
# Webhook events saying the message reached (or hard-bounced at) its recipient: after a timed
# out call the lane may record FAILED for a message the ESP sent, and a requeue would send it
# twice. (A webhook REJECTED or a soft bounce does not count: the message stays requeueable.)
_REACHED = (
    "EXISTS (SELECT 1 FROM events e WHERE e.message_id = m.id"
    " AND e.provider_event_id IS NOT NULL AND (e.type IN"
    f" ({_EV.EVENT_TYPE_DELIVERED}, {_EV.EVENT_TYPE_OPENED}, {_EV.EVENT_TYPE_CLICKED},"
    f" {_EV.EVENT_TYPE_UNSUBSCRIBED}, {_EV.EVENT_TYPE_COMPLAINED})"
    f" OR (e.type = {_EV.EVENT_TYPE_BOUNCED} AND e.bounce = {_EV.BOUNCE_TYPE_HARD})))"
)
REQUEUED_DETAIL = "requeued"


def _put_back(conn: sqlite3.Connection, ids: Sequence[str], now: float) -> None:
    """Queue finished messages again, due now, as if never attempted; their history says so."""
    conn.executemany(
        f"UPDATE messages SET state = {QUEUED}, due_at = ?, lease_until = 0, attempts = 0,"
        " esp = '', maybe_sent = 0, esp_message_id = '', reason = '', updated_at = ? WHERE id = ?",
        [(now, now, i) for i in ids],
    )
    conn.executemany(
        "INSERT INTO events (message_id, time, type, detail) VALUES (?, ?, ?, ?)",
        [(i, now, _EV.EVENT_TYPE_QUEUED, REQUEUED_DETAIL) for i in ids],
    )


def _requeue_ids(conn: sqlite3.Connection, ids: Sequence[str], now: float) -> list[SwuError | None]:
    """Per id: None when it was put back, else why not (NOT_FOUND or FAILED_PRECONDITION)."""
    out: list[SwuError | None] = []
    with transaction(conn):
        for message_id in ids:
            row = conn.execute(
                f"SELECT m.state, {_REACHED} FROM messages m WHERE m.id = ?", (message_id,)
            ).fetchone()
            if row is None:
                out.append(NotFound(f"no message {message_id!r}"))
            elif row[0] not in (FAILED, SUPPRESSED):
                name = delivery_pb2.MessageState.Name(row[0]).removeprefix("MESSAGE_STATE_")
                out.append(FailedPrecondition(f"message is {name}, not FAILED or SUPPRESSED"))
            elif row[1]:
                out.append(FailedPrecondition("the ESP reported that it reached the recipient"))
            else:
                _put_back(conn, [message_id], now)
                out.append(None)
    return out


def _requeue_matching(
    conn: sqlite3.Connection, wanted: RequeueFilter, limit: int, now: float
) -> int:
    where: list[str] = ["m.state = ?", f"NOT {_REACHED}"]
    args: list[int | float | str] = [wanted.state]
    for clause, value in (
        ("m.template_id = ?", wanted.template_id or None),
        ("m.esp = ?", wanted.esp or None),
        ("m.updated_at >= ?", wanted.ended_after),
        ("m.updated_at < ?", wanted.ended_before),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    with transaction(conn):
        ids = [
            row[0]
            for row in conn.execute(
                f"SELECT m.id FROM messages m WHERE {' AND '.join(where)}"
                " ORDER BY m.updated_at LIMIT ?",
                (*args, limit),
            )
        ]
        _put_back(conn, ids, now)
    return len(ids)


def _suppressed(conn: sqlite3.Connection, recipients: list[str]) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for start in range(0, len(recipients), 500):  # SQLite's bound-parameter limit
        chunk = recipients[start : start + 500]
        for address, reason, seq in conn.execute(
            "SELECT recipient, reason, event_seq FROM suppressions"
            f" WHERE recipient IN ({', '.join('?' * len(chunk))})",
            chunk,
        ):
            found[address] = (reason, seq)
    return found


def _prune_keys(conn: sqlite3.Connection, before: float) -> int:
    with transaction(conn):
        return conn.execute("DELETE FROM idempotency WHERE created_at < ?", (before,)).rowcount


def _depth(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM messages WHERE state = 1").fetchone()[0])


class Outbox:
    """Async facade over the outbox statements; every call is one transaction."""

    def __init__(
        self,
        db: Database,
        *,
        idempotency_ttl: float,
        on_record: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.idempotency_ttl = idempotency_ttl
        self.on_record = on_record  # told after outcomes were recorded (wakes WatchEvents)

    async def accept(self, rows: Sequence[NewMessage]) -> list[Accepted]:
        return await self.db.run(_accept, rows, self.idempotency_ttl, time.time())

    async def claim(self, limit: int, lease: float, retry_share: float = 0.25) -> list[Claimed]:
        return await self.db.run(_claim, limit, lease, time.time(), retry_share)

    async def record(self, completions: Sequence[Completion]) -> None:
        if completions:
            await self.db.run(_record, completions, time.time())
            if self.on_record is not None:
                self.on_record()

    async def suppressed(self, recipients: Iterable[str]) -> dict[str, tuple[str, int]]:
        """{lower-cased address: (reason, event seq)} for those on the suppression list."""
        wanted = sorted({r.lower() for r in recipients})
        return await self.db.run(_suppressed, wanted) if wanted else {}

    async def release(
        self, ids: Sequence[str] | None = None, *, interrupted: Mapping[str, str] | None = None
    ) -> int:
        return await self.db.run(_release, ids, interrupted or {}, time.time())

    async def prune_idempotency_keys(self) -> int:
        return await self.db.run(_prune_keys, time.time() - self.idempotency_ttl)

    async def requeue(self, ids: Sequence[str]) -> list[SwuError | None]:
        """Put FAILED or SUPPRESSED messages back in the queue; per id None or why not."""
        out = await self.db.run(_requeue_ids, ids, time.time())
        if self.on_record is not None and None in out:
            self.on_record()
        return out

    async def requeue_matching(self, wanted: RequeueFilter, limit: int) -> int:
        """Put back up to `limit` messages matching `wanted`, those that ended first first."""
        count = await self.db.run(_requeue_matching, wanted, limit, time.time())
        if self.on_record is not None and count:
            self.on_record()
        return count

    async def depth(self) -> int:
        return await self.db.run(_depth)
