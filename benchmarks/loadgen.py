"""The load generator: client processes that send the standard workload to the service over gRPC.

Each process builds its emails one batch at a time from `make_data(i)` (never the whole run at
once, so a 1M run stays small) and reports what it sent as a `LoadResult`. Three shapes:

    bulk    SendBatch calls (or SendStream chunks) back to back, `concurrency` in flight per
            process, each on its own connection so that several server workers share the load
    paced   one SendBatch every `batch_size / rate` seconds, open loop (a slow answer does not
            delay the next call), to measure call latency at a fixed offered rate
    naive   one unary Send per email, `concurrency` sequential loops: what a naive client does
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.bench_send import CALLER_CHANNEL_OPTIONS, TEMPLATE_ID, load_floor_module
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.client import AsyncClient, ClientError, email

START_TIMEOUT = 120.0  # seconds for every process to connect and reach the start line
STREAM_WINDOW = 2  # chunks awaiting results per SendStream


@dataclass(frozen=True, kw_only=True)
class LoadPlan:
    """What the client processes send: messages [first_index, first_index + messages)."""

    shape: str  # "bulk", "paced" or "naive"
    target: str
    bench_dir: Path
    messages: int
    first_index: int = 0
    batch_size: int = 500
    stream: bool = False  # bulk only: SendStream instead of SendBatch
    concurrency: int = 4  # calls (or streams, or Send loops) in flight per process
    procs: int = 1
    rate: float = 0.0  # paced only: offered msgs/s

    @property
    def batches(self) -> int:
        return -(-self.messages // self.batch_size)


@dataclass(kw_only=True)
class LoadResult:
    """What one client process sent and saw; times are time.monotonic() (one clock per host)."""

    accepted: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)  # the first few rejections or call failures
    first_send: float = 0.0
    last_answer: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per SendBatch call
    cpu_seconds: float = 0.0

    def tally(self, results: Any) -> None:
        for r in results:
            if r.message_id:
                self.accepted += 1
            else:
                self.rejected += 1
                if len(self.errors) < 3:
                    self.errors.append(r.error.message)


class Workload:
    """The standard emails: message i is `order_shipped` with `make_data(i)`."""

    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        self._floor: ModuleType = load_floor_module(plan.bench_dir)

    def email(self, i: int) -> delivery_pb2.Email:
        data = self._floor.make_data(self.plan.first_index + i)
        return email(TEMPLATE_ID, data["user"]["email"], data)

    def batch(self, k: int) -> list[delivery_pb2.Email]:
        """Batch k of the plan (the last one may be short)."""
        start = k * self.plan.batch_size
        stop = min(start + self.plan.batch_size, self.plan.messages)
        return [self.email(i) for i in range(start, stop)]


async def _connected(plan: LoadPlan, count: int) -> list[AsyncClient]:
    """`count` clients, each on its own connection, ready before the clock starts."""
    clients = [
        AsyncClient(plan.target, channel_options=CALLER_CHANNEL_OPTIONS) for _ in range(count)
    ]
    await asyncio.gather(*(c.channel.channel_ready() for c in clients))
    return clients


async def _timed_batch(client: AsyncClient, batch: list[Any], result: LoadResult) -> None:
    t0 = time.perf_counter()
    results = await client.send_batch(batch)
    result.latencies.append(time.perf_counter() - t0)
    result.tally(results)


async def _bulk_batches(
    work: Workload, clients: list[AsyncClient], ks: Iterator[int], result: LoadResult
) -> None:
    async def caller(client: AsyncClient) -> None:
        for k in ks:  # shared by the callers: each takes the next batch
            await _timed_batch(client, work.batch(k), result)

    await asyncio.gather(*(caller(c) for c in clients))


async def _bulk_streams(
    work: Workload, clients: list[AsyncClient], ks: Iterator[int], result: LoadResult
) -> None:
    def emails() -> Iterator[delivery_pb2.Email]:
        for k in ks:
            yield from work.batch(k)

    async def stream(client: AsyncClient) -> None:
        report = await client.send_bulk(
            emails(), batch_size=work.plan.batch_size, concurrency=STREAM_WINDOW, stream=True
        )
        result.accepted += report.accepted
        result.rejected += len(report.rejected)
        result.errors.extend(r.message for r in report.rejected[:3])

    await asyncio.gather(*(stream(c) for c in clients))


async def _bulk(
    plan: LoadPlan, proc: int, start_line: Callable[[], None], result: LoadResult
) -> None:
    work = Workload(plan)
    clients = await _connected(plan, plan.concurrency)
    ks = iter(range(proc, plan.batches, plan.procs))  # this process's share of the batches
    send = _bulk_streams if plan.stream else _bulk_batches
    start_line()
    result.first_send = time.monotonic()
    try:
        await send(work, clients, ks, result)
    finally:
        result.last_answer = time.monotonic()
        await asyncio.gather(*(c.close() for c in clients))


async def _paced(
    plan: LoadPlan, proc: int, start_line: Callable[[], None], result: LoadResult
) -> None:
    work = Workload(plan)
    clients = await _connected(plan, plan.concurrency)
    interval = plan.batch_size / plan.rate
    calls: list[asyncio.Task[None]] = []
    start_line()
    result.first_send = start = time.monotonic()
    try:
        for k in range(plan.batches):
            batch = work.batch(k)  # built ahead of its slot
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            client = clients[k % len(clients)]
            calls.append(asyncio.create_task(_timed_batch(client, batch, result)))
        await asyncio.gather(*calls)
    finally:
        result.last_answer = time.monotonic()
        await asyncio.gather(*(c.close() for c in clients))


async def _naive(
    plan: LoadPlan, proc: int, start_line: Callable[[], None], result: LoadResult
) -> None:
    work = Workload(plan)
    (client,) = await _connected(plan, 1)
    numbers = iter(range(plan.messages))

    async def loop() -> None:
        for i in numbers:
            try:
                await client.send(work.email(i))
                result.accepted += 1
            except ClientError as exc:
                result.rejected += 1
                if len(result.errors) < 3:
                    result.errors.append(str(exc))

    start_line()
    result.first_send = time.monotonic()
    try:
        await asyncio.gather(*(loop() for _ in range(plan.concurrency)))
    finally:
        result.last_answer = time.monotonic()
        await client.close()


SHAPES = {"bulk": _bulk, "paced": _paced, "naive": _naive}


def _process_main(plan: LoadPlan, proc: int, gates: tuple[Barrier, Barrier], out: Any) -> None:
    """One client process: connect, wait at the start line, send, put a LoadResult on `out`."""
    result = LoadResult()
    cpu0 = [0.0]

    def start_line() -> None:  # blocks the loop, which has nothing else to do yet
        for gate in gates:  # ready, then go: the harness samples CPU in between
            gate.wait(START_TIMEOUT)
        cpu0[0] = time.process_time()

    try:
        asyncio.run(SHAPES[plan.shape](plan, proc, start_line, result))
    except BaseException as exc:  # reported to the harness rather than lost in a child
        result.errors.append(f"{type(exc).__name__}: {exc}")
        for gate in gates:
            gate.abort()
    result.cpu_seconds = time.process_time() - cpu0[0]
    out.put(result)


class LoadGenerator:
    """`plan.procs` client processes (spawned: no gRPC state crosses a fork), started together."""

    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        ctx = multiprocessing.get_context("spawn")
        self._out = ctx.Queue()
        self._gates = (ctx.Barrier(plan.procs + 1), ctx.Barrier(plan.procs + 1))
        self._procs = [
            ctx.Process(target=_process_main, args=(plan, p, self._gates, self._out), daemon=True)
            for p in range(plan.procs)
        ]
        for p in self._procs:
            p.start()

    def ready(self) -> None:
        """Wait until every process has started and connected."""
        self._gates[0].wait(START_TIMEOUT)

    def go(self) -> None:
        """Release every process at once."""
        self._gates[1].wait(START_TIMEOUT)

    def results(self) -> list[LoadResult]:
        """Every process's result, once all have finished."""
        results = [self._out.get() for _ in self._procs]
        for p in self._procs:
            p.join()
        return results

    def stop(self) -> None:
        """Kill processes still running (after a failure in the harness)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
