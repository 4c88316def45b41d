"""The account limiter on a fake clock: buckets, concurrency, horizon, throttling and recovery."""

from __future__ import annotations

import asyncio

import pytest

from swu_delivery.ratelimit import (
    AccountLimiter,
    AdaptivePolicy,
    Deferred,
    Permit,
    RateLimits,
    TokenBucket,
    default_burst,
)


class FakeClock:
    """Time that moves only when the limiter sleeps (one sleeper at a time: it holds the turn)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)  # let the other ready tasks run first, as a real sleep would
        self.now += seconds


def limiter(clock: FakeClock, **limits: float) -> AccountLimiter:
    return AccountLimiter(RateLimits(**limits), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most start times in any half-open window [t, t + width)."""
    times = sorted(times)
    return max(sum(1 for u in times if t <= u < t + width) for t in times)


async def start_times(lim: AccountLimiter, clock: FakeClock, n: int, cost: int = 1) -> list[float]:
    """Acquire and finish `n` calls one after another; when each started."""
    started = []
    for _ in range(n):
        permit = await lim.acquire(cost)
        started.append(clock.now)
        lim.finish(permit)
    return started


def test_bucket_starts_full_refills_at_its_rate_and_caps_at_the_burst() -> None:
    """Level: burst at first, minus what is taken, plus rate * elapsed, never above the burst."""
    clock = FakeClock()
    bucket = TokenBucket(10, 5, clock=clock)
    assert bucket.level == 5
    bucket.take(5)
    assert bucket.wait_time(1) == pytest.approx(0.1)
    assert bucket.wait_time(1, ahead=2) == pytest.approx(0.3)
    clock.now += 0.35
    assert bucket.level == pytest.approx(3.5)
    clock.now += 100
    assert bucket.level == 5


def test_a_call_costing_more_than_the_burst_waits_for_a_full_bucket_then_owes() -> None:
    """Cost 8 with burst 5: starts on a full bucket, and the debt delays the next call."""
    clock = FakeClock()
    bucket = TokenBucket(10, 5, clock=clock)
    bucket.take(2)
    assert bucket.wait_time(8) == pytest.approx(0.2)
    clock.now += 0.2
    bucket.take(8)
    assert bucket.level == pytest.approx(-3)
    assert bucket.wait_time(1) == pytest.approx(0.4)


def test_default_burst_is_a_tenth_of_a_second_at_least_one() -> None:
    """0.5/s and 10/s get 1; 20/s gets 2; 1000/s gets 100."""
    assert [default_burst(r) for r in (0.5, 10, 20, 1000)] == [1, 1, 2, 100]


async def test_start_times_never_exceed_rate_plus_burst_in_any_second() -> None:
    """20/s with burst 5: five at once, then one every 50 ms; no second holds more than 25."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=20, messages_burst=5)
    started = await start_times(lim, clock, 100)
    assert started[:5] == [1000.0] * 5
    assert started[5] == pytest.approx(1000.05)
    assert started[-1] == pytest.approx(1000 + 95 / 20)
    assert max_in_window(started) <= 25


async def test_recipients_are_the_cost_and_requests_have_their_own_bucket() -> None:
    """Messages 10/s and requests 2/s: the requests bucket paces single-recipient calls."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10, requests_per_second=2, requests_burst=1)
    started = await start_times(lim, clock, 5)
    assert started == pytest.approx([1000, 1000.5, 1001, 1001.5, 1002])
    heavy_clock = FakeClock()
    heavy = limiter(heavy_clock, messages_per_second=10, messages_burst=10)
    times = await start_times(heavy, heavy_clock, 3, cost=10)  # 10 recipients a call
    assert times == pytest.approx([1000, 1001, 1002])


async def test_unlimited_account_never_sleeps() -> None:
    """No rate configured: calls start at once, whatever their number."""
    clock = FakeClock()
    lim = limiter(clock)
    await start_times(lim, clock, 1000, cost=50)
    assert clock.slept == []


