"""The simulator's HTTP server, assembled from the registered providers plus its /_sim/ admin API.

Admin API (JSON, no auth):

    GET    /_sim/health                      {"status": "ok"}
    GET    /_sim/requests?provider=&status=  {"requests": [record, ...]}, oldest first
    DELETE /_sim/requests                    forget records and counters
    GET    /_sim/stats                       exact counts per provider, status and second; in_flight
    GET    /_sim/faults                      rates, latency, seed and the remaining rules
    PUT    /_sim/faults                      replace them (omitted settings: start-up values)
    POST   /_sim/faults/rules                append one rule

A record is ``{seq, provider, received_at, status, message_id, recipients, headers, body}``;
status 0 means the connection was dropped, and ``body`` is absent without --record-bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from swu_delivery.simulator.brevo import BrevoProvider
from swu_delivery.simulator.core import (
    DROPPED,
    Fault,
    FaultAction,
    FaultPlan,
    Provider,
    Rejection,
    RequestLog,
    SimulatorConfig,
    Submission,
)
from swu_delivery.simulator.mailgun import MailgunProvider
from swu_delivery.simulator.mailjet import MailjetProvider
from swu_delivery.simulator.postmark import PostmarkProvider
from swu_delivery.simulator.resend import ResendProvider
from swu_delivery.simulator.sendgrid import SendGridProvider
from swu_delivery.simulator.sparkpost import SparkPostProvider

PROVIDERS: dict[str, type[Provider]] = {
    "postmark": PostmarkProvider,
    "resend": ResendProvider,
    "mailjet": MailjetProvider,
    "brevo": BrevoProvider,
    "sendgrid": SendGridProvider,
    "mailgun": MailgunProvider,
    "sparkpost": SparkPostProvider,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulation:
    """The state one simulator shares between its provider routes and its admin API."""

    def __init__(self, config: SimulatorConfig, providers: Mapping[str, type[Provider]]) -> None:
        self.config = config
        self.providers = [cls(config.keys_for(name)) for name, cls in providers.items()]
        self.log = RequestLog(config.max_records)
        self.faults = FaultPlan(config)

    def endpoint(self, provider: Provider) -> Handler:
        """The handler for `provider`'s routes: check, inject a fault or accept, then record."""

        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                submission = await provider.receive(request)
            except Rejection as rejection:
                await _pause(self.faults.base_delay())
                status = rejection.response.status
                self.log.add(provider, status, request, body=self._body(rejection.raw))
                return rejection.response
            fault = self.faults.decide(provider.name, submission.recipients)
            self.log.in_flight += 1
            try:
                await _pause(fault.delay_s)
            finally:
                self.log.in_flight = max(self.log.in_flight - 1, 0)  # clear() may have reset it
            if fault.action is FaultAction.DROP:
                if request.transport is not None:
                    request.transport.close()  # aiohttp's write then fails, quietly
                response: web.Response = web.Response()
                status, message_id = DROPPED, None
            else:
                response, message_id = self._respond(provider, submission, fault)
                status = response.status
            count, body = len(submission.recipients), self._body(submission.raw)
            self.log.add(
                provider, status, request, message_id=message_id, recipients=count, body=body
            )
            return response

        return answer

    def _respond(
        self, provider: Provider, submission: Submission, fault: Fault
    ) -> tuple[web.Response, str | None]:
        match fault.action:
            case None:
                return provider.accept(submission)
            case FaultAction.RATE_LIMIT:
                reset_at = math.ceil(time.time() + self.faults.settings["retry_after_s"])
                return provider.rate_limited(reset_at), None
            case FaultAction.REJECT:
                return provider.reject_recipient(submission, fault.recipient), None
            case _:
                return provider.server_error(int(fault.action)), None

    def _body(self, raw: bytes | None) -> orjson.Fragment | None:
        return orjson.Fragment(raw) if raw is not None and self.config.record_bodies else None


SIMULATION = web.AppKey("simulation", Simulation)


