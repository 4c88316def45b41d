"""Per-ESP-account pacing: token buckets, a cap on calls in flight, and slowing down on throttling.

Every provider call of an account asks its `AccountLimiter` for a `Permit` first and hands the
permit back with the call's result::

    permit = await limiter.acquire(cost, horizon=60)   # raises Deferred when it cannot start soon
    try:
        outcomes = await make_the_call()
    finally:
        limiter.finish(permit, throttled=..., retry_after=...)

A permit needs, in this order: a concurrency slot (at most `max_concurrency` calls in flight),
then its turn (calls take tokens first come, first served), then tokens from the messages bucket
(`cost` = messages, or recipients for providers whose quota counts them) and one token from the
requests bucket, and the end of any throttling pause. Tokens are taken only at the moment the
call may start, by the real clock, so a stalled event loop never lets a backlog of "owed" calls
out at once: in any window of T seconds the calls that start hold at most `burst + rate * T`
tokens (a single call costing more than the burst waits for a full bucket and then runs the
bucket into debt, which later calls pay back).

Throttling (a 429 or the provider's equivalent) pauses the account until the provider's wait
has passed, or an exponential backoff when it named none, and multiplies the rate down; calls
that then succeed raise it again step by step, never above the configured rate. With several
worker processes each gets `1/workers` of the configured limits (`RateLimits.per_worker`).

The clock and the sleep are injectable, so tests drive time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from swu_delivery.config import EspAccount

__all__ = [
    "AccountLimiter",
    "AdaptivePolicy",
    "Deferred",
    "Permit",
    "RateLimits",
    "TokenBucket",
    "account_limits",
    "default_burst",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_EPSILON = 1e-9  # seconds: float error in refills must not cost an extra wake-up


def default_burst(rate: float) -> int:
    """A tenth of a second's worth, at least 1: smooth pacing that survives loop jitter."""
    return max(1, math.ceil(rate / 10))


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """One process's share of an account's limits; a rate of 0 means unlimited."""

    messages_per_second: float = 0.0  # messages, or recipients when the adapter counts them
    messages_burst: int = 0  # 0: default_burst(messages_per_second)
    requests_per_second: float = 0.0  # provider API calls
    requests_burst: int = 0  # 0: default_burst(requests_per_second)
    max_concurrency: int = 64  # calls in flight at once

    def per_worker(self, workers: int) -> RateLimits:
        """This process's share when `workers` processes send for the same account.

        Bursts and the concurrency cap are rounded down (at least 1), so the processes together
        never exceed the configured limits unless a limit is smaller than the worker count.
        """
        if workers <= 1:
            return self
        return RateLimits(
            messages_per_second=self.messages_per_second / workers,
            messages_burst=max(1, self.message_burst // workers),
            requests_per_second=self.requests_per_second / workers,
            requests_burst=max(1, self.request_burst // workers),
            max_concurrency=max(1, self.max_concurrency // workers),
        )

    @property
    def message_burst(self) -> int:
        return self.messages_burst or default_burst(self.messages_per_second)

    @property
    def request_burst(self) -> int:
        return self.requests_burst or default_burst(self.requests_per_second)


def account_limits(account: EspAccount) -> RateLimits:
    """The limits of `account`'s `[[esp]]` table, for the whole account."""
    return RateLimits(
        messages_per_second=account.messages_per_second,
        messages_burst=account.messages_burst,
        requests_per_second=account.requests_per_second,
        requests_burst=account.requests_burst,
        max_concurrency=account.max_concurrency,
    )


@dataclass(frozen=True, kw_only=True)
class AdaptivePolicy:
    """How an account slows down when throttled and speeds up again (AIMD)."""

    decrease: float = 0.5  # the effective rate is multiplied by this per throttling episode
    floor: float = 0.05  # ... but never below this fraction of the configured rate
    increase: float = 0.1  # fraction of the configured rate given back per recovery step
    recover_every: float = 1.0  # seconds between two steps, each earned by a successful call
    backoff_base: float = 1.0  # pause when the provider named no wait; doubles per episode
    backoff_max: float = 60.0
    max_pause: float = 300.0  # a provider's longer wait is capped: we probe again by then


class Deferred(Exception):
    """The call cannot start within its horizon; `wait` is when the limiter expects room."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"no capacity for {wait:.3g} s")
        self.wait = wait


@dataclass(frozen=True, slots=True)
class Permit:
    """A call allowed to start; give it back with `AccountLimiter.finish`."""

    cost: int
    started: float  # limiter clock time the call started


class TokenBucket:
    """`rate` tokens a second up to `burst`; the level may go negative (debt) for big calls."""

    def __init__(self, rate: float, burst: int, *, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = float(burst)
        self._stamp = clock()

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._level = min(float(self.burst), self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    def set_rate(self, rate: float) -> None:
        """Change the refill rate from now on; time already passed refills at the old one."""
        self._refill()
        self.rate = rate

    def wait_time(self, cost: int, ahead: float = 0.0) -> float:
        """Seconds until a call of `cost` may take its tokens, after `ahead` tokens queued first.

        A call may start once the level covers its cost or, for a cost above the burst, once
        the bucket is full: otherwise it could never start.
        """
        self._refill()
        deficit = ahead + min(float(cost), float(self.burst)) - self._level
        wait = deficit / self.rate if deficit > 0 else 0.0
        return wait if wait > _EPSILON else 0.0

    def take(self, cost: int) -> None:
        self._refill()
        self._level -= cost


class AccountLimiter:
    """All pacing of one ESP account: messages and requests buckets, concurrency, throttling.

    `limits` are the account's; this process enforces its share of `workers` (1 today).
    """

    def __init__(
        self,
        limits: RateLimits,
        *,
        workers: int = 1,
        policy: AdaptivePolicy | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.policy = policy or AdaptivePolicy()
        self._clock = clock
        self._sleep = sleep
        self.workers = workers
        self._slots = asyncio.Semaphore(limits.per_worker(workers).max_concurrency)
        self._turn = asyncio.Lock()  # FIFO: whoever asked first takes tokens first
        self._ahead_cost = 0  # tokens promised to calls waiting in acquire()
        self._ahead_calls = 0
        self._paused_until = -math.inf
        self._promised_until = -math.inf  # capacity already promised to deferred calls
        self._fraction = 1.0  # effective rate / configured rate
        self._episodes = 0  # throttling episodes since the last success, for the backoff
        self._last_cut = -math.inf  # when the rate was last multiplied down
        self._last_step = -math.inf  # when the rate last changed, either way
        self.in_flight = 0
        self.configure(limits)

    def configure(self, limits: RateLimits) -> None:
        """Set the account's rates (at start-up, e.g. from a provider's quota); not concurrency."""
        self.configured = limits
        self.limits = limits = limits.per_worker(self.workers)
        self.messages = self._bucket(limits.messages_per_second, limits.message_burst)
        self.requests = self._bucket(limits.requests_per_second, limits.request_burst)
        self._apply_fraction()

    def _bucket(self, rate: float, burst: int) -> TokenBucket | None:
        return TokenBucket(rate, burst, clock=self._clock) if rate > 0 else None

    @property
    def fraction(self) -> float:
        """The effective rate as a fraction of the configured one (1.0: not slowed down)."""
        return self._fraction

    def paused_for(self) -> float:
        """Seconds until the throttling pause ends (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def expected_wait(self, cost: int) -> float:
        """Seconds until a call of `cost` asked for now could start, behind those waiting."""
        return self._wait(cost, self._ahead_cost, self._ahead_calls)

    def _wait(self, cost: int, ahead_cost: float, ahead_calls: float) -> float:
        waits = [self.paused_for()]
        if self.messages is not None:
            waits.append(self.messages.wait_time(cost, ahead_cost))
        if self.requests is not None:
            waits.append(self.requests.wait_time(1, ahead_calls))
        return max(waits)

    async def acquire(self, cost: int, *, horizon: float | None = None) -> Permit:
        """Wait until a call of `cost` may start; `Deferred` if not within `horizon` seconds."""
        deadline = math.inf if horizon is None else self._clock() + horizon
        wait = self.expected_wait(cost)
        if wait > self._until(deadline):
            raise self._defer(cost, wait)
        self._ahead_cost += cost
        self._ahead_calls += 1
        try:
            await self._take_slot(cost, deadline)
            try:
                async with self._turn:
                    await self._take_tokens(cost, deadline)
            except BaseException:
                self._slots.release()
                raise
        finally:
            self._ahead_cost -= cost
            self._ahead_calls -= 1
        self.in_flight += 1
        return Permit(cost, self._clock())

    def _until(self, deadline: float) -> float:
        return deadline - self._clock()

    async def _take_slot(self, cost: int, deadline: float) -> None:
        if not self._slots.locked() or deadline == math.inf:
            await self._slots.acquire()
            return
        # Slots free up as calls end, which only the event loop's clock measures. (A timeout
        # scope, not wait_for: no extra task per call while every slot is busy.)
        try:
            async with asyncio.timeout(max(0.0, self._until(deadline))):
                await self._slots.acquire()
        except TimeoutError:
            raise self._defer(cost, self.expected_wait(cost)) from None

    async def _take_tokens(self, cost: int, deadline: float) -> None:
        # Re-checked after every sleep: a throttle may have paused or slowed the account
        # meanwhile, and a late wake-up must not let the call through without its tokens.
        while (wait := self._wait(cost, 0, 0)) > 0:
            if wait > self._until(deadline):
                raise self._defer(cost, self.expected_wait(cost) + wait)
            await self._sleep(wait)
        if self.messages is not None:
            self.messages.take(cost)
        if self.requests is not None:
            self.requests.take(1)

    def _defer(self, cost: int, wait: float) -> Deferred:
        """A deferral whose wait comes after those already promised, at the current rates.

        Without this, every call deferred from one batch would come back at the same moment,
        mostly to be deferred again: a large backlog would cycle through the queue.
        """
        now = self._clock()
        start = max(now + wait, self._promised_until)
        steps = [0.0]
        if self.messages is not None:
            steps.append(cost / self.messages.rate)
        if self.requests is not None:
            steps.append(1 / self.requests.rate)
        self._promised_until = start + max(steps)
        return Deferred(start - now)

    def finish(
        self, permit: Permit, *, throttled: bool = False, retry_after: float | None = None
    ) -> None:
        """The call of `permit` ended; `throttled` when the provider said to slow down."""
        self._slots.release()
        self.in_flight -= 1
        now = self._clock()
        if throttled:
            self._throttled(permit, retry_after, now)
        elif permit.started >= self._last_cut:
            # A call that started before the last cut says nothing about the rate since.
            self._episodes = 0
            self._recover(now)

    def _throttled(self, permit: Permit, retry_after: float | None, now: float) -> None:
        # Calls in flight together are throttled together: only the first answer after a
        # cut starts a new episode, or one burst of 429s would cut the rate to the floor.
        if permit.started >= self._last_cut:
            self._episodes += 1
            self._fraction = max(self.policy.floor, self._fraction * self.policy.decrease)
            self._apply_fraction()
            self._last_cut = self._last_step = now
        if retry_after is None:
            episodes = max(self._episodes, 1)
            retry_after = min(
                self.policy.backoff_max, self.policy.backoff_base * 2.0 ** (episodes - 1)
            )
        pause = min(max(retry_after, 0.0), self.policy.max_pause)
        self._paused_until = max(self._paused_until, now + pause)

    def _recover(self, now: float) -> None:
        if self._fraction < 1.0 and now - self._last_step >= self.policy.recover_every:
            self._fraction = min(1.0, self._fraction + self.policy.increase)
            self._apply_fraction()
            self._last_step = now

    def _apply_fraction(self) -> None:
        limits = self.limits
        for bucket, rate in (
            (self.messages, limits.messages_per_second),
            (self.requests, limits.requests_per_second),
        ):
            if bucket is not None:
                bucket.set_rate(rate * self._fraction)

    def with_messages_rate(self, rate: float) -> None:
        """Adopt the account-wide `rate` (a provider's quota) when none was configured."""
        if self.configured.messages_per_second <= 0 < rate:
            self.configure(replace(self.configured, messages_per_second=rate))
