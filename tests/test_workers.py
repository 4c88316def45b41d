"""`serve --workers N` end to end: two forked workers on one port, one outbox, one rate limit."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, data, mk, sent_ids
from tests.test_rate_limits import most_in_one_second

RATE, BURST = 100, 10
# The kernel spreads connections over the workers by a hash: with 20, all landing on one worker
# has a chance of 2 in 2**20 (with 8 it was 1 in 128, and CI once saw it).
CHANNELS = 20
PER_CHANNEL = 20


def worker_lines(server: ServerHandle, message: str) -> list[dict[str, Any]]:
    """The workers' JSON log lines whose message starts with `message`."""
    lines = []
    for line in list(server.log):
        if line.startswith("{"):
            record = orjson.loads(line)
            if "worker" in record and record["message"].startswith(message):
                lines.append(record)
    return lines


def wait_for_workers(server: ServerHandle, n: int, timeout: float = 30.0) -> set[int]:
    """The pids of the `n` workers, once each logged that it serves."""
    deadline = time.monotonic() + timeout
    while len(pids := {r["pid"] for r in worker_lines(server, "serving on")}) < n:
        assert time.monotonic() < deadline, "the workers did not all start:\n" + "".join(server.log)
        time.sleep(0.05)
    return pids


def start(
    tmp_path: Path, sim: Any, extra: str = "", workers: int = 2, **delivery: float
) -> ServerHandle:
    """The service with `workers` worker processes and DEBUG logs (they name accepting pids)."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, sim.url, extra=extra, delivery=delivery)
    config.write_text(config.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"'))
    server = ServerHandle(config, data_dir, sim)
    server.serve_args = ["--workers", str(workers)]
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[ServerHandle]]:
    """Servers a test started, stopped after it."""
    started: list[ServerHandle] = []
    yield started
    for server in started:
        server.stop()


def own_channels(target: str, n: int) -> list[grpc.Channel]:
    """`n` channels with a connection each (no shared subchannel), so workers share them."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.insecure_channel(target, options=options) for _ in range(n)]


def reconnect(server: ServerHandle, message_id: str, timeout: float = 30.0) -> None:
    """A new connection for `server`'s channel, once it answers (as a client retries)."""
    deadline = time.monotonic() + timeout
    while True:
        server._close_channel()
        server._channel = own_channels(server.target, 1)[0]
        try:
            server.get(message_id)
            return
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_two_workers_share_the_port_and_send_each_message_once_within_the_rate(
    tmp_path: Path, esp_simulator: Any, servers: list[ServerHandle]
) -> None:
    """400 messages over 20 connections: both workers accept, each sent once, total rate held."""
    limits = f"messages_per_second = {RATE}\nmessages_burst = {BURST}\n"
    server = start(tmp_path, esp_simulator, limits)
    servers.append(server)
    pids = wait_for_workers(server, 2)
    server.put_template("order", {"en": ORDER})
    channels = own_channels(server.target, CHANNELS)
    ids: list[str] = []
    try:
        for c, channel in enumerate(channels):
            stub = delivery_pb2_grpc.DeliveryServiceStub(channel)
            first = c * PER_CHANNEL
            emails = [
                mk(to=f"u{i}@example.com", payload=data(i))
                for i in range(first, first + PER_CHANNEL)
            ]
            response = stub.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
            ids += [r.message_id for r in response.results]
        assert all(ids) and len(set(ids)) == CHANNELS * PER_CHANNEL
        done = server.wait_for_state(ids, timeout=120)
        assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
        for channel in channels:  # any worker answers for any message
            stub = delivery_pb2_grpc.DeliveryServiceStub(channel)
            got = stub.GetMessage(delivery_pb2.GetMessageRequest(message_id=ids[-1])).message
            assert STATE_NAMES[got.state] == "SENT"
    finally:
        for channel in channels:
            channel.close()
    records = esp_simulator.requests(provider="sendgrid", status=202)
    assert Counter(sent_ids(records)) == Counter(ids)
    assert most_in_one_second([r["received_at"] for r in records]) <= RATE + BURST
    accepting = {r["pid"] for r in worker_lines(server, "accepted messages")}
    assert accepting == pids, "new connections should reach both workers"
    assert server.stop(signal.SIGTERM) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_claims_of_a_killed_worker_are_taken_over_when_their_lease_ends(
    tmp_path: Path, esp_simulator: Any, servers: list[ServerHandle]
) -> None:
    """kill -9 of one worker mid-delivery: its claims expire and every message is still sent."""
    lanes: dict[str, float] = {"claim_batch": 10, "max_inflight_batches": 1, "lease_seconds": 2}
    server = start(tmp_path, esp_simulator, **lanes)
    servers.append(server)
    pids = wait_for_workers(server, 2)
    server.put_template("order", {"en": ORDER})
    esp_simulator.set_faults(latency_ms=200)
    emails = [mk(to=f"u{i}@example.com", payload=data(i)) for i in range(200)]
    response = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails))
    ids = [r.message_id for r in response.results]
    deadline = time.monotonic() + 30
    while len(esp_simulator.requests(provider="sendgrid", status=202)) < 20:
        assert time.monotonic() < deadline, "nothing was delivered"
        time.sleep(0.02)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    esp_simulator.set_faults(latency_ms=0)
    reconnect(server, ids[0])  # its connection may have been the victim's
    done = server.wait_for_state(ids, timeout=120)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    delivered = Counter(sent_ids(esp_simulator.requests(provider="sendgrid", status=202)))
    assert set(delivered) == set(ids)
    twice = [mid for mid, n in delivered.items() if n > 1]
    assert len(twice) <= lanes["claim_batch"]  # at most the victim's one batch in flight
    restarted = wait_for_workers(server, 3)  # the supervisor replaced the dead worker
    assert victim in restarted
    assert server.stop(signal.SIGTERM) == 1  # a worker died abnormally during the run
