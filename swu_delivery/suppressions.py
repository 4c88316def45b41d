"""The suppression list as an API: add, remove, list and check entries of the `suppressions` table.

Webhook events add hard bounces and complaints to the same table (swu_delivery/events.py) and
the delivery lane reads it before each send (swu_delivery/dispatch.py). Addresses are validated
like a recipient of Send and stored lower-cased, so every comparison ignores case. Adding an
address that is already suppressed keeps its entry unless the caller asks to replace it: a
manual add never hides the hard bounce that suppressed the address first.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import common_pb2, suppression_pb2
from swu_delivery.db import Database, transaction
from swu_delivery.errors import InvalidArgument, SwuError
from swu_delivery.validation import (
    MAX_BATCH,
    check_bare_address,
    check_header_text,
    validate_batch_size,
)

__all__ = ["REASONS", "SuppressionStore"]

SP = suppression_pb2
# The reason as the table stores it (the webhook path writes the first two).
REASONS: dict[int, str] = {
    SP.SUPPRESSION_REASON_HARD_BOUNCE: "hard_bounce",
    SP.SUPPRESSION_REASON_COMPLAINT: "complaint",
    SP.SUPPRESSION_REASON_UNSUBSCRIBE: "unsubscribe",
    SP.SUPPRESSION_REASON_MANUAL: "manual",
}
_REASON_VALUES = {text: SP.SuppressionReason.ValueType(n) for n, text in REASONS.items()}
MAX_NOTE = 1024
DEFAULT_PAGE = 100
MAX_PREFIX = 254  # the longest address
_COLUMNS = "recipient, reason, esp, event_seq, created_at, note"
_CHUNK = 500  # SQLite's bound-parameter limit is 999 on old builds


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _entry(row: Sequence[Any]) -> suppression_pb2.Suppression:
    recipient, reason, esp, seq, created_at, note = row
    return suppression_pb2.Suppression(
        email=recipient,
        reason=_REASON_VALUES.get(reason, SP.SUPPRESSION_REASON_UNSPECIFIED),
        esp=esp,
        event_seq=seq,
        created_at=_ts(created_at),
        note=note,
    )


# --- validation (pure) ----------------------------------------------------------------------


def _check_entry(entry: suppression_pb2.SuppressionEntry) -> tuple[str, str, str]:
    """(lower-cased address, stored reason, note) of a valid entry; paths relative to it."""
    check_bare_address(entry.email, "email")
    if entry.reason == SP.SUPPRESSION_REASON_UNSPECIFIED:
        problem = "required: HARD_BOUNCE, COMPLAINT, UNSUBSCRIBE or MANUAL"
        raise InvalidArgument(problem, field="reason")
    if entry.reason not in REASONS:
        raise InvalidArgument(f"unknown value {entry.reason}", field="reason")
    if entry.note:
        check_header_text(entry.note, "note", max_length=MAX_NOTE)
    return entry.email.lower(), REASONS[entry.reason], entry.note


def _check_emails(emails: Sequence[str]) -> list[str]:
    """The lower-cased addresses of a Remove or Check request, or INVALID_ARGUMENT."""
    validate_batch_size(len(emails), "emails")
    for i, email in enumerate(emails):
        check_bare_address(email, f"emails[{i}]")
    return [email.lower() for email in emails]


def _encode_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        last = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("not a token from ListSuppressions", field="page_token") from None
    if not last:
        raise InvalidArgument("not a token from ListSuppressions", field="page_token")
    return last


def _check_prefix(prefix: str) -> str:
    if len(prefix) > MAX_PREFIX:
        raise InvalidArgument(f"at most {MAX_PREFIX} characters", field="email_prefix")
    if not prefix.isprintable() or any(ch.isspace() for ch in prefix):
        raise InvalidArgument("spaces and control characters never match", field="email_prefix")
    return prefix.lower()


def _after_prefix(prefix: str) -> str:
    """The least string above every string starting with `prefix` (UTF-8 sorts by code point)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


# --- statements (on the database thread) ----------------------------------------------------


def _add(
    conn: sqlite3.Connection, entries: Sequence[tuple[str, str, str]], replace: bool, now: float
) -> list[tuple[suppression_pb2.Suppression, bool]]:
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    out: list[tuple[suppression_pb2.Suppression, bool]] = []
    with transaction(conn):
        for email, reason, note in entries:
            added = conn.execute(
                f"{verb} INTO suppressions ({_COLUMNS}) VALUES (?, ?, '', 0, ?, ?)",
                (email, reason, now, note),
            ).rowcount
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM suppressions WHERE recipient = ?", (email,)
            ).fetchone()
            out.append((_entry(row), bool(added)))
    return out


