"""A circuit breaker per ESP account: stop calling an account that keeps failing, probe it later.

    CLOSED ──(N retryable failures in a row)──▶ OPEN ──(cooldown over)──▶ HALF_OPEN
       ▲                                         ▲                          │
       └──────────(the probe batch succeeds)─────┼──────────────────────────┤
                                                 └──(the probe batch fails)─┘

Only failures that say the account is unwell count: 5xx, timeouts, refused or dropped
connections. A 429 is the rate limiter's business, a permanent per-message rejection (a bad
address) is the message's, and a call the limiter deferred was never made; none of them moves
the breaker. Half-open admits one batch at a time. Time comes from an injected clock.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable

from adapters.base import OutcomeKind, SendOutcome

__all__ = ["Breaker", "BreakerState", "counts_as_failure"]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through; failures are counted
    OPEN = "open"  # no calls until the cooldown is over
    HALF_OPEN = "half_open"  # one probe batch at a time decides: close or open again


Listener = Callable[["Breaker", BreakerState, BreakerState], None]  # (breaker, old, new)


def counts_as_failure(outcome: SendOutcome) -> bool:
    """A retryable outcome that says the account is unwell (not throttled, not deferred)."""
    return outcome.kind is OutcomeKind.RETRY and not (outcome.rate_limited or outcome.deferred)


def counts_as_success(outcome: SendOutcome) -> bool:
    """The account answered about the message itself: accepted it, or refused it for good."""
    return outcome.kind is not OutcomeKind.RETRY


class Breaker:
    """The breaker of one ESP account."""

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("failures must be >= 1 and cooldown >= 0")
        self.name = name
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self._state = BreakerState.CLOSED
        self._run = 0  # retryable failures in a row while closed
        self._opened_at = 0.0
        self._probing = False  # a half-open probe batch is out
        self._listeners: list[Listener] = []

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose cooldown is over reads as half-open."""
        if self._state is BreakerState.OPEN and self.clock() >= self.probe_at:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    @property
    def probe_at(self) -> float:
        """When an open breaker lets its next probe through (clock time)."""
        return self._opened_at + self.cooldown

    def wait(self) -> float:
        """Seconds until this breaker admits a call again (0 when it would now)."""
        state = self.state
        if state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing):
            return 0.0
        if state is BreakerState.HALF_OPEN:  # a probe is out; its answer decides soon
            return self.cooldown
        return max(0.0, self.probe_at - self.clock())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(breaker, old, new)` on every state change; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def admit(self) -> bool:
        """May a batch go to this account now? A half-open admit is the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record(self, outcomes: Iterable[SendOutcome]) -> None:
        """Feed the outcomes of one admitted batch, in order."""
        outcomes = list(outcomes)
        if self._state is BreakerState.HALF_OPEN and self._probing:
            self._probing = False
            if any(counts_as_success(o) for o in outcomes):
                self._close()
            elif any(counts_as_failure(o) for o in outcomes):
                self._open()
            return  # throttled or deferred only: the next batch probes again
        if self._state is not BreakerState.CLOSED:
            return  # a batch admitted before the breaker opened: its answer is stale
        for outcome in outcomes:
            if counts_as_success(outcome):
                self._run = 0
            elif counts_as_failure(outcome):
                self._run += 1
                if self._run >= self.failures:
                    self._open()
                    return

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._run = 0
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._run = 0
        self._move(BreakerState.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new:
            for listener in list(self._listeners):
                listener(self, old, new)
