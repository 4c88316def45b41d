"""Baseline: a hand-rolled asyncio loop that renders each email and POSTs it straight to SendGrid.

What a team would write without the service: render `order_shipped` with Jinja2 (autoescaped,
compiled once), build one SendGrid v3 JSON body per message and POST it with aiohttp, 64 in
flight per process. No queue, no durability, no retries, no records. Prints one JSON line:
messages, seconds, msgs/s and CPU µs per message (the processes' own CPU).

    .venv/bin/python benchmarks/baseline_direct.py --url http://127.0.0.1:8025 --messages 20000
    .venv/bin/python benchmarks/baseline_direct.py --url ... --procs 2   # one process per core

The harness (benchmarks/harness.py) runs it against the same simulator as the service.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from jinja2 import Environment, FileSystemLoader, Template, select_autoescape

SENDER = {"email": "orders@shop.example.com", "name": "Acme & Co"}
DATA_POOL = 500  # distinct data payloads, decoded per message as they would arrive from a queue


def _make_data_fn(bench_dir: Path) -> Any:
    spec = importlib.util.spec_from_file_location("swu_bench_floor", bench_dir / "floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_data


def _templates(bench_dir: Path) -> tuple[Template, Template, Template]:
    env = Environment(
        loader=FileSystemLoader(bench_dir),
        autoescape=select_autoescape(["html"], default_for_string=False),
        auto_reload=False,
    )
    names = ("order_shipped.subject.txt", "order_shipped.html", "order_shipped.text.txt")
    subject, html, text = (env.get_template(n) for n in names)
    return subject, html, text


def _body(templates: tuple[Template, Template, Template], raw: bytes, msg_id: str) -> bytes:
    subject, html, text = templates
    ctx = orjson.loads(raw)
    return orjson.dumps(
        {
            "personalizations": [
                {"to": [{"email": ctx["user"]["email"]}], "custom_args": {"msg_id": msg_id}}
            ],
            "from": SENDER,
            "subject": subject.render(ctx).strip(),
            "content": [
                {"type": "text/plain", "value": text.render(ctx)},
                {"type": "text/html", "value": html.render(ctx)},
            ],
        }
    )


async def _send_all(
    url: str, numbers: range, concurrency: int, bench_dir: Path, barrier: Barrier
) -> tuple[int, float]:
    """POST one rendered email per number; how many the ESP refused, and the CPU it took."""
    templates = _templates(bench_dir)
    make_data = _make_data_fn(bench_dir)
    pool = [orjson.dumps(make_data(i)) for i in range(DATA_POOL)]
    headers = {"Authorization": "Bearer sim-key", "Content-Type": "application/json"}
    failed = 0
    todo = iter(numbers)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), headers=headers
    ) as session:

        async def worker() -> None:
            nonlocal failed
            for i in todo:
                body = _body(templates, pool[i % DATA_POOL], str(i))
                async with session.post(url + "/v3/mail/send", data=body) as resp:
                    await resp.read()
                    failed += resp.status != 202

        barrier.wait()  # nothing else runs on the loop yet
        cpu0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed, time.process_time() - cpu0


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)  # as the service does


def _process(
    url: str, numbers: range, concurrency: int, bench_dir: Path, barrier: Barrier, out: Any
) -> None:
    failed, cpu = _run_loop(_send_all(url, numbers, concurrency, bench_dir, barrier))
    out.put((len(numbers), failed, cpu, time.monotonic()))


def run(url: str, messages: int, procs: int, concurrency: int, bench_dir: Path) -> dict[str, Any]:
    """Send `messages` with `procs` processes; msgs/s from the common start to the last finish."""
    ctx = multiprocessing.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(procs + 1)
    shares = [range(p, messages, procs) for p in range(procs)]
    workers = [
        ctx.Process(target=_process, args=(url, s, concurrency, bench_dir, barrier, out))
        for s in shares
    ]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.monotonic()
    done = [out.get() for _ in workers]
    for w in workers:
        w.join()
    seconds = max(d[3] for d in done) - start
    cpu = sum(d[2] for d in done)
    return {
        "procs": procs,
        "messages": messages,
        "failed": sum(d[1] for d in done),
        "seconds": seconds,
        "msgs_per_s": messages / seconds,
        "cpu_us_per_msg": cpu / messages * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--url", required=True, help="the simulator's base URL")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64, help="POSTs in flight per process")
    p.add_argument(
        "--bench-dir",
        type=Path,
        default=Path(os.environ.get("SWU_BENCH_DIR", "/work/shared/bench")),
    )
    args = p.parse_args(argv)
    result = run(args.url, args.messages, args.procs, args.concurrency, args.bench_dir.resolve())
    print(orjson.dumps(result).decode(), flush=True)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
