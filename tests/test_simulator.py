"""The ESP simulator over real HTTP: SendGrid's Mail Send contract, records and faults."""

from __future__ import annotations

import io
import time
import urllib.error
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from swu_delivery.simulator import SimulatorConfig, start_simulator
from tests.fixtures_sim import SimulatorHandle, run_simulator

KEY = {"Authorization": "Bearer sim-key"}
Mail = dict[str, Any]


def mail(*recipients: str, **fields: Any) -> Mail:
    """A valid Mail Send body: one personalization per recipient, plain text before HTML."""
    body: Mail = {
        "personalizations": [{"to": [{"email": r}]} for r in recipients or ["jane@example.com"]],
        "from": {"email": "orders@shop.example.com", "name": "Shop"},
        "subject": "Your order shipped",
        "content": [
            {"type": "text/plain", "value": "Hi Jane"},
            {"type": "text/html", "value": "<p>Hi Jane</p>"},
        ],
        "custom_args": {"swu_message_id": "m-1"},
    }
    return body | fields


async def send(
    url: str, body: Mail | bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST to /v3/mail/send; returns status, headers and the parsed JSON body (or None)."""
    raw_body = body if isinstance(body, bytes) else orjson.dumps(body)
    data = io.BytesIO(raw_body) if len(raw_body) > 1024**2 else raw_body  # as aiohttp advises
    headers = KEY if headers is None else headers
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v3/mail/send", data=data, headers=headers) as response,
    ):
        raw = await response.read()
        return response.status, dict(response.headers), orjson.loads(raw) if raw else None


async def test_valid_request_is_accepted_and_recorded(esp_simulator: SimulatorHandle) -> None:
    """A valid request gets 202, an X-Message-Id, and is recorded without its key."""
    body = mail()
    status, headers, answer = await send(esp_simulator.url, body)
    assert (status, answer) == (202, None)
    message_id = headers["X-Message-Id"]
    assert len(message_id) == 22
    assert message_id.replace("-", "").replace("_", "").isalnum()
    (record,) = esp_simulator.requests(provider="sendgrid", status=202)
    assert record["message_id"] == message_id
    assert record["body"] == body
    assert record["recipients"] == 1
    assert "authorization" not in {name.lower() for name in record["headers"]}
    assert "sim-key" not in orjson.dumps(record).decode()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sim-key"}],
    ids=["missing", "wrong-key", "not-bearer"],
)
async def test_bad_key_is_unauthorized(
    esp_simulator: SimulatorHandle, headers: dict[str, str]
) -> None:
    """A missing or wrong key gets SendGrid's 401 body."""
    status, _, answer = await send(esp_simulator.url, mail(), headers)
    assert status == 401
    assert answer == {
        "errors": [
            {
                "message": "The provided authorization grant is invalid, expired, or revoked",
                "field": None,
                "help": None,
            }
        ]
    }


def _edit(path: str, value: Any) -> Callable[[Mail], None]:
    """A change to a mail: set (or, with value ..., delete) the dotted `path`."""

    def change(body: Mail) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value

    return change


def _recipients(count: int) -> list[dict[str, str]]:
    return [{"email": f"r{i}@example.com"} for i in range(count)]


INVALID = {
    "no-personalizations": (_edit("personalizations", ...), "personalizations"),
    "empty-personalizations": (_edit("personalizations", []), "personalizations"),
    "1001-personalizations": (
        _edit("personalizations", [{"to": [r]} for r in _recipients(1001)]),
        "personalizations",
    ),
    "no-to": (_edit("personalizations.0.to", ...), "personalizations.0.to"),
    "bad-to": (_edit("personalizations.0.to.0.email", "jane"), "personalizations.0.to.0.email"),
    "bad-cc": (_edit("personalizations.0.cc", [{"email": "x@"}]), "personalizations.0.cc.0.email"),
    "1001-recipients": (
        _edit("personalizations", [{"to": _recipients(500)}, {"to": _recipients(501)}]),
        "personalizations",
    ),
    "duplicate": (
        _edit("personalizations.0.bcc", [{"email": "JANE@example.com"}]),
        "personalizations.0.bcc.0.email",
    ),
    "no-from": (_edit("from", ...), "from"),
    "bad-from": (_edit("from.email", "shop"), "from.email"),
    "no-subject": (_edit("subject", ...), "subject"),
    "empty-subject": (_edit("subject", ""), "subject"),
    "no-content": (_edit("content", ...), "content"),
    "empty-content": (_edit("content", []), "content"),
    "no-type": (_edit("content.0.type", ...), "content.0.type"),
    "empty-value": (_edit("content.1.value", ""), "content.1.value"),
    "html-first": (
        _edit(
            "content", [{"type": "text/html", "value": "<p>"}, {"type": "text/plain", "value": "p"}]
        ),
        "content.1.type",
    ),
    "bad-reply-to": (_edit("reply_to", {"email": "nobody"}), "reply_to.email"),
    "custom-arg-not-string": (_edit("custom_args.attempt", 2), "custom_args.attempt"),
    "custom-args-too-big": (
        _edit("personalizations.0.custom_args", {"big": "x" * 10_000}),
        "personalizations.0.custom_args",
    ),
    "11-categories": (_edit("categories", [f"c{i}" for i in range(11)]), "categories"),
    "long-category": (_edit("categories", ["c" * 256]), "categories.0"),
    "header-not-string": (_edit("headers", {"X-Attempt": 2}), "headers.X-Attempt"),
    "reserved-header": (_edit("headers", {"Reply-To": "a@example.com"}), "headers.Reply-To"),
    "no-filename": (_edit("attachments", [{"content": "aGk="}]), "attachments.0.filename"),
    "not-base64": (
        _edit("attachments", [{"content": "hi there!", "filename": "a.txt"}]),
        "attachments.0.content",
    ),
    "inline-without-cid": (
        _edit("attachments", [{"content": "aGk=", "filename": "a.png", "disposition": "inline"}]),
        "attachments.0.content_id",
    ),
}


@pytest.mark.parametrize(("change", "field"), INVALID.values(), ids=INVALID.keys())
async def test_invalid_request_names_its_field(
    esp_simulator: SimulatorHandle, change: Callable[[Mail], None], field: str
) -> None:
    """Each documented validation rule answers 400 naming the offending field."""
    body = mail()
    change(body)
    status, _, answer = await send(esp_simulator.url, body)
    assert status == 400
    assert [error["field"] for error in answer["errors"]] == [field]
    (error,) = answer["errors"]
    assert error["message"]
    assert error["help"].startswith("http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/")
    assert esp_simulator.requests(status=400)[0]["body"] == body


async def test_every_error_is_reported_at_once(esp_simulator: SimulatorHandle) -> None:
    """Several problems in one body come back as several errors."""
    body = mail(**{"from": {"email": "shop"}, "categories": ["c"] * 11})
    del body["subject"]
    status, _, answer = await send(esp_simulator.url, body)
    assert status == 400
    assert {e["field"] for e in answer["errors"]} == {"from.email", "subject", "categories"}


async def test_subject_may_come_from_every_personalization(
    esp_simulator: SimulatorHandle,
) -> None:
    """Without a global subject, a subject in each personalization is enough."""
    body = mail("a@example.com", "b@example.com")
    del body["subject"]
    for envelope in body["personalizations"]:
        envelope["subject"] = "Hi"
    status, _, _ = await send(esp_simulator.url, body)
    assert status == 202


async def test_malformed_json_is_a_bad_request(esp_simulator: SimulatorHandle) -> None:
    """A body that is not JSON gets SendGrid's bare "Bad Request"."""
    status, _, answer = await send(esp_simulator.url, b'{"personalizations": [')
    assert status == 400
    assert answer == {"errors": [{"message": "Bad Request", "field": None, "help": None}]}


async def test_body_over_30_mb_is_too_large(esp_simulator: SimulatorHandle) -> None:
    """A body over 30 MB gets 413 and is not recorded with a body."""
    attachment = {"content": "A" * (30 * 1024 * 1024), "filename": "big.bin"}
    status, _, answer = await send(esp_simulator.url, mail(attachments=[attachment]))
    assert status == 413
    assert answer["errors"][0]["message"].endswith("is too large.")
    (record,) = esp_simulator.requests(status=413)
    assert "body" not in record


async def test_scripted_429_carries_a_future_reset(esp_simulator: SimulatorHandle) -> None:
    """A scripted 429 has SendGrid's rate-limit headers, the reset being in the future."""
    esp_simulator.set_faults(retry_after_s=30, rules=[{"action": "429", "times": 1}])
    status, headers, answer = await send(esp_simulator.url, mail())
    assert status == 429
    assert answer == {"errors": [{"field": None, "message": "too many requests"}]}
    assert headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["X-RateLimit-Limit"]) > 0
    assert int(headers["X-RateLimit-Reset"]) > time.time()
    assert esp_simulator.requests(status=429)[0]["message_id"] is None


