"""A process seen from outside, through Linux /proc: CPU seconds (whole, per thread, the
machine's), memory figures. Each reader returns None (or nothing) where /proc cannot tell."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_cpu_s(path: str) -> float | None:
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds(pid: int | None, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process `pid` (every thread, ended ones included), or of
    its thread `tid` alone (``tid == pid`` is the main thread); None when unknown."""
    if pid is None:
        return None
    return _stat_cpu_s(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")


def threads_cpu_s(pid: int | None) -> dict[int, float]:
    """CPU seconds of every live thread of `pid`, by thread id (empty when unknown)."""
    if pid is None:
        return {}
    try:
        tids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    seconds = {tid: _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    return {tid: value for tid, value in seconds.items() if value is not None}


def machine_busy_s() -> float | None:
    """CPU seconds every process on the machine has spent busy so far (/proc/stat: all time
    but idle and iowait, summed over cores), or None when unknown."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def other_cpu_s(machine: float | None, *own: float | None) -> float | None:
    """CPU seconds of processes other than `own` out of the machine's busy time."""
    if machine is None or any(value is None for value in own):
        return None
    return max(0.0, machine - sum(value for value in own if value is not None))


def delta(before: float | None, after: float | None) -> float | None:
    """`after` - `before`, None when either is unknown."""
    return None if before is None or after is None else after - before


def proc_status(pid: int) -> dict[str, int]:
    """`pid`'s memory figures in bytes (``VmRSS``, ``VmHWM``: peak RSS) and ``Threads``."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) * 1024
        elif name == "Threads":
            figures[name] = int(value)
    return figures