async def test_waiting_calls_take_tokens_in_arrival_order() -> None:
    """Concurrent callers start first come, first served."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10, messages_burst=1)
    order: list[int] = []

    async def call(i: int) -> None:
        permit = await lim.acquire(1)
        order.append(i)
        lim.finish(permit)

    await asyncio.gather(*(call(i) for i in range(20)))
    assert order == list(range(20))
    assert clock.now == pytest.approx(1001.9)


async def test_concurrency_cap_holds_calls_until_one_finishes() -> None:
    """max_concurrency=2: a third call waits for a permit to come back."""
    lim = limiter(FakeClock(), max_concurrency=2)
    first, second = await lim.acquire(1), await lim.acquire(1)
    third = asyncio.create_task(lim.acquire(1))
    await asyncio.sleep(0.01)
    assert not third.done() and lim.in_flight == 2
    lim.finish(first)
    permit = await asyncio.wait_for(third, 5)
    assert lim.in_flight == 2
    lim.finish(second)
    lim.finish(permit)
    assert lim.in_flight == 0


async def test_concurrency_cap_defers_past_the_horizon() -> None:
    """All slots busy and no time to wait (horizon 0): Deferred, and no slot is leaked."""
    lim = limiter(FakeClock(), max_concurrency=1)
    held = await lim.acquire(1)
    with pytest.raises(Deferred):
        await lim.acquire(1, horizon=0)
    lim.finish(held)
    lim.finish(await lim.acquire(1, horizon=0))


async def test_calls_that_cannot_start_within_the_horizon_are_deferred() -> None:
    """2/s, burst 1, horizon 10 s: 21 calls fit, the rest are deferred, staggered at the rate."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=2, messages_burst=1)

    async def call() -> float:
        try:
            permit = await lim.acquire(1, horizon=10)
        except Deferred as exc:
            return -exc.wait
        lim.finish(permit)
        return clock.now - 1000

    results = await asyncio.gather(*(call() for _ in range(30)))
    started = [r for r in results if r >= 0]
    waits = [-r for r in results if r < 0]
    assert len(started) == 21 and max(started) == pytest.approx(10)
    # Deferred calls are promised later and later times, at the rate: not all the same one.
    assert waits == pytest.approx([10.5 + 0.5 * k for k in range(9)])


async def test_throttling_pauses_until_the_providers_wait_and_halves_the_rate() -> None:
    """A 429 with retry-after 3 s: nothing starts for 3 s, then at half the rate."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10, messages_burst=1)
    permit = await lim.acquire(1)
    lim.finish(permit, throttled=True, retry_after=3)
    assert lim.paused_for() == 3
    assert lim.fraction == 0.5
    assert lim.messages is not None and lim.messages.rate == 5
    started = []
    for _ in range(3):  # held, not finished: a success would already start the recovery
        await lim.acquire(1)
        started.append(clock.now)
    assert started == pytest.approx([1003, 1003.2, 1003.4])


async def test_throttling_without_a_wait_backs_off_exponentially() -> None:
    """No retry-after: pause 1 s, then 2 s on the next episode; a success resets the backoff."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10)
    lim.finish(await lim.acquire(1), throttled=True)
    assert lim.paused_for() == 1
    lim.finish(await lim.acquire(1), throttled=True)
    assert lim.paused_for() == 2
    assert lim.fraction == 0.25
    lim.finish(await lim.acquire(1))
    lim.finish(await lim.acquire(1), throttled=True)
    assert lim.paused_for() == 1


