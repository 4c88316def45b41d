"""The database's own cost per message: accept, claim and record, as the service runs them.

    .venv/bin/python -m benchmarks.bench_outbox [--messages 40000] [--synchronous FULL]

Opens a fresh data directory through `Database` (the service's schema, WAL and pragmas), then
runs the three statements a delivered message costs, in the service's batch size of 500:
`outbox._accept` of standard-workload payloads (`make_data(i)` in an `order_shipped` Email),
`outbox._claim`, and `outbox._record` of SENT outcomes. The functions are called directly on
this thread, so the CPU time measured is the database thread's work alone. Prints CPU µs and
WAL bytes written per message for each step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.baseline_direct import _make_data_fn
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.db import Database
from swu_delivery.outbox import (
    QUEUED,
    SENT,
    TRANSACTIONAL,
    Completion,
    NewMessage,
    _accept,
    _claim,
    _record,
)

BATCH = 500


def payloads(count: int, start: int) -> list[NewMessage]:
    make_data = _make_data_fn(Path(os.environ.get("SWU_BENCH_DIR", "/work/shared/bench")))
    rows = []
    now = time.time()
    for i in range(start, start + count):
        email = delivery_pb2.Email(
            template_id="order_shipped",
            to=common_pb2.Address(email=f"user{i}@example.com"),
            data_json=orjson.dumps(make_data(i)).decode(),
        )
        rows.append(
            NewMessage(
                id=f"msg-{i:012d}",
                priority=TRANSACTIONAL,
                due_at=now,
                template_id="order_shipped",
                template_version=1,
                locale="",
                recipient=email.to.email,
                payload=email.SerializeToString(deterministic=True),
            )
        )
    return rows


def wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "OFF"])
    args = parser.parse_args()
    rows = payloads(args.messages, 0)
    size = sum(len(r.payload) for r in rows) / len(rows)
    print(f"{args.messages:,} messages, payload {size:,.0f} bytes, synchronous={args.synchronous}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "swu.db"
        db = Database(path, synchronous=args.synchronous)
        asyncio.run(db.open())
        conn = db._conn
        assert conn is not None
        conn.execute("PRAGMA wal_autocheckpoint=0")  # count every byte the steps write
        spent = {"accept": 0.0, "claim": 0.0, "record": 0.0, "checkpoint": 0.0}
        written = dict.fromkeys(spent, 0)

        def step(name: str, fn, *fargs):  # type: ignore[no-untyped-def]
            before, cpu = wal_bytes(path), time.process_time()
            out = fn(conn, *fargs)
            spent[name] += time.process_time() - cpu
            written[name] += wal_bytes(path) - before
            return out

        def checkpoint() -> None:  # what autocheckpoint spreads over the commits, here in one go
            cpu = time.process_time()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            spent["checkpoint"] += time.process_time() - cpu

        for start in range(0, len(rows), BATCH):
            step("accept", _accept, rows[start : start + BATCH], 86400.0, time.time())
            claimed = step("claim", _claim, BATCH, 60.0, time.time(), 0.25)
            done = [
                Completion(
                    c.id,
                    SENT,
                    delivery_pb2.EVENT_TYPE_SENT,
                    c.attempts,
                    esp="sim",
                    esp_message_id="x",
                )
                for c in claimed
            ]
            step("record", _record, done, time.time())
            if wal_bytes(path) > 64 << 20:
                checkpoint()
        checkpoint()
        left = conn.execute("SELECT count(*) FROM messages WHERE state = ?", (QUEUED,)).fetchone()
        assert left[0] == 0, left
        n = len(rows)
        for name in spent:
            cpu, wal = spent[name] / n * 1e6, written[name] / n
            print(f"{name:10s} {cpu:7.1f} µs CPU/msg  {wal:7.0f} WAL bytes/msg")
        total = sum(spent.values()) / n * 1e6
        wal = sum(written.values()) / n
        print(f"{'total':10s} {total:7.1f} µs CPU/msg  {wal:7.0f} WAL bytes/msg")
        asyncio.run(db.close())


if __name__ == "__main__":
    main()
