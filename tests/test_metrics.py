"""Observability end to end: /metrics after a known run, health across shutdown, log hygiene."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from swu_delivery import metrics
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from tests.conftest import SIM_KEY_ENV, ServerHandle, write_config
from tests.helpers import ORDER, data, mk

SEND_BATCH = "/swu.delivery.v1.DeliveryService/SendBatch"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
METRIC_NAME = r"swu_delivery_[a-z_]+"


def scrape(server: ServerHandle) -> str:
    with urllib.request.urlopen(server.metrics + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def known_run(server: ServerHandle) -> list[str]:
    """4 valid messages (one meets a 500, one a 429), 2 invalid and 1 of an unknown template."""
    server.sim.add_rule(action="500", provider="sendgrid", times=1)
    server.sim.add_rule(action="429", provider="sendgrid", times=1)
    emails = [mk(to=f"person{i}@example.com", payload=data(i)) for i in range(4)]
    emails += [mk(to="not-an-address"), mk(to="also bad"), mk(template_id="nope")]
    response = server.delivery.SendBatch(
        delivery_pb2.SendBatchRequest(emails=emails), metadata=(("x-request-id", "req-42"),)
    )
    ids = [r.message_id for r in response.results if r.message_id]
    assert len(ids) == 4
    states = server.wait_for_state(ids)
    assert {m.state for m in states.values()} == {delivery_pb2.MESSAGE_STATE_SENT}
    return ids


@pytest.fixture
def server(tmp_path: Path, esp_simulator: Any) -> Any:
    """The service with a metrics port and a template, stopped after the test."""
    data_dir = tmp_path / "data"
    handle = ServerHandle(
        write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url), data_dir, esp_simulator
    )
    handle.start()
    handle.put_template("order", {"en": ORDER})
    yield handle
    if handle.proc is not None:
        handle.stop()


def test_counters_move_by_exactly_the_known_run(server: ServerHandle) -> None:
    """Each counter moves by what the run did: accepts, rejects, sends, retries, 429s, renders."""
    before = samples(scrape(server))
    known_run(server)
    after = samples(scrape(server))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("swu_delivery_intake_accepted_total") == 4
    assert moved("swu_delivery_intake_rejected_total", reason="invalid_argument") == 2
    assert moved("swu_delivery_intake_rejected_total", reason="not_found") == 1
    assert moved("swu_delivery_sends_total", esp="sg", outcome="sent") == 4
    assert moved("swu_delivery_sends_total", esp="sg", outcome="retry") == 1
    assert moved("swu_delivery_sends_total", esp="sg", outcome="throttled") == 1
    assert moved("swu_delivery_sends_total", esp="sg", outcome="rejected") == 0
    assert moved("swu_delivery_sends_total", esp="sg", outcome="deferred") == 0
    assert moved("swu_delivery_ratelimit_throttled_total", esp="sg") == 1
    assert moved("swu_delivery_retries_total") == 1  # the 500; a 429 keeps its attempt
    assert moved("swu_delivery_esp_request_seconds_count", esp="sg") == 6
    assert moved("swu_delivery_render_seconds_count") == 6
    assert moved("swu_delivery_grpc_requests_total", method=SEND_BATCH, code="OK") == 1
    assert moved("swu_delivery_grpc_request_seconds_count", method=SEND_BATCH) == 1
    assert moved("swu_delivery_template_compiles_total") >= 1
    for lane in ("transactional", "bulk", "retry"):
        assert value(after, "swu_delivery_outbox_depth_messages", lane=lane) == 0
    assert value(after, "swu_delivery_breaker_state", esp="sg") == 0


def test_grpc_errors_are_counted_by_status_code(server: ServerHandle) -> None:
    """A refused unary call counts under its status code, not OK."""
    with pytest.raises(grpc.RpcError):
        server.delivery.Send(delivery_pb2.SendRequest(email=mk(to="bad")))
    scraped = samples(scrape(server))
    send = "/swu.delivery.v1.DeliveryService/Send"
    assert value(scraped, "swu_delivery_grpc_requests_total", method=send, code="INVALID_ARGUMENT")
    assert value(scraped, "swu_delivery_grpc_requests_total", method=send, code="OK") == 0


def test_scrape_passes_promtool_check_metrics(server: ServerHandle) -> None:
    """`promtool check metrics` accepts a scrape taken after a run."""
    promtool = shutil.which("promtool")
    if promtool is None and not os.environ.get("SWU_REQUIRE_PROMTOOL"):
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    assert promtool is not None, "promtool is required here (SWU_REQUIRE_PROMTOOL)"
    known_run(server)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(server), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_health_serving_then_not_serving_while_draining(server: ServerHandle) -> None:
    """Overall and per-ESP health are SERVING; SIGTERM turns the service NOT_SERVING."""
    channel = grpc.insecure_channel(server.target)
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "swu.delivery.v1.DeliveryService", "swu.delivery.esp.sg"):
        check = stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert check.status == SERVING, name
    watched: list[int] = []
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = threading.Event()

    def watch() -> None:
        try:
            for response in stream:
                watched.append(response.status)
                first.set()
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert first.wait(10)
    assert server.stop() == 0
    watcher.join(10)
    channel.close()
    assert watched[0] == SERVING and NOT_SERVING in watched[1:]


def test_logs_are_json_without_secrets_or_recipients(server: ServerHandle) -> None:
    """At info level every log line is JSON and names no API key and no recipient."""
    known_run(server)
    server.stop()
    lines = [line for line in server.log if not line.startswith("swu-delivery ")]
    assert lines  # at least the start-up lines
    for line in lines:
        record = orjson.loads(line)
        assert {"time", "level", "logger", "message", "pid"} <= record.keys()
    text = "".join(server.log)
    assert "sim-key" not in text
    assert "@example.com" not in text.replace("orders@shop.example.com", "")


def test_debug_logs_tie_the_request_id_to_the_esp_call(tmp_path: Path, esp_simulator: Any) -> None:
    """At debug level the accept line carries the caller's request id and the ids the ESP got."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url)
    config.write_text(config.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"'))
    server = ServerHandle(config, data_dir, esp_simulator)
    server.start()
    try:
        server.put_template("order", {"en": ORDER})
        ids = known_run(server)
    finally:
        server.stop()
    records = [orjson.loads(x) for x in server.log if x.startswith("{")]
    accepted = [r for r in records if r["message"].startswith("accepted messages")]
    assert accepted and accepted[0]["request_id"] == "req-42"
    calls = [r for r in records if r["message"].startswith("call for messages")]
    assert all(r["esp"] == "sg" for r in calls)
    assert set(ids) <= {i for r in calls for i in ids if i in r["message"]}
    assert SIM_KEY_ENV not in "".join(server.log) and "sim-key" not in "".join(server.log)


def test_open_breaker_turns_its_esp_not_serving(tmp_path: Path, esp_simulator: Any) -> None:
    """Failures in a row open the account's circuit: its health entry and gauge say so."""
    data_dir = tmp_path / "data"
    breaker = "breaker_failures = 2\nbreaker_cooldown_seconds = 600\n"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=breaker)
    server = ServerHandle(config, data_dir, esp_simulator)
    server.start()
    try:
        server.put_template("order", {"en": ORDER})
        esp_simulator.add_rule(action="500", provider="sendgrid")
        emails = [mk(to=f"person{i}@example.com", payload=data(i)) for i in range(3)]
        server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
        stub = health_pb2_grpc.HealthStub(server.channel)
        request = health_pb2.HealthCheckRequest(service="swu.delivery.esp.sg")
        deadline = time.monotonic() + 20
        while stub.Check(request).status != NOT_SERVING:
            assert time.monotonic() < deadline, "the breaker did not open"
            time.sleep(0.05)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == SERVING  # the store is fine; only the account is not
        assert value(samples(scrape(server)), "swu_delivery_breaker_state", esp="sg") == 2
    finally:
        server.stop()


