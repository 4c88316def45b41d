"""The provider-independent parts of the ESP simulator, shared by every provider module."""

from __future__ import annotations

import abc
import binascii
import random
import re
import time
from collections import deque
from collections.abc import Mapping, Set
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, TypeGuard

import orjson
from aiohttp import web

DEFAULT_API_KEY = "sim-key"
PER_SECOND_WINDOW = 3600  # seconds of per-second counts kept in /_sim/stats
DROPPED = 0  # the status recorded for a connection closed without an answer
# Deliberately loose: one @, no spaces or brackets, a dotted domain. ESPs differ in the details.
_EMAIL = re.compile(r"[^@\s<>(),;:\"\[\]\\]+@[^@\s<>(),;:\"\[\]\\.]+(?:\.[^@\s<>(),;:\"\[\]\\.]+)+")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulator listens, whom it lets in and which faults it injects from the start."""

    host: str = "127.0.0.1"
    port: int = 8025  # 0 picks a free port
    api_keys: Mapping[str, Set[str]] = field(default_factory=dict)  # absent: sim-key
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    retry_after_s: float = 1.0
    seed: int | None = None
    max_records: int = 100_000
    record_bodies: bool = True

    def keys_for(self, provider: str) -> frozenset[str]:
        return frozenset(self.api_keys.get(provider, {DEFAULT_API_KEY}))


@dataclass(slots=True)
class Submission:
    """A request that passed the provider's checks."""

    payload: Any  # the parsed request, for the provider's own answers
    recipients: list[str]  # every recipient address, lower-cased
    raw: bytes | None = None  # the JSON document recorded when bodies are recorded


class Rejection(Exception):
    """Raised by a provider to answer a request at once, e.g. 401 or 400."""

    def __init__(self, response: web.Response, raw: bytes | None = None) -> None:
        super().__init__(response.status)
        self.response = response
        self.raw = raw


class Provider(abc.ABC):
    """One simulated ESP: how its requests are authenticated, checked and answered."""

    name: ClassVar[str]
    routes: ClassVar[tuple[tuple[str, str], ...]]  # (method, path) pairs
    max_body_bytes: ClassVar[int] = 1024**2
    secret_headers: ClassVar[frozenset[str]] = frozenset({"authorization"})  # never recorded

    def __init__(self, api_keys: frozenset[str]) -> None:
        self.api_keys = api_keys

    @abc.abstractmethod
    async def receive(self, request: web.Request) -> Submission:
        """Authenticate, read and check a request; raise `Rejection` to answer it at once."""

    @abc.abstractmethod
    def accept(self, submission: Submission) -> tuple[web.Response, str]:
        """The success answer and the message id it carries."""

    @abc.abstractmethod
    def rate_limited(self, reset_at: int) -> web.Response:
        """The 429 answer; `reset_at` is the Unix second when the window resets."""

    @abc.abstractmethod
    def server_error(self, status: int) -> web.Response: ...

    @abc.abstractmethod
    def reject_recipient(self, submission: Submission, recipient: str | None) -> web.Response:
        """A permanent rejection naming the field of `recipient` (or of the first recipient)."""