async def _pause(delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json")


def _admin_routes(sim: Simulation) -> list[web.RouteDef]:
    async def health(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def list_requests(request: web.Request) -> web.Response:
        provider, status = request.query.get("provider"), request.query.get("status")
        if status is not None and not status.lstrip("-").isdigit():
            return _json({"error": "status is an integer"}, 400)
        wanted = None if status is None else int(status)
        found = [
            record
            for record in sim.log.records
            if (provider is None or record["provider"] == provider)
            and (wanted is None or record["status"] == wanted)
        ]
        return _json({"requests": found})

    async def clear_requests(_: web.Request) -> web.Response:
        sim.log.clear()
        return web.Response(status=204)

    async def stats(_: web.Request) -> web.Response:
        return _json(sim.log.stats())

    async def faults(_: web.Request) -> web.Response:
        return _json(sim.faults.describe())

    async def replace_faults(request: web.Request) -> web.Response:
        try:
            settings = orjson.loads(await request.read())
            if not isinstance(settings, dict):
                raise ValueError("fault settings are a JSON object")
            sim.faults.replace(settings)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json(sim.faults.describe())

    async def add_rule(request: web.Request) -> web.Response:
        try:
            sim.faults.add_rule(orjson.loads(await request.read()))
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json(sim.faults.describe(), 201)

    return [
        web.get("/_sim/health", health),
        web.get("/_sim/requests", list_requests),
        web.delete("/_sim/requests", clear_requests),
        web.get("/_sim/stats", stats),
        web.get("/_sim/faults", faults),
        web.put("/_sim/faults", replace_faults),
        web.post("/_sim/faults/rules", add_rule),
    ]


def create_app(
    config: SimulatorConfig | None = None, providers: Mapping[str, type[Provider]] | None = None
) -> web.Application:
    """The simulator as an aiohttp application; its `Simulation` is at ``app[SIMULATION]``."""
    sim = Simulation(config or SimulatorConfig(), PROVIDERS if providers is None else providers)
    app = web.Application(client_max_size=max(p.max_body_bytes for p in sim.providers))
    app[SIMULATION] = sim
    for provider in sim.providers:
        answer = sim.endpoint(provider)
        for method, path in provider.routes:
            app.router.add_route(method, path, answer)
    app.add_routes(_admin_routes(sim))
    return app


async def start_simulator(config: SimulatorConfig | None = None) -> tuple[web.AppRunner, str]:
    """Serve the simulator in the running loop; returns its runner and base URL."""
    config = config or SimulatorConfig()
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    return runner, f"http://{host}:{port}"


async def _serve(config: SimulatorConfig) -> int:
    runner, url = await start_simulator(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    print(f"esp-simulator listening on {url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()
    return 0


def _parse_args(argv: Sequence[str] | None) -> SimulatorConfig:
    parser = argparse.ArgumentParser(
        prog="esp-simulator", description="Answer ESP APIs locally, record requests, inject faults."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of requests throttled")
    parser.add_argument("--rate-5xx", type=float, default=0.0, help="share answered 500 or 503")
    parser.add_argument("--rate-drop", type=float, default=0.0, help="share of connections cut")
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="makes the random faults repeatable")
    parser.add_argument("--max-records", type=int, default=100_000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="[PROVIDER=]KEY",
        help="a key to accept, for one provider or all; repeatable (default: sim-key)",
    )
    parser.add_argument("--no-record-bodies", dest="record_bodies", action="store_false")
    args = vars(parser.parse_args(argv))
    api_keys: dict[str, set[str]] = {}
    for entry in args.pop("api_key"):
        name, _, key = entry.partition("=")
        scoped = name in PROVIDERS and bool(key)
        for provider in [name] if scoped else PROVIDERS:
            api_keys.setdefault(provider, set()).add(key if scoped else entry)
    try:
        config = SimulatorConfig(api_keys=api_keys, **args)
        FaultPlan(config)  # rejects impossible rates at start-up rather than per request
    except ValueError as exc:
        parser.error(str(exc))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT; the `esp-simulator` command."""
    config = _parse_args(argv)
    try:
        import uvloop
    except ImportError:  # no uvloop on Windows
        return asyncio.run(_serve(config))
    return uvloop.run(_serve(config))