async def test_scripted_500_hits_only_its_recipient(esp_simulator: SimulatorHandle) -> None:
    """A rule matching one recipient fails that recipient's requests and no others."""
    esp_simulator.add_rule(match_recipient="Down@Example.com", action="500")
    assert (await send(esp_simulator.url, mail("up@example.com")))[0] == 202
    status, _, answer = await send(esp_simulator.url, mail("down@example.com"))
    assert status == 500
    assert answer["errors"][0]["field"] is None
    assert (await send(esp_simulator.url, mail("down@example.com")))[0] == 500


async def test_scripted_drop_disconnects(esp_simulator: SimulatorHandle) -> None:
    """A dropped request closes the connection without any answer."""
    esp_simulator.add_rule(action="drop", times=1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send(esp_simulator.url, mail())
    assert [r["status"] for r in esp_simulator.requests()] == [0]
    assert (await send(esp_simulator.url, mail()))[0] == 202


async def test_scripted_400_names_the_recipient(esp_simulator: SimulatorHandle) -> None:
    """A "400" rule rejects permanently, naming the matched recipient's field."""
    esp_simulator.add_rule(match_recipient="bad@example.com", action="400")
    status, _, answer = await send(esp_simulator.url, mail("ok@example.com", "bad@example.com"))
    assert status == 400
    assert [e["field"] for e in answer["errors"]] == ["personalizations.1.to.0.email"]


async def test_rules_are_consumed_in_order(esp_simulator: SimulatorHandle) -> None:
    """Rules with `times` apply in order, that many times, then go away."""
    esp_simulator.add_rule(action="latency", latency_ms=1, times=1)
    esp_simulator.add_rule(action="503", times=2)
    esp_simulator.add_rule(action="429", times=1)
    statuses = [(await send(esp_simulator.url, mail()))[0] for _ in range(5)]
    assert statuses == [503, 503, 429, 202, 202]
    assert esp_simulator.faults()["rules"] == []


async def test_seeded_random_faults_repeat(esp_simulator: SimulatorHandle) -> None:
    """The same seed and rates give the same sequence of faults."""
    rates = {"rate_429": 0.3, "rate_5xx": 0.2, "rate_drop": 0.1, "seed": 7}
    runs = []
    for _ in range(2):
        esp_simulator.set_faults(**rates)
        statuses = []
        for _ in range(40):
            try:
                statuses.append((await send(esp_simulator.url, mail()))[0])
            except aiohttp.ServerDisconnectedError:
                statuses.append(0)
        runs.append(statuses)
    assert runs[0] == runs[1]
    assert {0, 202, 429} <= set(runs[0]) <= {0, 202, 429, 500, 503}


async def test_stats_count_per_second(esp_simulator: SimulatorHandle) -> None:
    """Stats count statuses exactly and accepted requests and recipients per second."""
    for _ in range(5):
        await send(esp_simulator.url, mail("a@example.com", "b@example.com"))
    await send(esp_simulator.url, mail(subject=""))
    stats = esp_simulator.stats()["providers"]["sendgrid"]
    assert stats["statuses"] == {"202": 5, "400": 1}
    assert stats["accepted_recipients"] == 10
    assert sum(stats["accepted_per_second"].values()) == 5
    assert sum(stats["recipients_per_second"].values()) == 10
    assert all(second.isdigit() for second in stats["accepted_per_second"])


def test_bad_fault_settings_are_refused(esp_simulator: SimulatorHandle) -> None:
    """Impossible rates or unknown actions are refused with 400 and change nothing."""
    for settings in ({"rate_429": 1.5}, {"rules": [{"action": "explode"}]}, {"colour": 1}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            esp_simulator.set_faults(**settings)
        assert refused.value.code == 400
    assert esp_simulator.faults()["rate_429"] == 0
    assert esp_simulator.health() == {"status": "ok"}


async def test_records_are_bounded_but_counts_exact() -> None:
    """With --max-records and --no-record-bodies, old records go but counters stay exact."""
    with run_simulator("--max-records", "3", "--no-record-bodies", "--api-key", "k1") as sim:
        for _ in range(5):
            await send(sim.url, mail(), {"Authorization": "Bearer k1"})
        records = sim.requests()
        assert [r["seq"] for r in records] == [3, 4, 5]
        assert all("body" not in r for r in records)
        assert sim.stats()["providers"]["sendgrid"]["statuses"] == {"202": 5}
        assert (await send(sim.url, mail()))[0] == 401


async def test_embedded_simulator_serves_in_process() -> None:
    """start_simulator runs inside the caller's event loop and returns its URL."""
    config = SimulatorConfig(port=0, api_keys={"sendgrid": {"embedded"}})
    runner, url = await start_simulator(config)
    try:
        status, headers, _ = await send(url, mail(), {"Authorization": "Bearer embedded"})
        assert status == 202
        assert headers["X-Message-Id"]
    finally:
        await runner.cleanup()