def is_email(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and _EMAIL.fullmatch(value) is not None


def is_base64(text: str) -> bool:
    try:
        binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        return False
    return True


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for "Invalid type" messages."""
    return _JSON_TYPES.get(type(value), "number")


class FaultAction(StrEnum):
    RATE_LIMIT = "429"  # the provider's rate-limit answer, with its reset headers
    SERVER_ERROR = "500"  # the provider's internal-error answer
    UNAVAILABLE = "503"  # the provider's service-unavailable answer
    REJECT = "400"  # a permanent rejection naming the recipient's field
    DROP = "drop"  # close the connection without answering
    LATENCY = "latency"  # wait, then go on to later rules


@dataclass(slots=True)
class FaultRule:
    """A scripted fault; `times` counts down to its removal, None applies it forever."""

    action: FaultAction
    match_recipient: str = ""  # empty matches any request
    provider: str = ""  # empty matches any provider
    latency_ms: float = 0.0
    times: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> FaultRule:
        keys = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not data.keys() <= keys:
            raise ValueError(f"a rule is an object with keys among {sorted(keys)}")
        times = data.get("times")
        if times is not None and (type(times) is not int or times < 1):
            raise ValueError("times must be a positive integer or null")
        return cls(
            action=FaultAction(str(data.get("action"))),
            match_recipient=str(data.get("match_recipient") or "").lower(),
            provider=str(data.get("provider") or ""),
            latency_ms=float(data.get("latency_ms") or 0),
            times=times,
        )


class Fault(NamedTuple):
    delay_s: float
    action: FaultAction | None  # None: answer normally
    recipient: str | None  # the address a rule matched on


class FaultPlan:
    """Decides per request what to inject: scripted rules in order, then seeded random rates."""

    _RATES: ClassVar[tuple[str, ...]] = ("rate_429", "rate_5xx", "rate_drop")
    _NUMBERS: ClassVar[tuple[str, ...]] = (
        *_RATES,
        "latency_ms",
        "latency_jitter_ms",
        "retry_after_s",
    )

    def __init__(self, baseline: SimulatorConfig) -> None:
        self._baseline = baseline
        self.replace({})

    def replace(self, settings: Mapping[str, Any]) -> None:
        """Set every fault at once; what `settings` leaves out returns to the start-up value."""
        unknown = set(settings) - {*self._NUMBERS, "seed", "rules"}
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        values = {n: float(settings.get(n, getattr(self._baseline, n))) for n in self._NUMBERS}
        if (
            any(not 0 <= values[n] <= 1 for n in self._RATES)
            or sum(values[n] for n in self._RATES) > 1
        ):
            raise ValueError("rates lie in [0, 1] and add up to at most 1")
        if min(values.values()) < 0:
            raise ValueError("latencies and retry_after_s are not negative")
        seed = settings.get("seed", self._baseline.seed)
        if seed is not None and type(seed) is not int:
            raise ValueError("seed is an integer or null")
        rules = [FaultRule.from_json(rule) for rule in settings.get("rules") or ()]
        self.settings = values
        self.seed: int | None = seed
        self.rules = rules
        self._draws = random.Random(self.seed)
        self._jitter = random.Random(self.seed)
        self._any_rate = any(values[n] for n in self._RATES)

    def add_rule(self, data: Any) -> None:
        self.rules.append(FaultRule.from_json(data))

    def describe(self) -> dict[str, Any]:
        rules = [asdict(rule) for rule in self.rules]
        return {**self.settings, "seed": self.seed, "rules": rules}

    def base_delay(self) -> float:
        latency, jitter = self.settings["latency_ms"], self.settings["latency_jitter_ms"]
        if jitter:
            latency += self._jitter.uniform(-jitter, jitter)
        return max(latency, 0.0) / 1000

    def decide(self, provider: str, recipients: list[str]) -> Fault:
        delay = self.base_delay()
        for rule in list(self.rules) if self.rules else ():
            if rule.provider not in ("", provider) or (
                rule.match_recipient and rule.match_recipient not in recipients
            ):
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    self.rules.remove(rule)
            if rule.action is FaultAction.LATENCY:
                delay += rule.latency_ms / 1000
                continue
            return Fault(delay, rule.action, rule.match_recipient or None)
        return Fault(delay, self._draw() if self._any_rate else None, None)

    def _draw(self) -> FaultAction | None:
        # One draw per request, so a seed fixes the whole sequence of faults.
        draw, s = self._draws.random(), self.settings
        for action, rate in (
            (FaultAction.DROP, s["rate_drop"]),
            (FaultAction.RATE_LIMIT, s["rate_429"]),
            (FaultAction.SERVER_ERROR, s["rate_5xx"] / 2),
            (FaultAction.UNAVAILABLE, s["rate_5xx"] / 2),
        ):
            if draw < rate:
                return action
            draw -= rate
        return None


class RequestLog:
    """The last `max_records` requests, with counters that stay exact when old records go."""

    def __init__(self, max_records: int) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.clear()

    def clear(self) -> None:
        self.records.clear()
        self._seq = 0
        self.in_flight = 0  # requests received and checked, not answered yet (delayed)
        # Header names and values mostly repeat, so records share one copy of each string.
        self._strings: dict[str, str] = {}
        self._statuses: dict[str, dict[int, int]] = {}
        self._recipients: dict[str, int] = {}
        self._per_second: dict[str, dict[int, list[int]]] = {}  # [requests, recipients]

    def add(
        self,
        provider: Provider,
        status: int,
        request: web.Request,
        *,
        message_id: str | None = None,
        recipients: int = 0,
        body: orjson.Fragment | None = None,
    ) -> None:
        """Record one answered (or dropped) request; `message_id` marks it accepted."""
        self._seq += 1
        now = time.time()
        if len(self._strings) > 10_000:  # a bound, against headers unique to each request
            self._strings.clear()
        share, secret = self._strings.setdefault, provider.secret_headers
        headers = {
            share(k, k): share(v, v) for k, v in request.headers.items() if k.lower() not in secret
        }
        record: dict[str, Any] = {"seq": self._seq, "provider": provider.name, "received_at": now}
        record |= {"status": status, "message_id": message_id, "recipients": recipients}
        record["headers"] = headers
        if body is not None:
            record["body"] = body
        self.records.append(record)
        statuses = self._statuses.setdefault(provider.name, {})
        statuses[status] = statuses.get(status, 0) + 1
        if message_id:
            self._count_accepted(provider.name, int(now), recipients)

    def _count_accepted(self, provider: str, second: int, recipients: int) -> None:
        self._recipients[provider] = self._recipients.get(provider, 0) + recipients
        seconds = self._per_second.setdefault(provider, {})
        counts = seconds.get(second)
        if counts is None:
            counts = seconds[second] = [0, 0]
            if len(seconds) > PER_SECOND_WINDOW:
                del seconds[next(iter(seconds))]
        counts[0] += 1
        counts[1] += recipients

    def stats(self) -> dict[str, Any]:
        providers = {}
        for name, statuses in self._statuses.items():
            seconds = self._per_second.get(name, {})
            providers[name] = {
                "requests": sum(statuses.values()),
                "statuses": statuses,
                "accepted_recipients": self._recipients.get(name, 0),
                "accepted_per_second": {s: c[0] for s, c in seconds.items()},
                "recipients_per_second": {s: c[1] for s, c in seconds.items()},
            }
        return {"requests": self._seq, "in_flight": self.in_flight, "providers": providers}
