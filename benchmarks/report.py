"""The harness's printed report and the facts about the machine that go with every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("swu-delivery", "grpcio", "protobuf", "aiohttp", "jinja2", "orjson", "uvloop")
# DESIGN.md / issue 6 targets, shown beside the measured figures.
TARGETS = {
    "ratio": "≤ 1.3× (floor + POST)",
    "intake": "≥ 30,000 msgs/s per process",
    "delivered": "≥ 6,000 msgs/s",
    "p99": "< 100 ms",
    "rss": "< 300 MB with 1M queued",
}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    """Machine, versions, date and the exact command, as the results table records them."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_at_start": os.getloadavg(),
    }


def _n(value: float | None, spec: str = ",.0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _phase_rows(name: str, p: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            f"{name}: intake",
            f"{_n(p['intake_msgs_per_s'])} msgs/s "
            f"({p['accepted']:,} in {p['intake_seconds']:.2f} s, first send → all accepted)",
        )
    ]
    if p["rejected"]:
        rows.append((f"{name}: REJECTED", f"{p['rejected']:,}, e.g. {p['errors'][:1]}"))
    if p["delivered_msgs_per_s"] is not None:
        rows.append(
            (
                f"{name}: delivered",
                f"{_n(p['delivered_msgs_per_s'])} msgs/s ({p['delivered_seconds']:.2f} s, "
                "first send → all delivered)",
            )
        )
    rows.append(
        (
            f"{name}: CPU µs/msg",
            f"server {_n(p['server_cpu_us_per_msg'])}, simulator "
            f"{_n(p['simulator_cpu_us_per_msg'])}, client {_n(p['client_cpu_us_per_msg'])}; "
            f"machine busy {p['machine_busy_cores']:.2f} cores, of which "
            f"{p['other_busy_cores']:.2f} not ours",
        )
    )
    return rows


def _headline_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures issue 6 asks for, each with its target."""
    main, floor, config = r["main"], r["floor"], r["config"]
    rows = [("service", f"{config['workers']} worker(s), {config['rpc']}, {r['messages']:,} msgs")]
    if config["workers_note"]:
        rows.append(("NOTE", config["workers_note"]))
    rows += [
        ("intake", f"{_n(main['intake_msgs_per_s'])} msgs/s while delivery also runs"),
        ("delivered", f"{_n(main['delivered_msgs_per_s'])} msgs/s   target {TARGETS['delivered']}"),
        ("server CPU", f"{_n(main['server_cpu_us_per_msg'])} µs per delivered message"),
        (
            "floor",
            f"render+JSON {_n(floor['render_us'])} µs, + one aiohttp POST "
            f"{_n(floor['post_us'])} µs = {_n(floor['plus_post_us'])} µs",
        ),
        (
            "ratio",
            f"{_n(r['ratio_to_floor'], '.2f', '×')} the floor, "
            f"{_n(r['ratio_to_floor_plus_post'], '.2f', '×')} floor + POST   "
            f"target {TARGETS['ratio']}",
        ),
    ]
    if (paced := r.get("paced")) is not None:
        rows.append(
            (
                "SendBatch(500)",
                f"p50 {_n(paced['call_p50_ms'], '.1f')} ms, "
                f"p99 {_n(paced['call_p99_ms'], '.1f')} ms at "
                f"{paced['offered_msgs_per_s']:,.0f} msgs/s offered ({paced['calls']} calls)   "
                f"target p99 {TARGETS['p99']}",
            )
        )
    if (stalled := r.get("stalled")) is not None:
        per_process = stalled["intake_msgs_per_s"] / config["workers"]
        rows.append(
            (
                "intake alone",
                f"{_n(stalled['intake_msgs_per_s'])} msgs/s into the queue, ESP stalled "
                f"({_n(per_process)} per process)   target {TARGETS['intake']}",
            )
        )
    rows.append(
        (
            "server RSS",
            f"peak {r['server_peak_rss_mb']:.0f} MiB after main over {r['server_processes']} "
            f"process(es), PSS then {r.get('server_pss_mb', 0):.0f} MiB   target {TARGETS['rss']}",
        )
    )
    if stalled is not None:
        rows.append(
            (
                "server RSS queued",
                f"peak {stalled['server_peak_rss_mb']:.0f} MiB "
                f"with {stalled['accepted']:,} more queued, PSS then "
                f"{stalled.get('server_pss_mb', 0):.0f} MiB",
            )
        )
    return rows


def _baseline_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = _phase_rows("naive unary Send", r["naive"]) if "naive" in r else []
    for d in r.get("direct", []):
        rows.append(
            (
                f"direct asyncio ×{d['procs']}",
                f"{_n(d['msgs_per_s'])} msgs/s, {_n(d['cpu_us_per_msg'])} µs CPU/msg "
                f"(+ simulator {_n(d['simulator_cpu_us_per_msg'])}), {d['messages']:,} messages",
            )
        )
    return rows


def print_report(r: dict[str, Any]) -> None:
    """The figures of one run: ours with their targets, each phase in detail, the baselines."""
    rows = _headline_rows(r)
    for phase in ("main", "paced", "stalled"):
        if phase in r:
            rows += _phase_rows(phase, r[phase])
    states = ", ".join(f"{n:,} {state}" for state, n in sorted(r["ledger_states"].items()))
    rows.append(("ledger", f"{states} (read from the database after the service stopped)"))
    stop = r["server_stop"]
    how = "killed after SIGTERM was not enough" if stop["killed"] else "SIGTERM"
    rows.append(("server stop", f"{stop['seconds']:.1f} s ({how})"))
    rows += _baseline_rows(r)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
