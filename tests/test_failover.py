"""Routes, circuit breakers and failover end to end: the real server, the simulator's records."""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from itertools import cycle
from pathlib import Path
from typing import Any

import pytest

from adapters.base import HttpResponse, OutcomeKind
from adapters.sendgrid import SendGridAdapter
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import ConfigError, EspAccount, load_config
from swu_delivery.db import Database
from swu_delivery.outbox import QUEUED, Completion, NewMessage, Outbox
from tests import adapter_kit as kit
from tests.conftest import SIM_KEY_ENV, STATE_NAMES, ServerHandle
from tests.helpers import ORDER, data, mk

# Both accounts live on the one simulator; its records tell them apart by provider.
ACCOUNT = """
[[esp]]
name = "{name}"
kind = "{kind}"
base_url = "{url}"
api_key_env = "{key_env}"
sender = "orders@shop.example.com"
timeout = {timeout}
breaker_failures = 1
breaker_cooldown_seconds = {cooldown}
"""


def config_text(
    tmp_path: Path, sim_url: str, *, routes: str, timeout: float, cooldown: float, attempts: int
) -> str:
    accounts = "".join(
        ACCOUNT.format(
            name=name,
            kind=kind,
            url=sim_url,
            key_env=SIM_KEY_ENV,
            timeout=timeout,
            cooldown=cooldown,
        )
        for name, kind in (("sg", "sendgrid"), ("pm", "postmark"))
    )
    return f"""
listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
grace_seconds = 5

[webhooks]
listen = ""

[delivery]
default_esp = "sg"
max_attempts = {attempts}
retry_base = 0.05
retry_max = 0.3
idle_poll = 0.05
{accounts}
{routes}
"""


@pytest.fixture
def start(tmp_path: Path, esp_simulator: Any) -> Iterator[Any]:
    """A function starting the service with accounts sg and pm; stops what it started."""
    started: list[ServerHandle] = []

    def run(
        routes: str = '[[route]]\ntemplate = "order"\nesps = ["sg", "pm"]\n',
        timeout: float = 5,
        cooldown: float = 60,
        attempts: int = 3,
    ) -> ServerHandle:
        path = tmp_path / "swu.toml"
        path.write_text(
            config_text(
                tmp_path,
                esp_simulator.url,
                routes=routes,
                timeout=timeout,
                cooldown=cooldown,
                attempts=attempts,
            )
        )
        server = ServerHandle(path, tmp_path / "data", esp_simulator)
        server.start()
        started.append(server)
        server.put_template("order", {"en": ORDER})
        server.put_template("welcome", {"en": ORDER})
        return server

    yield run
    for server in started:
        server.stop()


def send(server: ServerHandle, n: int, template_id: str = "order", offset: int = 0) -> list[str]:
    emails = [
        mk(template_id, to=f"u{i}@example.com", payload=data(i)) for i in range(offset, offset + n)
    ]
    response = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
    return [r.message_id for r in response.results]


def accepted_ids(sim: Any) -> dict[str, Counter[str]]:
    """Our message ids each account's provider accepted, counted."""
    sendgrid = [
        p["custom_args"]["swu_message_id"]
        for r in sim.requests(provider="sendgrid", status=202)
        for p in r["body"]["personalizations"]
    ]
    postmark = [
        m["Metadata"]["swu_message_id"]
        for r in sim.requests(provider="postmark", status=200)
        for m in r["body"]
    ]
    return {"sg": Counter(sendgrid), "pm": Counter(postmark)}


def test_primary_5xx_fails_over_to_the_backup(start: Any, esp_simulator: Any) -> None:
    """sg answers 500: every message is sent once by pm, and its history names the failover."""
    esp_simulator.add_rule(action="500", provider="sendgrid")
    server = start()
    ids = send(server, 5)
    done = server.wait_for_state(ids, timeout=30)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert {m.esp for m in done.values()} == {"pm"}
    for message in done.values():
        details = [e.detail for e in message.events]
        assert any(d.startswith("failover from sg to pm: SendGrid 500") for d in details), details
    assert accepted_ids(esp_simulator) == {"sg": Counter(), "pm": Counter(ids)}


def test_dropped_connection_stays_on_its_esp(start: Any, esp_simulator: Any) -> None:
    """A connection dropped after the request was written: the retry goes to sg again, not pm."""
    esp_simulator.add_rule(action="drop", provider="sendgrid", times=1)
    server = start(cooldown=0.5)  # sg opens on the drop; pm stays closed and idle
    (message_id,) = send(server, 1)
    message = server.wait_for_state([message_id], timeout=30)[message_id]
    assert (STATE_NAMES[message.state], message.esp) == ("SENT", "sg")
    assert accepted_ids(esp_simulator) == {"sg": Counter([message_id]), "pm": Counter()}


