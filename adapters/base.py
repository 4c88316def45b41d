"""The one pipeline every ESP adapter follows: split → build request → send → per-message outcomes.

An adapter module only turns rendered messages into a provider request and the provider's answer
into one `SendOutcome` per message. The base owns the HTTP session, timeouts, size checks,
batch splitting by the adapter's declared `BatchLimits`, error wrapping and the default status
classification (2xx parse, 429 rate-limited, 408/5xx retryable, other 4xx permanent).
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, TypeVar

import aiohttp
import orjson

from swu_delivery import metrics
from swu_delivery.config import EspAccount
from swu_delivery.logs import ESP
from swu_delivery.ratelimit import AccountLimiter, Deferred, account_limits

T = TypeVar("T")

__all__ = [
    "Adapter",
    "AdapterError",
    "Attachment",
    "BatchLimits",
    "HttpAdapter",
    "HttpRequest",
    "HttpResponse",
    "Mailbox",
    "OutboundEmail",
    "OutcomeKind",
    "SendOutcome",
    "retry_after_seconds",
]

log = logging.getLogger("adapters")


class AdapterError(Exception):
    """An adapter cannot be built from its account config (missing option, bad URL)."""


class OutcomeKind(enum.Enum):
    """What one ESP call did for one message."""

    SENT = "sent"  # the ESP accepted the message; esp_message_id identifies it there
    REJECTED = "rejected"  # permanent: the same request will never succeed; do not retry
    RETRY = "retry"  # transient (throttled, 5xx, timeout, dropped connection): try again later


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """One message's result from one ESP call."""

    kind: OutcomeKind
    esp_message_id: str = ""
    reason: str = ""  # names the ESP, the status and the provider's own text
    retry_after: float | None = None  # seconds, when the provider said how long to wait
    rate_limited: bool = False  # the provider throttled us (429 or its equivalent)
    deferred: bool = False  # never sent: the account's rate limit had no room in time
    # The request may have reached the ESP (a timeout or a dropped connection after it was
    # written): the ESP may have accepted the message, so it must not move to another account.
    maybe_sent: bool = False

    @classmethod
    def sent(cls, esp_message_id: str) -> SendOutcome:
        return cls(OutcomeKind.SENT, esp_message_id=esp_message_id)

    @classmethod
    def rejected(cls, reason: str) -> SendOutcome:
        return cls(OutcomeKind.REJECTED, reason=reason)

    @classmethod
    def retry(
        cls,
        reason: str,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
        maybe_sent: bool = False,
    ) -> SendOutcome:
        return cls(
            OutcomeKind.RETRY,
            reason=reason,
            retry_after=retry_after,
            rate_limited=rate_limited,
            maybe_sent=maybe_sent,
        )


@dataclass(frozen=True, slots=True)
class Mailbox:
    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str = ""  # set: inline, referenced from HTML as cid:<content_id>


