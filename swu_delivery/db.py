"""The SQLite database (WAL): schema, pragmas, and one thread that runs every statement.

All access goes through `Database.run(fn, ...)`, which calls `fn(conn, ...)` on a dedicated
thread, so the event loop never blocks on disk and statements never interleave. Each `fn` is a
short, complete unit of work; `transaction(conn)` wraps it in BEGIN IMMEDIATE ... COMMIT.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["Database", "execute_rows", "transaction"]

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA_VERSION = 5  # 2: suppressions.note; 3: maybe_sent, claim lanes; 4: rowid; 5: payloads
# One row per accepted message: the durable outbox (state 1 = queued) and the ledger at once.
# A claim and a recorded outcome each rewrite the whole row, so the 1-2 KB accepted Email lives
# in its own table (payloads), written once: the row they rewrite is ~150 bytes. Both are rowid
# tables: schema 3 kept messages WITHOUT ROWID, whose big rows went to overflow pages.
MESSAGES_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    id               TEXT PRIMARY KEY,
    state            INTEGER NOT NULL,  -- 1 queued, 2 sent, 3 failed, 7 suppressed (ESP events
                                        -- refine sent into delivered/bounced/... on reading)
    priority         INTEGER NOT NULL,  -- 1 transactional, 2 bulk
    due_at           REAL NOT NULL,     -- not before (send_at, a retry's backoff, or the lease end)
    lease_until      REAL NOT NULL DEFAULT 0,  -- claimed by a lane until then; 0 = free
    template_id      TEXT NOT NULL,
    template_version INTEGER NOT NULL,
    locale           TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    payload_id       INTEGER NOT NULL,  -- payloads.id: the accepted Email
    attempts         INTEGER NOT NULL DEFAULT 0,
    esp              TEXT NOT NULL DEFAULT '',  -- the last attempt's account (or the sender's)
    maybe_sent       INTEGER NOT NULL DEFAULT 0,  -- the last attempt may have reached its esp
    esp_message_id   TEXT NOT NULL DEFAULT '',
    reason           TEXT NOT NULL DEFAULT '',
    idempotency_key  TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS templates (
    template_id    TEXT PRIMARY KEY,
    description    TEXT NOT NULL DEFAULT '',
    active_version INTEGER NOT NULL,
    latest_version INTEGER NOT NULL,
    deleted        INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS template_versions (
    template_id    TEXT NOT NULL,
    version        INTEGER NOT NULL,
    default_locale TEXT NOT NULL,
    contents       BLOB NOT NULL,      -- JSON list of {locale, subject, html, text}
    created_at     REAL NOT NULL,
    PRIMARY KEY (template_id, version)
) WITHOUT ROWID;
"""
    + MESSAGES_TABLE.format(name="messages")
    + """
-- The two claim lanes (outbox._claim): fresh messages by priority, retries by due time.
CREATE INDEX IF NOT EXISTS messages_fresh ON messages (priority, due_at)
    WHERE state = 1 AND attempts = 0;
CREATE INDEX IF NOT EXISTS messages_retry ON messages (due_at) WHERE state = 1 AND attempts > 0;
CREATE INDEX IF NOT EXISTS messages_template ON messages (template_id, template_version);
-- The accepted Email protobuf of each message (deterministic encoding), written once at accept.
CREATE TABLE IF NOT EXISTS payloads (
    id      INTEGER PRIMARY KEY,
    payload BLOB NOT NULL
);
-- A message's history after acceptance (its QUEUED event is implied by the row): what the
-- delivery lane did, and what ESP webhooks reported. seq is the WatchEvents cursor.
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,           -- ours; '' for a webhook event that names none
    time       REAL NOT NULL,
    type       INTEGER NOT NULL,        -- EventType
    esp        TEXT NOT NULL DEFAULT '',
    detail     TEXT NOT NULL DEFAULT '',  -- reason, or the ESP's message id for SENT
    attempt    INTEGER NOT NULL DEFAULT 0,
    provider_event_id TEXT,             -- webhook events only; deduplicated per ESP account
    provider_type     TEXT NOT NULL DEFAULT '',
    recipient         TEXT NOT NULL DEFAULT '',
    bounce            INTEGER NOT NULL DEFAULT 0,
    response          TEXT NOT NULL DEFAULT '',
    url               TEXT NOT NULL DEFAULT '',
    user_agent        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_message ON events (message_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_provider ON events (esp, provider_event_id)
    WHERE provider_event_id IS NOT NULL;
-- Recipients never to send to again; webhooks add hard bounces and complaints, callers any.
CREATE TABLE IF NOT EXISTS suppressions (
    recipient  TEXT PRIMARY KEY,        -- lower-cased address
    reason     TEXT NOT NULL,           -- hard_bounce | complaint | unsubscribe | manual
    esp        TEXT NOT NULL DEFAULT '',
    event_seq  INTEGER NOT NULL DEFAULT 0,  -- the event that added it; 0 = added by a caller
    created_at REAL NOT NULL,
    note       TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key        TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    digest     BLOB NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""
)


# Columns added after a table was first released: (table, column, definition). A data
# directory from an older release gets them on open (CREATE TABLE IF NOT EXISTS skips the table).
ADDED_COLUMNS = (
    ("suppressions", "note", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "maybe_sent", "INTEGER NOT NULL DEFAULT 0"),
)
# Indexes a later release replaced; dropped on open.
DROPPED_INDEXES = ("messages_ready",)  # one claim index before the fresh and retry lanes


def _rebuild_messages(conn: sqlite3.Connection) -> bool:
    """Rebuild a messages table of schema 4 or older, which holds each payload in its row.

    Moves every payload to `payloads` and copies every row to a rowid table of the current
    layout (schema 3 and older were WITHOUT ROWID), in one transaction, then drops the old table
    with its indexes; the caller runs SCHEMA again to create them. True when it rebuilt.
    """
    columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
    if "payload" not in columns:
        return False
    kept = ", ".join(c for c in columns if c != "payload")
    # Both statements number the rows the same way (ids are unique), so payload_id matches.
    number = "? + row_number() OVER (ORDER BY id)"
    with transaction(conn):
        conn.execute("DROP TABLE IF EXISTS messages_new")  # a rebuild cut short earlier
        conn.execute(MESSAGES_TABLE.format(name="messages_new"))
        (base,) = conn.execute("SELECT coalesce(max(id), 0) FROM payloads").fetchone()
        conn.execute(
            f"INSERT INTO payloads (id, payload) SELECT {number}, payload FROM messages", (base,)
        )
        conn.execute(
            f"INSERT INTO messages_new ({kept}, payload_id) SELECT {kept}, {number} FROM messages",
            (base,),
        )
        conn.execute("DROP TABLE messages")
        conn.execute("ALTER TABLE messages_new RENAME TO messages")
    return True


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, definition in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    for index in DROPPED_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {index}")


# Rows per multi-row statement (`execute_rows`): 64 rows of at most 15 values stay under 999,
# the smallest limit on parameters of any SQLite build.
ROWS_PER_STATEMENT = 64


def execute_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """Run ``{head} VALUES (?, ...), (?, ...) {tail}`` over `rows`: a few statements, not one each.

    `executemany` steps its statement once per row, and every step lets go of the GIL and then
    waits to take it back; while the event loop renders a batch, each wait can last a whole
    switch interval (5 ms), and the transaction holds the database's write lock meanwhile. Rows
    go in chunks of 64, then 32, 16, ... 1, so only a few distinct statements reach the cache.
    """
    if not rows:
        return
    group = "(" + ",".join("?" * len(rows[0])) + ")"
    done, size = 0, ROWS_PER_STATEMENT
    while done < len(rows):
        while size > len(rows) - done:
            size //= 2
        chunk = rows[done : done + size]
        values = ",".join([group] * size)
        conn.execute(f"{head} VALUES {values}{tail}", [v for row in chunk for v in row])
        done += size


class Connection(sqlite3.Connection):
    """A connection that knows its data directory's writer lock (see `transaction`)."""

    writer_lock: int | None = None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (take the write lock up front) ... COMMIT, or ROLLBACK on error.

    Writers of one data directory (the workers of `serve --workers N`) first queue on its
    writer lock, a kernel lock that wakes the next writer the moment the holder is done.
    SQLite's own busy handler would instead have each waiting writer sleep and retry, with
    sleeps growing to 100 ms, so a worker whose transactions run back to back could keep a
    second one waiting for seconds (measured: up to 2.2 s with 2 workers under load).
    """
    lock = getattr(conn, "writer_lock", None)
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Database:
    """One SQLite file, one connection, one thread."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swu-db")
        self._conn: sqlite3.Connection | None = None

    @property
    def lock_path(self) -> Path:
        """The writer lock file beside the database (see `transaction`)."""
        return self.path.with_name(self.path.name + ".lock")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, factory=Connection
        )
        # Opened here, in the process that writes: a lock inherited across fork would be shared.
        conn.writer_lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged message survives a power loss, not only a process crash.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=OFF")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema {version} is newer than this release")
        conn.executescript(SCHEMA)
        _add_missing_columns(conn)
        if _rebuild_messages(conn):
            conn.executescript(SCHEMA)  # the indexes went with the old table
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._conn = conn

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(conn, *args)` on the database thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("database is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(conn, *args, **kwargs))

    def writable(self) -> bool:
        """A cheap probe for health checks: can we take the write lock right now?"""
        conn = self._conn
        if conn is None:
            return False
        try:
            with transaction(conn):
                pass
        except sqlite3.Error:
            return False
        return True

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                lock = getattr(self._conn, "writer_lock", None)
                self._conn.close()
                self._conn = None
                if lock is not None:
                    os.close(lock)

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)


def rows_as_dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """Rows of `cursor` as dicts keyed by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