def _remove(conn: sqlite3.Connection, emails: Sequence[str]) -> list[suppression_pb2.Suppression]:
    removed: list[suppression_pb2.Suppression] = []
    with transaction(conn):
        for email in dict.fromkeys(emails):
            row = conn.execute(
                f"DELETE FROM suppressions WHERE recipient = ? RETURNING {_COLUMNS}", (email,)
            ).fetchone()
            if row is not None:
                removed.append(_entry(row))
    return removed


def _page(
    conn: sqlite3.Connection, after: str, limit: int, reason: str, prefix: str
) -> list[suppression_pb2.Suppression]:
    where, args = ["recipient > ?"], [after]
    if reason:
        where.append("reason = ?")
        args.append(reason)
    if prefix:  # a range on the primary key, so a prefix never scans the whole list
        where.append("recipient >= ? AND recipient < ?")
        args += [prefix, _after_prefix(prefix)]
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM suppressions WHERE {' AND '.join(where)}"
        " ORDER BY recipient LIMIT ?",
        (*args, limit),
    )
    return [_entry(row) for row in rows]


def _lookup(
    conn: sqlite3.Connection, emails: Sequence[str]
) -> dict[str, suppression_pb2.Suppression]:
    found: dict[str, suppression_pb2.Suppression] = {}
    wanted = sorted(set(emails))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        for row in conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions"
            f" WHERE recipient IN ({', '.join('?' * len(chunk))})",
            chunk,
        ):
            found[row[0]] = _entry(row)
    return found


# --- the API --------------------------------------------------------------------------------


class SuppressionStore:
    """The SuppressionService's operations over the `suppressions` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self, request: suppression_pb2.AddSuppressionRequest
    ) -> suppression_pb2.AddSuppressionResponse:
        """Per-entry results, like SendBatch: a bad entry is refused alone."""
        validate_batch_size(len(request.entries), "entries")
        results: list[suppression_pb2.AddSuppressionResult] = []
        valid: list[tuple[str, str, str]] = []
        for i, entry in enumerate(request.entries):
            try:
                valid.append(_check_entry(entry))
            except SwuError as exc:
                error = common_pb2.ItemError(
                    code=exc.code.value[0], message=exc.prefixed(f"entries[{i}]"), field=exc.field
                )
                results.append(suppression_pb2.AddSuppressionResult(index=i, error=error))
            else:
                results.append(suppression_pb2.AddSuppressionResult(index=i))
        stored = await self.db.run(_add, valid, request.replace, time.time()) if valid else []
        done = iter(stored)
        for result in results:
            if not result.HasField("error"):
                suppression, added = next(done)
                result.suppression.CopyFrom(suppression)
                result.added = added
        return suppression_pb2.AddSuppressionResponse(results=results)

    async def remove(
        self, request: suppression_pb2.RemoveSuppressionRequest
    ) -> suppression_pb2.RemoveSuppressionResponse:
        removed = await self.db.run(_remove, _check_emails(request.emails))
        return suppression_pb2.RemoveSuppressionResponse(removed=removed)

    async def page(
        self, request: suppression_pb2.ListSuppressionsRequest
    ) -> suppression_pb2.ListSuppressionsResponse:
        if request.reason != SP.SUPPRESSION_REASON_UNSPECIFIED and request.reason not in REASONS:
            raise InvalidArgument(f"unknown value {request.reason}", field="reason")
        after = _decode_token(request.page_token) if request.page_token else ""
        prefix = _check_prefix(request.email_prefix)
        size = min(request.page_size or DEFAULT_PAGE, MAX_BATCH)
        reason = REASONS.get(request.reason, "")
        entries = await self.db.run(_page, after, size + 1, reason, prefix)
        more = len(entries) > size
        entries = entries[:size]
        token = _encode_token(entries[-1].email) if more else ""
        return suppression_pb2.ListSuppressionsResponse(suppressions=entries, next_page_token=token)

    async def check(
        self, request: suppression_pb2.CheckSuppressionRequest
    ) -> suppression_pb2.CheckSuppressionResponse:
        emails = _check_emails(request.emails)
        found = await self.db.run(_lookup, emails)
        results = []
        for asked, email in zip(request.emails, emails, strict=True):
            result = suppression_pb2.CheckSuppressionResult(email=asked)
            if (suppressed := found.get(email)) is not None:
                result.suppressed = True
                result.suppression.CopyFrom(suppressed)
            results.append(result)
        return suppression_pb2.CheckSuppressionResponse(results=results)
