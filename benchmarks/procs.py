"""CPU time and peak memory of process trees and of the whole machine, read from /proc."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """`root` and every live process below it, found through the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(_stat_fields(int(entry.name))[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [root], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of `root`, its live descendants and the children they reaped."""
    ticks = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def tree_peak_rss_mb(root: int) -> tuple[float, int]:
    """Sum of VmHWM (peak resident set) over the tree in MiB, and how many processes it has.

    Pages that forked workers still share are counted once per process, so with workers this
    is an upper bound.
    """
    total_kb, count = 0, 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
                    count += 1
    return total_kb / 1024, count


def tree_pss_mb(root: int) -> float:
    """Sum of Pss over the tree in MiB, now: each page shared by k processes counts 1/k.

    Unlike summed VmHWM this does not count pages that forked workers share several times, but it
    is the current size, not the peak. 0.0 when the kernel has no smaps_rollup.
    """
    total_kb = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def rss_by_process(root: int) -> list[dict[str, Any]]:
    """Each process of the tree: pid, command line (shortened), VmHWM and VmRSS in MiB."""
    found = []
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(
                {
                    "pid": pid,
                    "cmdline": argv.strip()[:120],
                    "peak_rss_mb": int(status.get("VmHWM", "0 kB").split()[0]) / 1024,
                    "rss_mb": int(status.get("VmRSS", "0 kB").split()[0]) / 1024,
                }
            )
    return found


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(frozen=True, kw_only=True)
class CpuSample:
    """CPU seconds of the server tree, the simulator tree and the whole machine at one instant."""

    server: float
    simulator: float
    machine: float

    @classmethod
    def take(cls, server_pid: int, simulator_pid: int) -> CpuSample:
        return cls(
            server=tree_cpu_seconds(server_pid),
            simulator=tree_cpu_seconds(simulator_pid),
            machine=machine_busy_seconds(),
        )

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        return CpuSample(
            server=self.server - earlier.server,
            simulator=self.simulator - earlier.simulator,
            machine=self.machine - earlier.machine,
        )