@dataclass(slots=True, kw_only=True)
class OutboundEmail:
    """A rendered message, ready for an ESP. `message_id` is ours, injected for correlation."""

    message_id: str
    sender: Mailbox
    to: Mailbox
    subject: str
    html: str = ""
    text: str = ""
    cc: Sequence[Mailbox] = ()
    bcc: Sequence[Mailbox] = ()
    reply_to: Mailbox | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    attachments: Sequence[Attachment] = ()

    @property
    def recipient_count(self) -> int:
        return 1 + len(self.cc) + len(self.bcc)

    def estimated_size(self) -> int:
        """Bytes on the wire, roughly: bodies plus base64-grown attachments."""
        size = len(self.subject) + len(self.html) + len(self.text) + 1024
        return size + sum((len(a.content) + 2) // 3 * 4 for a in self.attachments)


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """What one provider call can carry; the base splits batches by these."""

    messages_per_call: int = 1  # distinct messages in one request
    recipients_per_message: int = 50
    bytes_per_call: int = 10 * 1024 * 1024


_TYPE_WORDS: dict[type, str] = {str: "a string", int: "an integer", bool: "true or false"}


def account_option(account: EspAccount, key: str, kind: type[T], default: T) -> T:
    """The provider-specific `key` of the account's `[[esp]]` table, type-checked."""
    value = account.options.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = _TYPE_WORDS.get(kind, kind.__name__)
        raise AdapterError(f"esp {account.name}: {key} must be {expected}")
    return value


class Adapter(ABC):
    """Sends rendered messages to one ESP account. Subclasses set `kind` and `limits`."""

    kind: ClassVar[str]
    display_name: ClassVar[str]
    limits: ClassVar[BatchLimits] = BatchLimits()
    option_keys: ClassVar[frozenset[str]] = frozenset()  # provider keys of its [[esp]] table
    counts_recipients: ClassVar[bool] = False  # its quota counts recipients, not messages
    # Transport errors raised before any of the request left us (no connection was made): the
    # ESP surely has not got the message. Every other transport error may come after the
    # request was written, so its outcome is `maybe_sent`.
    not_sent_errors: ClassVar[tuple[type[BaseException], ...]] = (
        aiohttp.ClientConnectorError,  # refused, unreachable, DNS, TLS handshake
        aiohttp.ConnectionTimeoutError,  # connect (or pool) timeout: nothing was written
        ConnectionRefusedError,
    )

    def __init__(self, account: EspAccount) -> None:
        if unknown := sorted(set(account.options) - self.option_keys):
            own = ", ".join(sorted(self.option_keys)) or "none"
            raise AdapterError(
                f"esp {account.name}: unknown key {unknown[0]!r} for kind {self.kind!r} "
                f"(its own keys: {own})"
            )
        self.account = account
        self.limiter = AccountLimiter(account_limits(account))  # paces every provider call

    async def start(self) -> None:  # noqa: B027 (optional hook: most adapters need nothing)
        """Open long-lived resources (sessions, clients, pools)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what start() opened."""

    def split(self, emails: Sequence[OutboundEmail]) -> list[list[OutboundEmail]]:
        """Pack messages into calls within the declared limits, keeping their order."""
        calls: list[list[OutboundEmail]] = []
        current: list[OutboundEmail] = []
        size = 0
        for email in emails:
            esize = email.estimated_size()
            full = len(current) >= self.limits.messages_per_call
            if current and (full or size + esize > self.limits.bytes_per_call):
                calls.append(current)
                current, size = [], 0
            current.append(email)
            size += esize
        if current:
            calls.append(current)
        return calls

    def precheck(self, email: OutboundEmail) -> SendOutcome | None:
        """A permanent outcome for a message the provider would refuse anyway, else None."""
        if email.recipient_count > self.limits.recipients_per_message:
            return SendOutcome.rejected(
                f"{self.display_name}: {email.recipient_count} recipients; "
                f"the limit is {self.limits.recipients_per_message} per message"
            )
        size = email.estimated_size()
        if size > self.limits.bytes_per_call:
            return SendOutcome.rejected(
                f"{self.display_name}: message is {size} bytes with attachments base64-encoded; "
                f"the limit is {self.limits.bytes_per_call}"
            )
        return None

    async def send(
        self, emails: Sequence[OutboundEmail], *, horizon: float | None = None
    ) -> list[SendOutcome]:
        """Deliver `emails`; returns one outcome per message, in order. Never raises.

        Each provider call waits for the account's limiter; a call that could not start within
        `horizon` seconds is not made, and its messages get a `deferred` outcome.
        """
        outcomes: list[SendOutcome | None] = [self.precheck(e) for e in emails]
        todo = [(i, e) for i, e in enumerate(emails) if outcomes[i] is None]
        calls = self.split([e for _, e in todo])
        results = await asyncio.gather(*(self._paced_call(call, horizon) for call in calls))
        flat = [outcome for result in results for outcome in result]
        for (i, _), outcome in zip(todo, flat, strict=True):
            outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def call_cost(self, call: Sequence[OutboundEmail]) -> int:
        """Tokens `call` takes from the account's messages bucket."""
        return sum(e.recipient_count for e in call) if self.counts_recipients else len(call)

    async def _paced_call(
        self, call: list[OutboundEmail], horizon: float | None
    ) -> list[SendOutcome]:
        ESP.set(self.account.name)  # for log lines of this call (its own task)
        counted = metrics.esp_metrics(self.account.name)
        asked = time.monotonic()
        try:
            permit = await self.limiter.acquire(self.call_cost(call), horizon=horizon)
        except Deferred as exc:
            reason = (
                f"{self.display_name}: not sent, rate limit of account {self.account.name} "
                f"(room expected in {exc.wait:.1f} s)"
            )
            deferred = SendOutcome(
                OutcomeKind.RETRY, reason=reason, retry_after=exc.wait, deferred=True
            )
            counted.deferred.inc(len(call))
            return [deferred] * len(call)
        outcomes: list[SendOutcome] = []
        started = time.monotonic()
        try:
            outcomes = await self._send_call(call)
        finally:  # cancelled too: the slot must come back
            throttled = [o for o in outcomes if o.rate_limited]
            waits = [o.retry_after for o in throttled if o.retry_after is not None]
            self.limiter.finish(
                permit, throttled=bool(throttled), retry_after=max(waits, default=None)
            )
        metrics.count_call(counted, asked, started, time.monotonic(), outcomes)
        if log.isEnabledFor(logging.DEBUG):  # message ids tie the call to its accepting request
            kinds = [o.kind.value for o in outcomes]
            log.debug("call for messages %s: %s", [e.message_id for e in call], kinds)
        return outcomes

    async def _send_call(self, call: list[OutboundEmail]) -> list[SendOutcome]:
        try:
            outcomes = await self.send_call(call)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = f"{self.display_name}: {type(exc).__name__}: {exc}".rstrip(": ")
            maybe_sent = not isinstance(exc, self.not_sent_errors)
            return [SendOutcome.retry(reason, maybe_sent=maybe_sent)] * len(call)
        if len(outcomes) != len(call):  # an adapter bug must not lose messages
            reason = (
                f"{self.display_name}: adapter returned {len(outcomes)} outcomes for {len(call)}"
            )
            return [SendOutcome.retry(reason)] * len(call)
        return outcomes

    @abstractmethod
    async def send_call(self, call: list[OutboundEmail]) -> list[SendOutcome]:
        """One provider call for `call` (already within limits); may raise transport errors."""


@dataclass(slots=True, kw_only=True)
class HttpRequest:
    """What an HTTP adapter asks the base to send."""

    path: str  # appended to the account's base URL
    json: Any = None  # serialized with orjson
    data: Any = None  # form data (aiohttp.FormData) or raw bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


EPOCH_S_FLOOR = 1_000_000_000  # 2001-09-09 in epoch seconds: larger values are not deltas
EPOCH_MS_FLOOR = 1_000_000_000_000  # the same instant in epoch milliseconds
LARGE_BODY_BYTES = 1024 * 1024


def retry_after_seconds(
    headers: Mapping[str, str], *names: str, now: float | None = None
) -> float | None:
    """Seconds to wait from the first present header: a delta, an epoch time or an HTTP date."""
    now = time.time() if now is None else now
    for name in names:
        value = headers.get(name)
        if not value:
            continue
        value = value.strip()
        try:
            number = float(value)
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                continue
        # Large numbers are absolute epoch times (X-RateLimit-Reset), in seconds or in
        # milliseconds; small ones are deltas in seconds.
        if number > EPOCH_MS_FLOOR:
            number /= 1000.0
        return max(0.0, number - now) if number > EPOCH_S_FLOOR else max(0.0, number)
    return None


class HttpAdapter(Adapter):
    """An adapter over one shared keep-alive aiohttp session per account."""

    default_base_url: ClassVar[str] = ""
    retry_after_headers: ClassVar[tuple[str, ...]] = ("Retry-After",)

    def __init__(self, account: EspAccount) -> None:
        super().__init__(account)
        self.base_url = (account.base_url or self.default_base_url).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise AdapterError(f"esp {account.name}: base_url must be an http(s) URL")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.account.max_concurrency, keepalive_timeout=60, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # ESP APIs authenticate by header; a cookie jar would only cost CPU on every call.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self.account.timeout),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            headers=self.auth_headers(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def auth_headers(self) -> dict[str, str]:
        """Headers sent on every request (authentication)."""
        return {}

    @abstractmethod
    def build_request(self, call: list[OutboundEmail]) -> HttpRequest:
        """The provider request for `call`."""

    @abstractmethod
    def parse_success(self, call: list[OutboundEmail], response: HttpResponse) -> list[SendOutcome]:
        """Outcomes from a 2xx response."""

    def error_reason(self, response: HttpResponse) -> str:
        """The provider's own error text from a non-2xx response."""
        return response.text()

    def classify_error(
        self, call: list[OutboundEmail], response: HttpResponse
    ) -> list[SendOutcome]:
        """Outcomes from a non-2xx response: 429 throttled, 408/5xx retryable, else permanent."""
        status = response.status
        reason = f"{self.display_name} {status}: {self.error_reason(response)}".rstrip(": ")
        if status == 429:
            wait = retry_after_seconds(response.headers, *self.retry_after_headers)
            return [SendOutcome.retry(reason, retry_after=wait, rate_limited=True)] * len(call)
        if status == 408 or status >= 500:
            wait = retry_after_seconds(response.headers, *self.retry_after_headers)
            # A 5xx with the provider's error body refused the request; a gateway timeout or a
            # bare 5xx (a proxy's) may hide an ESP that accepted it after all.
            maybe = status == 504 or (status >= 500 and not response.body.strip())
            return [SendOutcome.retry(reason, retry_after=wait, maybe_sent=maybe)] * len(call)
        return [SendOutcome.rejected(reason)] * len(call)

    async def send_call(self, call: list[OutboundEmail]) -> list[SendOutcome]:
        if self._session is None:
            raise RuntimeError(f"adapter {self.account.name} used before start()")
        request = self.build_request(call)
        body: Any = request.data
        headers = request.headers
        if request.json is not None:
            body = orjson.dumps(request.json)
            headers = {"Content-Type": "application/json", **headers}
        if isinstance(body, bytes) and len(body) > LARGE_BODY_BYTES:
            body = io.BytesIO(body)  # aiohttp streams it instead of warning about a large write
        async with self._session.request(
            request.method, self.base_url + request.path, data=body, headers=headers
        ) as resp:
            response = HttpResponse(resp.status, resp.headers, await resp.read())
        if 200 <= response.status < 300:
            return self.parse_success(call, response)
        return self.classify_error(call, response)
