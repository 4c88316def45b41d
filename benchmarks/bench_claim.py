"""Claim cost with many queued messages that are not due yet (scheduled with send_at).

    .venv/bin/python -m benchmarks.bench_claim [--scheduled 100000] [--due 5000]

Builds a WAL database with the service's schema, inserts `--scheduled` fresh messages due a day
ahead (both priorities) and `--due` bulk messages due now, then times 10 claims of 500 through
`outbox._claim`, the function the delivery lane runs on its database thread. Prints ms per claim.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from swu_delivery.db import SCHEMA
from swu_delivery.outbox import _claim

COLUMNS = (
    "id, state, priority, due_at, template_id, template_version, locale, payload_id, recipient"
)


def build(path: Path, scheduled: int, due: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    now = time.time()
    rows = [(f"s{i}", 1, 1 + i % 2, now + 86400) for i in range(scheduled)]
    rows += [(f"d{i}", 1, 2, now - 1) for i in range(due)]
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO messages ({COLUMNS}, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, 't', 1, '', 0, 'x@example.com', 0, 0)",
        rows,
    )
    conn.execute("COMMIT")
    return conn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduled", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for due in (0, args.due):
            conn = build(Path(tmp) / f"claim-{due}.db", args.scheduled, due)
            started, claimed = time.perf_counter(), 0
            for _ in range(10):
                claimed += len(_claim(conn, 500, 60.0, time.time(), 0.25))
            ms = (time.perf_counter() - started) * 100  # 10 claims, in ms: per claim
            print(
                f"{args.scheduled:,} scheduled, {due:,} due:"
                f" {ms:.2f} ms per claim ({claimed} claimed)"
            )
            conn.close()


if __name__ == "__main__":
    main()