def test_dashboard_and_docs_use_exactly_the_defined_metrics() -> None:
    """The Grafana dashboard names only defined metrics; docs/operating.md describes each one."""
    defined = {
        c._name + ("_total" if c._type == "counter" else "")
        for c in vars(metrics).values()
        if isinstance(c, MetricWrapperBase)
    }
    docs = Path(__file__).parent.parent / "docs"
    dashboard = (docs / "grafana" / "swu-delivery.json").read_text()
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(METRIC_NAME, dashboard)}
    assert used == defined
    operating = (docs / "operating.md").read_text()
    assert {n for n in defined if f"| `{n}` |" not in operating} == set()


def test_outbox_gauges_count_queued_messages_per_lane(server: ServerHandle) -> None:
    """Scheduled messages count in their lane's depth; not yet due, they add no age."""
    later = Timestamp(seconds=int(time.time()) + 3600)
    emails = [mk(to=f"person{i}@example.com", payload=data(i), send_at=later) for i in range(3)]
    emails.append(mk(priority=delivery_pb2.PRIORITY_BULK, send_at=later))
    server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
    scraped = samples(scrape(server))
    depth = "swu_delivery_outbox_depth_messages"
    assert value(scraped, depth, lane="transactional") == 3
    assert value(scraped, depth, lane="bulk") == 1
    assert value(scraped, depth, lane="retry") == 0
    assert value(scraped, "swu_delivery_outbox_oldest_age_seconds", lane="transactional") == 0
