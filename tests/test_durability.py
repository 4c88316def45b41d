"""Nothing accepted is lost: kill -9 mid-delivery and graceful SIGTERM, on the real process."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.db import Database, execute_rows, transaction
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, data, mk, sent_ids

N = 600


def _accept_all(server: ServerHandle) -> list[str]:
    ids: list[str] = []
    for start in range(0, N, 300):
        emails = [mk(to=f"u{i}@example.com", payload=data(i)) for i in range(start, start + 300)]
        response = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
        ids += [r.message_id for r in response.results]
    assert all(ids)
    return ids


def _restart_with_one_small_lane(server: ServerHandle) -> None:
    """One batch of 20 in flight at a time, so most messages are still unclaimed mid-run."""
    server.stop()
    lanes = {"claim_batch": 20, "max_inflight_batches": 1}
    write_config(server.config, server.data_dir, server.sim.url, delivery=lanes)
    server.start()


def _wait_for_deliveries(server: ServerHandle, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(server.sim.requests(provider="sendgrid", status=202)) < at_least:
        assert time.monotonic() < deadline, "the ESP simulator received too few messages"
        time.sleep(0.02)


def test_kill_9_mid_delivery_loses_nothing(swu_server: ServerHandle) -> None:
    """After kill -9 during delivery and a restart, every accepted message is sent."""
    _restart_with_one_small_lane(swu_server)
    swu_server.put_template("order", {"en": ORDER})
    swu_server.sim.set_faults(latency_ms=50)
    ids = _accept_all(swu_server)
    _wait_for_deliveries(swu_server, 40)
    swu_server.kill()
    before = set(sent_ids(swu_server.sim.requests(provider="sendgrid", status=202)))
    assert len(before) < N, "everything was delivered before the kill; the test proved nothing"
    swu_server.sim.set_faults(latency_ms=0)
    swu_server.start()
    done = swu_server.wait_for_state(ids, timeout=120)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    delivered = Counter(sent_ids(swu_server.sim.requests(provider="sendgrid", status=202)))
    assert set(ids) <= set(delivered)  # duplicates allowed for calls in flight at the crash


def test_sigterm_drains_in_flight_and_keeps_the_rest(swu_server: ServerHandle) -> None:
    """SIGTERM lets in-flight ESP calls finish, leaves the rest queued, and sends nothing twice."""
    _restart_with_one_small_lane(swu_server)
    swu_server.put_template("order", {"en": ORDER})
    swu_server.sim.set_faults(latency_ms=100)
    ids = _accept_all(swu_server)
    _wait_for_deliveries(swu_server, 20)
    assert swu_server.stop(signal.SIGTERM) == 0
    with sqlite3.connect(swu_server.data_dir / "swu.db") as db:
        states = dict(db.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
        leased = db.execute("SELECT count(*) FROM messages WHERE lease_until > 0").fetchone()[0]
    queued = states.get(delivery_pb2.MESSAGE_STATE_QUEUED, 0)
    sent = states.get(delivery_pb2.MESSAGE_STATE_SENT, 0)
    assert queued > 0 and sent > 0 and queued + sent == N
    assert leased == 0  # nothing left claimed: in-flight calls ended and were recorded
    recorded = sent_ids(swu_server.sim.requests(provider="sendgrid", status=202))
    assert len(recorded) == sent  # every call the ESP answered was recorded as sent
    swu_server.sim.set_faults(latency_ms=0)
    swu_server.start()
    swu_server.wait_for_state(ids, timeout=120)
    delivered = Counter(sent_ids(swu_server.sim.requests(provider="sendgrid", status=202)))
    assert set(delivered) == set(ids)
    assert max(delivered.values()) == 1


async def test_writers_of_one_data_directory_queue_on_its_writer_lock(tmp_path: Path) -> None:
    """Every write transaction holds the data directory's writer lock (swu.db.lock), so the
    workers of `serve --workers N` wait for each other in the kernel, woken the moment the
    holder commits, not in SQLite's sleep-and-retry busy handler."""
    db = Database(tmp_path / "swu.db", synchronous="OFF")
    await db.open()
    other = os.open(db.lock_path, os.O_RDWR)  # another process's view of the lock

    def held() -> bool:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False

    def inside(conn: sqlite3.Connection) -> bool:
        with transaction(conn):
            return held()

    def failing(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.execute("INSERT INTO no_such_table VALUES (1)")

    try:
        assert await db.run(inside) is True
        assert held() is False  # released at COMMIT
        with pytest.raises(sqlite3.OperationalError):
            await db.run(failing)
        assert held() is False  # and at ROLLBACK
    finally:
        os.close(other)
        await db.close()


@pytest.mark.parametrize("count", [1, 5, 63, 64, 65, 127, 200, 500])
def test_execute_rows_writes_every_row_once_in_order(count: int) -> None:
    """Multi-row statements (chunks of 64, then halves) carry every row, whatever the count."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, b BLOB)")
    rows = [(i, bytes([i % 256]) * 3) for i in range(count)]
    execute_rows(conn, "INSERT INTO t (n, b)", rows)
    assert conn.execute("SELECT n, b FROM t ORDER BY seq").fetchall() == rows
    execute_rows(
        conn,
        "UPDATE t SET n = v.column2 FROM (",
        [(i, -i) for i, _ in rows],
        ") AS v WHERE t.n = v.column1",
    )
    assert [n for (n,) in conn.execute("SELECT n FROM t ORDER BY seq")] == [-i for i, _ in rows]