def test_timeout_after_sending_is_not_moved(start: Any, esp_simulator: Any) -> None:
    """sg answers after the account's timeout: the message is never handed to pm."""
    esp_simulator.add_rule(action="latency", provider="sendgrid", latency_ms=1500, times=1)
    server = start(timeout=1, cooldown=0.5)
    (message_id,) = send(server, 1)
    message = server.wait_for_state([message_id], timeout=30)[message_id]
    assert (STATE_NAMES[message.state], message.esp) == ("SENT", "sg")
    accepted = accepted_ids(esp_simulator)
    # sg may hold it twice (it accepted the timed-out call): at-least-once towards one ESP.
    assert accepted["pm"] == Counter() and accepted["sg"][message_id] >= 1


def held(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    """The DEFERRED events of claims that found every account of the route open."""
    return [
        e
        for e in message.events
        if e.type == delivery_pb2.EVENT_TYPE_DEFERRED and "circuit open for every" in e.detail
    ]


def test_all_accounts_open_holds_messages_until_the_primary_recovers(
    start: Any, esp_simulator: Any
) -> None:
    """sg and pm both fail: messages wait without spending attempts; sg recovers and sends all."""
    esp_simulator.add_rule(action="503")
    server = start(cooldown=0.5, attempts=8)
    ids = send(server, 3)
    deadline = time.monotonic() + 20
    while not all(held(server.get(i)) for i in ids):  # both accounts opened, messages held
        assert time.monotonic() < deadline, "messages were never held"
        time.sleep(0.05)
    esp_simulator.set_faults(rules=[{"action": "503", "provider": "postmark"}])  # sg recovers
    done = server.wait_for_state(ids, timeout=30)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert {m.esp for m in done.values()} == {"sg"}
    for message in done.values():
        calls = [e for e in message.events if e.type != delivery_pb2.EVENT_TYPE_QUEUED]
        assert message.attempts == len(calls) - len(held(message))  # holds spent no attempt
    assert accepted_ids(esp_simulator) == {"sg": Counter(ids), "pm": Counter()}


def test_template_route_picks_its_esp(start: Any, esp_simulator: Any) -> None:
    """welcome has its own route (pm); order falls back to the default route (sg)."""
    server = start(routes='[[route]]\ntemplate = "welcome"\nesps = ["pm"]\n')
    order = send(server, 2)
    welcome = send(server, 2, template_id="welcome", offset=10)
    done = server.wait_for_state([*order, *welcome], timeout=30)
    assert {done[i].esp for i in order} == {"sg"}
    assert {done[i].esp for i in welcome} == {"pm"}
    assert accepted_ids(esp_simulator) == {"sg": Counter(order), "pm": Counter(welcome)}


def new(i: int, now: float) -> NewMessage:
    return NewMessage(
        id=f"m{i:05d}",
        priority=2,
        due_at=now,
        template_id="order",
        template_version=1,
        locale="en",
        recipient=f"u{i}@example.com",
        payload=b"",
    )


async def test_fresh_mail_is_claimed_ahead_of_a_retry_backlog(tmp_path: Path) -> None:
    """1000 due retries and 10 fresh messages: the first claim takes all 10 fresh ones."""
    db = Database(tmp_path / "outbox.db", synchronous="OFF")
    await db.open()
    try:
        outbox = Outbox(db, idempotency_ttl=86400)
        now = time.time()
        await outbox.accept([new(i, now - 60) for i in range(1000)])
        backlog = await outbox.claim(1000, lease=60)
        await outbox.record(
            [Completion(c.id, QUEUED, delivery_pb2.EVENT_TYPE_DEFERRED, 1) for c in backlog]
        )  # due again at once (due_at 0), older than any fresh message
        await outbox.accept([new(i, now) for i in range(1000, 1010)])
        first = await outbox.claim(100, lease=60, retry_share=0.25)
        fresh = [c for c in first if c.attempts == 1]
        assert len(first) == 100 and len(fresh) == 10  # retries took fresh mail's unused share
        assert all(c.id >= "m01000" for c in fresh)
        only_retries = await outbox.claim(100, lease=60, retry_share=0.25)
        assert len(only_retries) == 100 and all(c.attempts == 2 for c in only_retries)
        await outbox.accept([new(i, now) for i in range(2000, 2200)])
        mixed = await outbox.claim(100, lease=60, retry_share=0.25)
        assert Counter(c.attempts for c in mixed) == {1: 75, 2: 25}
    finally:
        await db.close()


async def test_transactional_mail_is_claimed_before_bulk_and_scheduled_mail_waits(
    tmp_path: Path,
) -> None:
    """Due transactional messages come first, then bulk; messages scheduled (send_at) for
    tomorrow at either priority are not claimed, and do not hide the due ones behind them."""
    db = Database(tmp_path / "outbox.db", synchronous="OFF")
    await db.open()
    try:
        outbox = Outbox(db, idempotency_ttl=86400)
        now = time.time()
        bulk = [new(i, now - 60) for i in range(50)]
        later = [
            replace(new(i, now + 86400), priority=p)
            for i, p in zip(range(100, 1100), cycle((1, 2)))
        ]
        urgent = [replace(new(i, now - 1), priority=1) for i in range(2000, 2020)]
        await outbox.accept(bulk + later + urgent)
        first = await outbox.claim(30, lease=60)
        assert [c.id for c in first] == [m.id for m in urgent] + [m.id for m in bulk[:10]]
        rest = await outbox.claim(1000, lease=60)
        assert [c.id for c in rest] == [m.id for m in bulk[10:]]
        assert await outbox.claim(1000, lease=60) == []
    finally:
        await db.close()


ROUTED = """
[delivery]
{delivery}

[[esp]]
name = "a"
kind = "sendgrid"
{breaker}

[[esp]]
name = "b"
kind = "postmark"
{routes}
"""


@pytest.mark.parametrize(
    ("delivery", "breaker", "routes", "expected"),
    [
        ('route = ["a", "c"]', "", "", "delivery.route: no ESP account named 'c'"),
        ("route = []", "", "", "delivery.route: expected a non-empty list"),
        ('route = ["a", "a"]', "", "", "delivery.route: an account appears twice"),
        ("", "", '[[route]]\ntemplate = "w"\nesps = ["x"]', "route[0].esps: no ESP account"),
        ("", "", '[[route]]\nesps = ["a"]', "route[0].template: required string"),
        ("", "", '[route]\ntemplate = "w"', "write [[route]], not [route]"),
        ("retry_share = 1.5", "", "", "delivery.retry_share: must lie in [0, 1]"),
        ("", "breaker_failures = 0", "", "esp[0].breaker_failures: must be an integer >= 1"),
        ("", "breaker_cooldown_seconds = -1", "", "esp[0].breaker_cooldown_seconds: must be"),
    ],
)
def test_bad_routes_and_breakers_are_refused_naming_the_key(
    tmp_path: Path, delivery: str, breaker: str, routes: str, expected: str
) -> None:
    """Unknown accounts in a route, bad shares and breaker settings fail at load."""
    path = tmp_path / "swu.toml"
    path.write_text(ROUTED.format(delivery=delivery, breaker=breaker, routes=routes))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_routes_load_and_default_to_default_esp(tmp_path: Path) -> None:
    """No route: [default_esp]; [delivery] route and [[route]] tables apply as written."""
    path = tmp_path / "swu.toml"
    path.write_text(ROUTED.format(delivery="", breaker="", routes=""))
    assert load_config(path).delivery.route_for("any") == ("a",)
    routes = '[[route]]\ntemplate = "w"\nesps = ["a"]'
    path.write_text(ROUTED.format(delivery='route = ["b", "a"]', breaker="", routes=routes))
    delivery = load_config(path).delivery
    assert (delivery.route_for("w"), delivery.route_for("other")) == (("a",), ("b", "a"))


@pytest.mark.parametrize(
    ("status", "body", "maybe_sent"),
    [
        (500, b'{"errors": [{"message": "internal"}]}', False),
        (503, b"", True),  # a bare 5xx: a proxy's, the ESP behind it may have accepted
        (504, b"gateway timeout", True),
        (408, b"", False),
        (429, b"", False),
    ],
)
def test_http_error_answers_say_whether_the_esp_may_have_the_message(
    status: int, body: bytes, maybe_sent: bool
) -> None:
    """Only a gateway timeout or a body-less 5xx leaves the message possibly sent."""
    adapter = SendGridAdapter(kit.account("sendgrid", "http://127.0.0.1:9"))
    (outcome,) = adapter.classify_error([kit.message(0)], HttpResponse(status, {}, body))
    assert outcome.maybe_sent is maybe_sent


async def test_ses_and_smtp_refused_connections_are_surely_not_sent() -> None:
    """SES (EndpointConnectionError) and SMTP (SMTPConnectError): retries free to fail over."""
    port = kit.free_port()
    ses = EspAccount(
        name="ses",
        kind="ses",
        base_url=f"http://127.0.0.1:{port}",
        api_key="testing",
        sender="orders@shop.example.com",
        timeout=2,
        messages_per_second=10,  # no quota lookup at start
        options={"region": "us-east-1", "access_key_id": "testing"},
    )
    smtp = EspAccount(
        name="smtp",
        kind="smtp",
        sender="orders@shop.example.com",
        timeout=2,
        options={"host": "127.0.0.1", "port": port, "tls": "none"},
    )
    for acc in (ses, smtp):
        async with kit.running(acc) as adapter:
            (outcome,) = await adapter.send([kit.message(0)])
        assert (outcome.kind, outcome.maybe_sent) == (OutcomeKind.RETRY, False), outcome


OLD_MESSAGES = (
    "CREATE TABLE messages (id TEXT PRIMARY KEY, state INTEGER NOT NULL, priority INTEGER"
    " NOT NULL, due_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0, template_id TEXT"
    " NOT NULL, template_version INTEGER NOT NULL, locale TEXT NOT NULL, recipient TEXT NOT"
    " NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, esp TEXT NOT NULL"
    " DEFAULT '', {maybe_sent}esp_message_id TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL"
    " DEFAULT '', idempotency_key TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
)
OLD_SCHEMAS = {
    # schema 2: WITHOUT ROWID, one claim index, no maybe_sent
    2: OLD_MESSAGES.format(maybe_sent="") + " WITHOUT ROWID;"
    "CREATE INDEX messages_ready ON messages (priority, due_at) WHERE state = 1;",
    # schema 4: a rowid table whose rows hold their payload
    4: OLD_MESSAGES.format(maybe_sent="maybe_sent INTEGER NOT NULL DEFAULT 0, ") + ";"
    "CREATE INDEX messages_fresh ON messages (priority, due_at) WHERE state = 1 AND attempts = 0;",
}


@pytest.mark.parametrize("version", sorted(OLD_SCHEMAS))
async def test_an_old_outbox_is_upgraded_in_place(tmp_path: Path, version: int) -> None:
    """Opening a schema 2 or 4 data directory moves every payload to the payloads table and
    rebuilds messages as a rowid table of the current layout (schema 2 also gains maybe_sent and
    the lane indexes), keeping every row; queued messages are then claimed with their payloads,
    and new ones accepted after them get payloads of their own."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(f"{OLD_SCHEMAS[version]} PRAGMA user_version={version};")
    old_rows = [
        ("m1", 1, 2, 5.0, 0.0, "order", 3, "fr", "a@example.com", b"\x01\x02", 1, "sg"),
        ("m0", 2, 1, 4.0, 0.0, "order", 3, "", "b@example.com", b"\x03" * 3000, 1, "sg"),
        ("m2", 1, 1, 6.0, 0.0, "welcome", 1, "", "c@example.com", b"\x04", 0, ""),
    ]
    conn.executemany(
        "INSERT INTO messages (id, state, priority, due_at, lease_until, template_id,"
        " template_version, locale, recipient, payload, attempts, esp, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 2)",
        old_rows,
    )
    conn.commit()
    conn.close()
    db = Database(path, synchronous="OFF")
    await db.open()
    await db.close()
    conn = sqlite3.connect(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(messages)")}
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()
    rows = conn.execute(
        "SELECT m.id, state, priority, due_at, lease_until, template_id, template_version,"
        " locale, recipient, p.payload, attempts, esp, maybe_sent"
        " FROM messages m JOIN payloads p ON p.id = m.payload_id ORDER BY m.id"
    ).fetchall()
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    (version_now,) = conn.execute("PRAGMA user_version").fetchone()
    conn.close()
    assert version_now == 5
    assert {"maybe_sent", "payload_id"} <= columns and "payload" not in columns
    assert {"messages_fresh", "messages_retry"} <= indexes and "messages_ready" not in indexes
    assert "WITHOUT ROWID" not in sql.upper() and "messages_new" not in tables
    assert rows == sorted((*row, 0) for row in old_rows)
    db = Database(path, synchronous="OFF")  # opened again: nothing left to upgrade
    await db.open()
    outbox = Outbox(db, idempotency_ttl=60.0)
    new = NewMessage("m3", 1, 1.0, "welcome", 1, "", "d@example.com", b"\x05\x06")
    await outbox.accept([new])
    claimed = await outbox.claim(10, 60.0)
    await db.close()
    # queued: m1 (a retry, attempts 1) and the fresh m2, m3; m0 was sent
    assert {c.id: c.payload for c in claimed} == {
        "m1": b"\x01\x02",
        "m2": b"\x04",
        "m3": b"\x05\x06",
    }
