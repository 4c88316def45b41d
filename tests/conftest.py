"""Shared fixtures: the real service as a subprocess on a free port, next to the ESP simulator.

`swu_server` starts `python -m swu_delivery serve` with a config pointing at the simulator
subprocess (from tests/fixtures_sim.py), waits for its "listening on" line, and stops it after
the test. The handle can stop it with SIGTERM, kill -9 it, and restart it on the same data
directory, so crash recovery is tested against the real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from swu_delivery._proto.swu.delivery.v1 import (
    delivery_pb2,
    delivery_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)

pytest_plugins = ["tests.fixtures_sim"]

SIM_KEY_ENV = "SWU_TEST_SENDGRID_KEY"
STATE_NAMES = {v: k.removeprefix("MESSAGE_STATE_") for k, v in delivery_pb2.MessageState.items()}
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 20.0


def write_config(
    path: Path,
    data_dir: Path,
    sim_url: str,
    extra: str = "",
    default_esp: str = "sg",
    delivery: dict[str, int | float] | None = None,
    grace: float = 10,
    esp_timeout: float = 5,
) -> Path:
    """A test config: a SendGrid account "sg" at the simulator (plus `extra` TOML), fast retries.

    `extra` may add more `[[esp]]` tables; `default_esp` picks the account messages go to;
    `delivery` overrides settings of the `[delivery]` table.
    """
    lanes = {
        "max_attempts": 4,
        "retry_base": 0.05,
        "retry_max": 0.5,
        "idle_poll": 0.05,
        "claim_batch": 200,
        **(delivery or {}),
    }
    lane_lines = "\n".join(f"{key} = {value}" for key, value in lanes.items())
    path.write_text(
        f"""
listen = "127.0.0.1:0"
data_dir = "{data_dir}"
grace_seconds = {grace}
log_level = "INFO"

[webhooks]
listen = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[delivery]
default_esp = "{default_esp}"
{lane_lines}

[[esp]]
name = "sg"
kind = "sendgrid"
base_url = "{sim_url}"
api_key_env = "{SIM_KEY_ENV}"
sender = "orders@shop.example.com"
sender_name = "Shop"
timeout = {esp_timeout}
{extra}
"""
    )
    return path


class ServerHandle:
    """A running `swu-delivery serve` subprocess and a gRPC channel to it."""

    def __init__(self, config: Path, data_dir: Path, sim: Any) -> None:
        self.config = config
        self.data_dir = data_dir
        self.sim = sim
        self.proc: subprocess.Popen[str] | None = None
        self.target = ""
        self.log: list[str] = []
        self.env: dict[str, str] = {}  # extra environment, e.g. webhook secrets for the config
        self.serve_args: list[str] = []  # extra `serve` arguments, e.g. ["--workers", "2"]
        self.webhooks = ""  # base URL of the webhook server: POST {webhooks}/webhooks/<account>
        self.metrics = ""  # base URL of the metrics server: GET {metrics}/metrics
        self._channel: grpc.Channel | None = None
        self._drainer: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, SIM_KEY_ENV: "sim-key", "PYTHONUNBUFFERED": "1", **self.env}
        command = [sys.executable, "-m", "swu_delivery", "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            [*command, *self.serve_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if line.startswith("swu-delivery webhooks on "):
                self.webhooks = "http://" + line.split()[-1]
            if line.startswith("swu-delivery metrics on "):
                self.metrics = "http://" + line.split()[-1]
            if line.startswith("swu-delivery listening on "):
                self.target = line.split()[-1]
                self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
                self._drainer.start()
                self._channel = grpc.insecure_channel(self.target)
                return
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line)

    @property
    def channel(self) -> grpc.Channel:
        assert self._channel is not None, "server not started"
        return self._channel

    @property
    def delivery(self) -> delivery_pb2_grpc.DeliveryServiceStub:
        return delivery_pb2_grpc.DeliveryServiceStub(self.channel)

    @property
    def templates(self) -> template_pb2_grpc.TemplateServiceStub:
        return template_pb2_grpc.TemplateServiceStub(self.channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the process to exit; returns its exit code."""
        self._close_channel()
        proc = self.proc
        if proc is None:
            return 0
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise
        finally:
            self._join_drainer(proc)
        return proc.returncode

    def _join_drainer(self, proc: subprocess.Popen[str]) -> None:
        """Wait for the server's stdout to reach EOF: every process holding it has exited.

        A child the server left behind (e.g. the template-check worker outliving a kill -9)
        would keep the pipe open; that is a leak, so it fails the test instead of hanging it.
        """
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            drainer.join(timeout=DRAIN_TIMEOUT)
            if drainer.is_alive():
                raise AssertionError("a process the server started outlived it")
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, message_id: str) -> delivery_pb2.Message:
        request = delivery_pb2.GetMessageRequest(message_id=message_id)
        return self.delivery.GetMessage(request).message

    def wait_for_state(
        self,
        message_ids: Iterable[str],
        states: Iterable[str] = ("SENT", "FAILED"),
        timeout: float = 60.0,
    ) -> dict[str, delivery_pb2.Message]:
        """Poll GetMessage until every message is in one of `states`; returns them by id."""
        wanted = set(states)
        pending = list(dict.fromkeys(message_ids))
        done: dict[str, delivery_pb2.Message] = {}
        deadline = time.monotonic() + timeout
        while pending:
            still = []
            for mid in pending:
                msg = self.get(mid)
                if STATE_NAMES[msg.state] in wanted:
                    done[mid] = msg
                else:
                    still.append(mid)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    states_now = {STATE_NAMES[self.get(m).state] for m in pending[:20]}
                    raise AssertionError(f"{len(pending)} messages still not done: {states_now}")
                time.sleep(0.05)
        return done

    def put_template(
        self,
        template_id: str,
        contents: dict[str, tuple[str, str, str]],
        default_locale: str = "en",
    ) -> template_pb2.CreateTemplateResponse:
        """Create a template from {locale: (subject, html, text)}."""
        return self.templates.CreateTemplate(
            template_pb2.CreateTemplateRequest(
                template_id=template_id,
                default_locale=default_locale,
                contents=[
                    template_pb2.LocaleContent(locale=loc, subject=s, html=h, text=t)
                    for loc, (s, h, t) in contents.items()
                ],
            )
        )


@pytest.fixture
def swu_server(tmp_path: Path, esp_simulator: Any) -> Iterator[ServerHandle]:
    """The real service, started on a free port against the ESP simulator."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url)
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.start()
    yield handle
    handle.stop()
