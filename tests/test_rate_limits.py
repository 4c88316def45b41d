"""Per-account rate limits end to end: the real server, the real simulator, its request records."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from adapters.base import Mailbox
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import ConfigError, EspAccount, load_config
from tests.adapter_kit import message, running
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, data, mk, sent_ids
from tests.test_config import SG, serve_with


def start(tmp_path: Path, sim: Any, limits: str, **delivery: int | float) -> ServerHandle:
    """The service with account "sg" at the simulator, `limits` added to its [[esp]] table."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, sim.url, extra=limits, delivery=delivery)
    server = ServerHandle(config, data_dir, sim)
    server.start()
    server.put_template("order", {"en": ORDER})
    return server


def send(server: ServerHandle, n: int, offset: int = 0) -> list[str]:
    emails = [mk(to=f"u{i}@example.com", payload=data(i)) for i in range(offset, offset + n)]
    response = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
    ids = [r.message_id for r in response.results]
    assert all(ids)
    return ids


def most_in_one_second(times: list[float]) -> int:
    """The most timestamps in any half-open one-second window [t, t + 1)."""
    times = sorted(times)
    return max(sum(1 for u in times if t <= u < t + 1) for t in times)


def accepted(server: ServerHandle) -> list[dict[str, Any]]:
    return server.sim.requests(provider="sendgrid", status=202)


@pytest.fixture
def servers() -> Any:
    """Servers a test started, stopped after it."""
    started: list[ServerHandle] = []
    yield started
    for server in started:
        server.stop()


def test_simulator_never_sees_more_than_rate_plus_burst_in_a_second(
    tmp_path: Path, esp_simulator: Any, servers: list[ServerHandle]
) -> None:
    """20/s with burst 5: 100 messages all SENT, no second of the ESP's records holds over 25."""
    server = start(tmp_path, esp_simulator, "messages_per_second = 20\nmessages_burst = 5\n")
    servers.append(server)
    # One message first, so connection set-up does not delay the first burst into a later second.
    warm_up = send(server, 1, offset=1000)
    server.wait_for_state(warm_up, states=("SENT",))
    ids = send(server, 100)
    done = server.wait_for_state(ids, timeout=120)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    records = accepted(server)
    assert Counter(sent_ids(records)) == Counter([*warm_up, *ids])
    assert most_in_one_second([r["received_at"] for r in records]) <= 20 + 5


def test_throttled_account_pauses_and_every_message_is_sent_once(
    tmp_path: Path, esp_simulator: Any, servers: list[ServerHandle]
) -> None:
    """429s with a reset time for a while: all SENT, each accepted once; 429s cost no attempt."""
    esp_simulator.set_faults(retry_after_s=1)
    # One recipient is throttled more often than max_attempts allows: only refunds save it.
    esp_simulator.add_rule(action="429", match_recipient="u7@example.com", times=4)
    esp_simulator.add_rule(action="429", times=10)
    server = start(tmp_path, esp_simulator, "messages_per_second = 50\n", max_attempts=2)
    servers.append(server)
    ids = send(server, 40)
    done = server.wait_for_state(ids, timeout=120)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert Counter(sent_ids(accepted(server))) == Counter(ids)
    assert len(esp_simulator.requests(provider="sendgrid", status=429)) == 14
    assert {m.attempts for m in done.values()} == {1}
    throttled = server.get(ids[7])
    deferred = [e for e in throttled.events if e.type == delivery_pb2.EVENT_TYPE_DEFERRED]
    assert len(deferred) >= 4 and all("429" in e.detail for e in deferred[:4])


def test_slow_account_defers_what_cannot_start_within_the_lease(
    tmp_path: Path, esp_simulator: Any, servers: list[ServerHandle]
) -> None:
    """2/s and a 6 s lease: most of 16 messages are deferred, none counts an attempt or repeats."""
    server = start(
        tmp_path,
        esp_simulator,
        "messages_per_second = 2\nmessages_burst = 1\n",
        lease_seconds=6,
        max_attempts=1,  # a counted deferral would fail the message
    )
    servers.append(server)
    ids = send(server, 16)
    done = server.wait_for_state(ids, timeout=120)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert {m.attempts for m in done.values()} == {1}
    assert Counter(sent_ids(accepted(server))) == Counter(ids)
    deferrals = [
        e
        for m in done.values()
        for e in m.events
        if e.type == delivery_pb2.EVENT_TYPE_DEFERRED and "rate limit of account sg" in e.detail
    ]
    assert deferrals, "nothing was deferred; the test proved nothing"