async def test_calls_throttled_together_cut_the_rate_once() -> None:
    """Ten calls in flight all answered 429: one episode, not ten halvings."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=100, messages_burst=10)
    permits = [await lim.acquire(1) for _ in range(10)]
    clock.now += 0.1
    for permit in permits:
        lim.finish(permit, throttled=True, retry_after=1)
    assert lim.fraction == 0.5


async def test_rate_never_drops_below_the_floor() -> None:
    """Throttled again and again: the effective rate stops at 5% of the configured one."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=100)
    for _ in range(12):
        lim.finish(await lim.acquire(1), throttled=True, retry_after=0)
    assert lim.fraction == 0.05
    assert lim.messages is not None and lim.messages.rate == pytest.approx(5)


async def test_recovery_is_gradual_and_never_above_the_configured_rate() -> None:
    """After a cut, each second with a success gives back 10%, up to 100% and no further."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10)
    lim.finish(await lim.acquire(1), throttled=True, retry_after=0)
    assert lim.fraction == 0.5
    lim.finish(await lim.acquire(1))  # the same instant: too soon for a step
    assert lim.fraction == 0.5
    fractions = []
    for _ in range(8):
        clock.now += 1
        lim.finish(await lim.acquire(1))
        fractions.append(lim.fraction)
    assert fractions == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0, 1.0])
    assert lim.messages is not None and lim.messages.rate == 10


async def test_success_of_a_call_from_before_the_cut_does_not_recover() -> None:
    """A call that started before the throttle says nothing about the new, lower rate."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=10, messages_burst=2)
    early, throttled = await lim.acquire(1), await lim.acquire(1)
    clock.now += 5
    lim.finish(throttled, throttled=True, retry_after=0)
    clock.now += 5
    lim.finish(early)
    assert lim.fraction == 0.5


async def test_a_throttle_while_waiting_defers_a_call_past_its_horizon() -> None:
    """A pause longer than the horizon, set while a call waits for tokens: it is deferred."""
    clock = FakeClock()
    lim = limiter(clock, messages_per_second=1, messages_burst=1, max_concurrency=2)
    first = await lim.acquire(1)
    waiting = asyncio.create_task(lim.acquire(1, horizon=30))
    await asyncio.sleep(0)  # it reserved its place and sleeps on the fake clock
    lim.finish(first, throttled=True, retry_after=60)
    with pytest.raises(Deferred):
        await waiting
    assert lim.in_flight == 0
    assert lim._slots._value == 2  # its slot came back


async def test_provider_quota_is_adopted_only_without_a_configured_rate() -> None:
    """SES MaxSendRate sets the messages rate when none is configured, never over one."""
    clock = FakeClock()
    lim = limiter(clock)
    lim.with_messages_rate(14)
    assert lim.messages is not None and lim.messages.rate == 14
    fixed = limiter(clock, messages_per_second=5)
    fixed.with_messages_rate(14)
    assert fixed.messages is not None and fixed.messages.rate == 5


def test_workers_split_the_account_limits() -> None:
    """Two workers: half the rates, bursts and concurrency each, rounded down, at least 1."""
    limits = RateLimits(
        messages_per_second=20, messages_burst=5, requests_per_second=3, max_concurrency=9
    )
    share = limits.per_worker(2)
    assert (share.messages_per_second, share.message_burst) == (10, 2)
    assert (share.requests_per_second, share.request_burst, share.max_concurrency) == (1.5, 1, 4)
    assert limits.per_worker(1) is limits
    lim = AccountLimiter(limits, workers=2)
    assert lim.messages is not None and lim.messages.rate == 10


def test_permit_records_cost_and_start() -> None:
    """A permit is a plain record the adapter hands back."""
    assert Permit(3, 1.5) == Permit(cost=3, started=1.5)


def test_policy_defaults_are_documented_values() -> None:
    """Halve on throttling, floor 5%, +10% a second, backoff 1 s doubling to 60 s."""
    policy = AdaptivePolicy()
    assert (policy.decrease, policy.floor, policy.increase, policy.recover_every) == (
        0.5,
        0.05,
        0.1,
        1.0,
    )
    assert (policy.backoff_base, policy.backoff_max, policy.max_pause) == (1.0, 60.0, 300.0)
