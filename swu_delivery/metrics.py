"""Every Prometheus metric of the service, defined once, with its labels (docs/operating.md).

Labels have few values: `esp` (account name), `outcome`, `reason`, `method`, `code`, `lane`,
never a recipient, message id or template data. Hot paths count per batch (`inc(n)`) and use
label children cached here (`esp_metrics`), so a message costs no label lookup.

With several worker processes (`PROMETHEUS_MULTIPROC_DIR` set), prometheus-client keeps values
in per-process files and `registry()` merges them, so any worker answers a scrape with totals.
prometheus-client picks its value store when it is imported, so the variable must be set before
this module (or `swu_delivery.server`) is imported, i.e. before the workers are forked.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)

__all__ = [
    "BATCH_SIZE",
    "BREAKER_STATE",
    "ESP_REQUEST_SECONDS",
    "GRPC_REQUESTS",
    "GRPC_SECONDS",
    "INTAKE_ACCEPTED",
    "INTAKE_REJECTED",
    "OUTBOX_DEPTH",
    "OUTBOX_OLDEST_AGE",
    "RATELIMIT_THROTTLED",
    "RATELIMIT_WAITS",
    "RATELIMIT_WAIT_SECONDS",
    "RENDER_SECONDS",
    "RETRIES",
    "SENDS",
    "TEMPLATE_CACHE",
    "TEMPLATE_COMPILES",
    "EspMetrics",
    "esp_metrics",
    "refresh_outbox",
    "registry",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RENDER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)

INTAKE_ACCEPTED = Counter(
    "swu_delivery_intake_accepted_total", "Messages accepted and queued (duplicates included)"
)
INTAKE_REJECTED = Counter(
    "swu_delivery_intake_rejected_total",
    "Messages refused at intake, by reason (the item's gRPC status, lower case)",
    ["reason"],
)
OUTBOX_DEPTH = Gauge(
    "swu_delivery_outbox_depth_messages",
    "Queued messages per lane, scheduled and backing off included (read at scrape time)",
    ["lane"],
    multiprocess_mode="mostrecent",  # every worker reads the same database
)
OUTBOX_OLDEST_AGE = Gauge(
    "swu_delivery_outbox_oldest_age_seconds",
    "How long the most overdue queued message of a lane has been due (0: none due)",
    ["lane"],
    multiprocess_mode="mostrecent",
)
SENDS = Counter(
    "swu_delivery_sends_total",
    "Messages handed to an ESP account, by outcome (sent, rejected, retry, throttled, deferred)",
    ["esp", "outcome"],
)
ESP_REQUEST_SECONDS = Histogram(
    "swu_delivery_esp_request_seconds",
    "Latency of one provider call (a batch of messages for batch APIs)",
    ["esp"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "swu_delivery_batch_size_messages",
    "Messages per batch claimed from the outbox by the delivery lane",
    buckets=_BATCH_BUCKETS,
)
RETRIES = Counter(
    "swu_delivery_retries_total",
    "Messages re-queued with backoff after a retryable failure (throttling and deferral excluded)",
)
RATELIMIT_WAITS = Counter(
    "swu_delivery_ratelimit_waits_total",
    "Provider calls that waited for the account's own rate limit before starting",
    ["esp"],
)
RATELIMIT_WAIT_SECONDS = Counter(
    "swu_delivery_ratelimit_wait_seconds_total",
    "Time provider calls spent waiting for the account's own rate limit",
    ["esp"],
)
RATELIMIT_THROTTLED = Counter(
    "swu_delivery_ratelimit_throttled_total",
    "Provider calls the ESP throttled (HTTP 429 or its equivalent)",
    ["esp"],
)
BREAKER_STATE = Gauge(
    "swu_delivery_breaker_state",
    "Circuit breaker of an ESP account: 0 closed, 1 half-open, 2 open",
    ["esp"],
    multiprocess_mode="max",  # one worker with an open circuit shows as open
)
RENDER_SECONDS = Histogram(
    "swu_delivery_render_seconds",
    "Time to render one message (subject, html and text)",
    buckets=_RENDER_BUCKETS,
)
TEMPLATE_CACHE = Counter(
    "swu_delivery_template_cache_lookups_total",
    "Compiled-template cache lookups, by result (hit, miss)",
    ["result"],
)
TEMPLATE_COMPILES = Counter(
    "swu_delivery_template_compiles_total", "Template versions compiled (all their locales)"
)
GRPC_REQUESTS = Counter(
    "swu_delivery_grpc_requests_total",
    "gRPC calls handled, by method and status code",
    ["method", "code"],
)
GRPC_SECONDS = Histogram(
    "swu_delivery_grpc_request_seconds",
    "gRPC call duration by method (streams: until the stream ends)",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)

CACHE_HIT = TEMPLATE_CACHE.labels("hit")
CACHE_MISS = TEMPLATE_CACHE.labels("miss")
# A breaker state's gauge value; the order makes `max` across workers mean "worst".
BREAKER_VALUES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class EspMetrics:
    """The label children of one ESP account, looked up once."""

    sent: Any
    rejected: Any
    retry: Any
    throttled: Any
    deferred: Any
    latency: Any
    waits: Any
    wait_seconds: Any
    throttled_calls: Any


_esp_cache: dict[str, EspMetrics] = {}


def esp_metrics(esp: str) -> EspMetrics:
    """The cached children for account `esp` (created, and so exported as 0, on first use)."""
    found = _esp_cache.get(esp)
    if found is None:
        found = _esp_cache[esp] = EspMetrics(
            sent=SENDS.labels(esp, "sent"),
            rejected=SENDS.labels(esp, "rejected"),
            retry=SENDS.labels(esp, "retry"),
            throttled=SENDS.labels(esp, "throttled"),
            deferred=SENDS.labels(esp, "deferred"),
            latency=ESP_REQUEST_SECONDS.labels(esp),
            waits=RATELIMIT_WAITS.labels(esp),
            wait_seconds=RATELIMIT_WAIT_SECONDS.labels(esp),
            throttled_calls=RATELIMIT_THROTTLED.labels(esp),
        )
    return found


def count_intake(results: Sequence[Any]) -> None:
    """Count one accepted batch's results (SendResult: a message id, or an error)."""
    errors = [r.error.code for r in results if r.HasField("error")]
    if len(errors) < len(results):
        INTAKE_ACCEPTED.inc(len(results) - len(errors))
    if errors:
        for code, n in Tally(errors).items():
            INTAKE_REJECTED.labels(_code_name(code)).inc(n)