@pytest.mark.parametrize(
    ("more", "expected"),
    [
        ("messages_per_second = -1", "esp[0].messages_per_second: must be a number >= 0"),
        ('requests_per_second = "10"', "esp[0].requests_per_second: must be a number >= 0"),
        ("messages_per_second = inf", "esp[0].messages_per_second: must be finite"),
        ("messages_burst = 2.5\nmessages_per_second = 1", "esp[0].messages_burst: must be an"),
        ("requests_burst = -3\nrequests_per_second = 1", "esp[0].requests_burst: must be an"),
        ("messages_burst = 5", "esp[0].messages_burst: needs messages_per_second"),
        ("max_concurrency = 0", "esp[0].max_concurrency: must be an integer >= 1"),
    ],
    ids=[
        "negative",
        "string",
        "inf",
        "float-burst",
        "negative-burst",
        "burst-alone",
        "conc",
    ],
)
def test_bad_rate_limit_keys_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, more: str, expected: str
) -> None:
    """Each invalid rate-limit key is refused with a message naming it."""
    monkeypatch.setenv("SWU_TEST_CONFIG_KEY", "k")
    config = tmp_path / "swu.toml"
    config.write_text(SG.format(name="a", more=more))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("more", "expected"),
    [
        ("messages_per_second = -5", "esp[0].messages_per_second: must be a number >= 0"),
        ("messages_per_sec = 5", "esp a: unknown key 'messages_per_sec' for kind 'sendgrid'"),
    ],
    ids=["negative", "typo"],
)
def test_bad_rate_limit_stops_serve_with_one_line(tmp_path: Path, more: str, expected: str) -> None:
    """`serve` exits 2 with the key named and no traceback; a misspelt key is refused."""
    done = serve_with(tmp_path, SG.format(name="a", more=more))
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_rate_limit_keys_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rates may be fractional; absent keys mean unlimited with default bursts."""
    monkeypatch.setenv("SWU_TEST_CONFIG_KEY", "k")
    config = tmp_path / "swu.toml"
    more = "messages_per_second = 0.5\nrequests_per_second = 10\nrequests_burst = 3"
    config.write_text(SG.format(name="a", more=more) + SG.format(name="b", more=""))
    a, b = load_config(config).esps
    assert (a.messages_per_second, a.messages_burst) == (0.5, 0)
    assert (a.requests_per_second, a.requests_burst) == (10, 3)
    assert (b.messages_per_second, b.requests_per_second) == (0, 0)


class QuotaEndpoint:
    """A loopback HTTP peer answering SES v2 `GetAccount` with a set status and quota."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body
        self.calls = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def answer(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.json_response(self.body, status=self.status)

    async def __aenter__(self) -> QuotaEndpoint:
        app = web.Application()
        app.router.add_get("/v2/email/account", self.answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def ses_account(url: str, **fields: Any) -> EspAccount:
    options = {"region": "us-east-1", "access_key_id": "testing"}
    return EspAccount(
        name="ses",
        kind="ses",
        base_url=url,
        api_key="testing",
        timeout=5,
        **fields,
        options=options,
    )


QUOTA = {"SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 0.0}}


async def test_ses_paces_by_its_send_quota_and_counts_recipients() -> None:
    """No messages_per_second: SES reads MaxSendRate at start; a message costs its recipients."""
    async with QuotaEndpoint(200, QUOTA) as endpoint, running(ses_account(endpoint.url)) as ses:
        assert endpoint.calls == 1
        assert ses.limiter.messages is not None and ses.limiter.messages.rate == 14
        copies = [Mailbox(f"c{i}@example.com") for i in range(2)]
        assert ses.call_cost([message(1, cc=copies), message(2)]) == 4


async def test_ses_configured_rate_wins_and_quota_is_not_read() -> None:
    """messages_per_second set: GetAccount is never called."""
    endpoint = QuotaEndpoint(200, QUOTA)
    async with endpoint, running(ses_account(endpoint.url, messages_per_second=5)) as ses:
        assert endpoint.calls == 0
        assert ses.limiter.messages is not None and ses.limiter.messages.rate == 5


async def test_ses_without_quota_access_runs_unpaced_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GetAccount refused (403): the adapter still starts, unpaced, with a warning naming why."""
    denied = {"__type": "AccessDeniedException", "message": "not authorized to ses:GetAccount"}
    async with QuotaEndpoint(403, denied) as endpoint, running(ses_account(endpoint.url)) as ses:
        assert endpoint.calls == 1
        assert ses.limiter.messages is None
    assert "esp ses: sending quota not read (ClientError" in caplog.text
    assert "testing" not in caplog.text
