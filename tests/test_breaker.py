"""The circuit breaker's state machine, driven by a fake clock: no sleeps."""

from __future__ import annotations

from adapters.base import SendOutcome
from swu_delivery.breaker import Breaker, BreakerState

FAIL = SendOutcome.retry("esp 503: unavailable")
OK = SendOutcome.sent("esp-1")
THROTTLED = SendOutcome.retry("esp 429", rate_limited=True)
BAD_ADDRESS = SendOutcome.rejected("esp 422: invalid address")
DEFERRED = SendOutcome(FAIL.kind, reason="not sent, rate limit", deferred=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock, failures: int = 3, cooldown: float = 30.0) -> Breaker:
    breaker = Breaker("primary", failures=failures, cooldown=cooldown, clock=clock)
    breaker.record([FAIL] * failures)
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_opens_after_a_run_of_retryable_failures() -> None:
    """N-1 failures keep it closed; the Nth in a row opens it, and it admits nothing."""
    breaker = Breaker("primary", failures=3, clock=Clock())
    breaker.record([FAIL, FAIL])
    assert breaker.state is BreakerState.CLOSED and breaker.admit()
    breaker.record([FAIL])
    assert breaker.state is BreakerState.OPEN and not breaker.admit()


def test_a_success_resets_the_run() -> None:
    """Failures separated by a success never make a run of N."""
    breaker = Breaker("primary", failures=3, clock=Clock())
    breaker.record([FAIL, FAIL, OK, FAIL, FAIL])
    assert breaker.state is BreakerState.CLOSED


def test_throttling_permanent_errors_and_deferrals_do_not_count() -> None:
    """429s, bad addresses and rate-limit deferrals never open it, nor break a run."""
    breaker = Breaker("primary", failures=3, clock=Clock())
    breaker.record([THROTTLED, DEFERRED] * 10)
    breaker.record([FAIL, FAIL, THROTTLED, DEFERRED])
    assert breaker.state is BreakerState.CLOSED
    breaker.record([BAD_ADDRESS, FAIL, FAIL])  # a rejection is an answer: it resets the run
    assert breaker.state is BreakerState.CLOSED


def test_half_open_after_the_cooldown_admits_one_probe_batch() -> None:
    """Before the cooldown nothing passes; after it exactly one batch is admitted."""
    clock = Clock()
    breaker = opened(clock)
    assert breaker.wait() == 30.0
    clock.now += 29.9
    assert not breaker.admit()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN and breaker.wait() == 0.0
    assert breaker.admit()
    assert not breaker.admit()  # the probe is out


def test_probe_success_closes() -> None:
    """A successful probe batch closes the breaker."""
    clock = Clock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.admit()
    breaker.record([OK])
    assert breaker.state is BreakerState.CLOSED and breaker.admit()


def test_probe_failure_reopens_for_another_cooldown() -> None:
    """A failed probe opens it again, counted from the probe's answer."""
    clock = Clock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.admit()
    breaker.record([FAIL])
    assert breaker.state is BreakerState.OPEN
    assert breaker.probe_at == clock.now + 30


def test_throttled_probe_lets_the_next_batch_probe() -> None:
    """A probe answered only by a 429 decides nothing: the next batch probes again."""
    clock = Clock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.admit()
    breaker.record([THROTTLED])
    assert breaker.state is BreakerState.HALF_OPEN and breaker.admit()


def test_subscribers_see_every_change() -> None:
    """The callback gets (breaker, old, new) for each transition; unsubscribing stops it."""
    clock = Clock()
    seen: list[tuple[str, str, str]] = []
    breaker = Breaker("primary", failures=1, cooldown=5, clock=clock)
    stop = breaker.subscribe(lambda b, old, new: seen.append((b.name, old.value, new.value)))
    breaker.record([FAIL])
    clock.now += 5
    breaker.admit()
    breaker.record([OK])
    stop()
    breaker.record([FAIL])
    assert seen == [
        ("primary", "closed", "open"),
        ("primary", "open", "half_open"),
        ("primary", "half_open", "closed"),
    ]