def _code_name(code: int) -> str:
    return _CODE_NAMES.get(code, "unknown")


_CODE_NAMES = {int(s.value[0]): str(s.name).lower() for s in grpc.StatusCode}


def count_retries(completions: Iterable[Any], queued_state: int) -> None:
    """Count the messages of a recorded batch that go back to the queue with backoff."""
    n = sum(1 for c in completions if c.state == queued_state and not c.refund)
    if n:
        RETRIES.inc(n)


# The outbox's claim lanes: fresh messages by priority, and retries (attempts > 0).
LANES = {1: "transactional", 2: "bulk", 0: "retry"}
# Each query reads one partial index of the lane (db.py), not the whole messages table.
_FRESH_STATS = (
    "SELECT priority, count(*), min(due_at) FROM messages"
    " WHERE state = 1 AND attempts = 0 GROUP BY priority"
)
_RETRY_STATS = "SELECT 0, count(*), min(due_at) FROM messages WHERE state = 1 AND attempts > 0"


def _outbox_stats(conn: sqlite3.Connection) -> list[tuple[int, int, float | None]]:
    rows = conn.execute(_FRESH_STATS).fetchall() + conn.execute(_RETRY_STATS).fetchall()
    return [(int(lane), int(n), due) for lane, n, due in rows]


async def refresh_outbox(db: Any) -> None:
    """Read outbox depth and oldest age per lane (through the database thread) into the gauges."""
    stats = {lane: (n, due) for lane, n, due in await db.run(_outbox_stats) if n}
    now = time.time()
    for key, lane in LANES.items():
        n, due = stats.get(key, (0, None))
        OUTBOX_DEPTH.labels(lane).set(n)
        OUTBOX_OLDEST_AGE.labels(lane).set(max(0.0, now - due) if due is not None else 0.0)


def registry() -> CollectorRegistry:
    """The registry a scrape reads: all workers' files when multiprocess, else the default."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return DEFAULT_REGISTRY


WAITED_SECONDS = 0.001  # a limiter acquire that took longer than this waited for its limit


def count_call(m: EspMetrics, asked: float, started: float, ended: float, outcomes: Any) -> None:
    """One provider call: its limiter wait, latency, 429, and its messages by outcome."""
    if started - asked > WAITED_SECONDS:
        m.waits.inc()
        m.wait_seconds.inc(started - asked)
    m.latency.observe(ended - started)
    sent = rejected = throttled = 0
    for o in outcomes:
        kind = o.kind.value
        if kind == "sent":
            sent += 1
        elif kind == "rejected":
            rejected += 1
        elif o.rate_limited:
            throttled += 1
    if sent:
        m.sent.inc(sent)
    if rejected:
        m.rejected.inc(rejected)
    if throttled:
        m.throttled.inc(throttled)
        m.throttled_calls.inc()
    if retry := len(outcomes) - sent - rejected - throttled:
        m.retry.inc(retry)
