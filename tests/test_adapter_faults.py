"""Transport faults every HTTP adapter must survive, against the ESP simulator's fault rules.

For each provider: a 500 or 503 answer, an answer slower than the account's timeout, a refused
connection and a connection closed without an answer each make the message retryable (never
rejected, never counted as throttling), with a reason naming the provider and, for a 5xx,
carrying the text of the simulator's provider-shaped error body. Timeouts and dropped
connections are `maybe_sent` (the request was written, so no failover); a 5xx with its error
body and a refused connection are not. Provider-specific errors (bad keys, refused
recipients, 429 wait signals) are tested in each provider's own module. The dispatcher's
handling of such outcomes end to end is in tests/test_send.py.
"""

from __future__ import annotations

import uuid

import pytest

from adapters.base import OutboundEmail, OutcomeKind
from tests import adapter_kit as kit
from tests.fixtures_sim import SimulatorHandle

# Per provider: how its reasons start, and the error text of its 500 and 503 bodies.
PROVIDERS: dict[str, tuple[str, dict[int, str]]] = {
    "sendgrid": (
        "SendGrid",
        {
            500: "An error occurred on a SendGrid server.",
            503: "The SendGrid v3 Web API is not available.",
        },
    ),
    "postmark": (
        "Postmark",
        {
            500: "ErrorCode 0: Internal server error.",
            503: "ErrorCode 100: Postmark is offline for scheduled maintenance. "
            "Please retry later.",
        },
    ),
    "resend": (
        "Resend",
        {
            500: "internal_server_error: An unexpected error occurred.",
            503: "internal_server_error: An unexpected error occurred.",
        },
    ),
    "mailgun": ("Mailgun", {500: "Internal Server Error", 503: "Service Unavailable"}),
    "sparkpost": ("SparkPost", {500: "internal server error", 503: "service unavailable"}),
    "brevo": (
        "Brevo",
        {
            500: "internal_error: An internal error occurred, please retry",
            503: "internal_error: An internal error occurred, please retry",
        },
    ),
    "mailjet": ("Mailjet", {500: "Internal Server Error", 503: "Service Unavailable"}),
}
assert set(PROVIDERS) == set(kit.HTTP_KINDS), "every HTTP provider is covered here"

LATENCY_MS = 1500  # the simulator's delay before answering ...
TIMEOUT_S = 0.3  # ... is well past the account's timeout

kinds = pytest.mark.parametrize("kind", list(PROVIDERS))


def fresh_message(kind: str) -> OutboundEmail:
    """Message 0 with an id of its own: Resend's simulator remembers Idempotency-Keys."""
    return kit.message(0, message_id=f"{kind}-{uuid.uuid4().hex[:12]}")


@kinds
@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_retried_not_throttled(
    esp_simulator: SimulatorHandle, kind: str, status: int
) -> None:
    """A 5xx answer is a retry (no throttling flag) whose reason carries the provider's text."""
    display, bodies = PROVIDERS[kind]
    esp_simulator.add_rule(action=str(status), provider=kind, times=1)
    async with kit.running(kit.account(kind, esp_simulator.url)) as adapter:
        (outcome,) = await adapter.send([fresh_message(kind)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, False)
    assert outcome.reason == f"{display} {status}: {bodies[status]}"
    assert not outcome.maybe_sent  # the provider's error body: it refused the request
    assert [r["status"] for r in esp_simulator.requests(provider=kind)] == [status]


@kinds
async def test_timeout_is_retried(esp_simulator: SimulatorHandle, kind: str) -> None:
    """An answer slower than the account's timeout ends the call as a retry."""
    display, _ = PROVIDERS[kind]
    esp_simulator.add_rule(action="latency", latency_ms=LATENCY_MS, provider=kind, times=1)
    async with kit.running(kit.account(kind, esp_simulator.url, timeout=TIMEOUT_S)) as adapter:
        (outcome,) = await adapter.send([fresh_message(kind)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, False)
    assert outcome.reason == f"{display}: TimeoutError"
    assert outcome.maybe_sent  # the request was written: it must not fail over
    # The request did reach the provider; its late answer is recorded here, not in a later test.
    assert len(kit.wait_for_records(esp_simulator, kind, 1)) == 1


@kinds
async def test_dropped_connection_is_retried(esp_simulator: SimulatorHandle, kind: str) -> None:
    """A connection closed without an answer is a retry."""
    display, _ = PROVIDERS[kind]
    esp_simulator.add_rule(action="drop", provider=kind, times=1)
    async with kit.running(kit.account(kind, esp_simulator.url)) as adapter:
        (outcome,) = await adapter.send([fresh_message(kind)])
    assert (outcome.kind, outcome.rate_limited) == (OutcomeKind.RETRY, False)
    assert outcome.reason.startswith(f"{display}: ServerDisconnectedError")
    assert outcome.maybe_sent
    assert [r["status"] for r in esp_simulator.requests(provider=kind)] == [0]


@kinds
async def test_refused_connection_is_surely_not_sent(kind: str) -> None:
    """Nothing listens at the account's URL: a retry that may fail over (not maybe_sent)."""
    url = f"http://127.0.0.1:{kit.free_port()}"
    async with kit.running(kit.account(kind, url)) as adapter:
        (outcome,) = await adapter.send([fresh_message(kind)])
    assert (outcome.kind, outcome.maybe_sent) == (OutcomeKind.RETRY, False)
    assert "ClientConnectorError" in outcome.reason
