"""How many CPU threads torch should use now: the cores other processes leave free.

Torch's CPU kernels run on an OpenMP pool whose threads wait for each other at
every parallel region. When another process holds one of two cores, a 2-thread
pool stalls at each barrier until the scheduler gives the second thread a turn:
training ran 4-15x slower than with one thread on the core that was free
(measured on the demo's model, ``benchmarks/demo.py``). So the count follows
the load actually there: ``cores - (CPU others used lately)``, at least 1.

On Linux the load is measured from ``/proc/stat`` (every process's busy time)
minus this process's own CPU time, over the interval since the last reading,
so our own threads never count as someone else's. Elsewhere the 1-minute load
average stands in for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["CoreMeter", "cores"]

_PROC_STAT = "/proc/stat"


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _busy_seconds(path: str = _PROC_STAT) -> float | None:
    """Seconds every CPU spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    steal = int(fields[8]) if len(fields) > 8 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Reading:
    wall: float  # time.monotonic()
    busy: float | None  # every process's busy CPU seconds (None: no /proc/stat)
    own: float  # this process's CPU seconds, all threads


class CoreMeter:
    """Measures the cores other processes use, and picks a thread count from it.

    Args:
        max_threads: never more threads than this (default: every core we may use).
        stat_path: the kernel's CPU counters (tests point it at a file of their own).
    """

    def __init__(self, max_threads: int | None = None, stat_path: str = _PROC_STAT) -> None:
        self.cores = cores()
        self.max_threads = max(1, min(max_threads or self.cores, self.cores))
        self._stat = stat_path
        self._last = self._read()

    def _read(self) -> _Reading:
        return _Reading(time.monotonic(), _busy_seconds(self._stat), time.process_time())

    def others(self) -> float:
        """Cores other processes kept busy since the last call (or since creation).

        A first call right after creation has no interval yet: it waits a tenth
        of a second to get one.
        """
        if time.monotonic() - self._last.wall < 0.05:
            time.sleep(0.1)
        now = self._read()
        last, self._last = self._last, now
        wall = now.wall - last.wall
        if now.busy is None or last.busy is None or wall <= 0:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            return max(0.0, load - (now.own - last.own) / max(wall, 1e-9))
        return max(0.0, (now.busy - last.busy - (now.own - last.own)) / wall)

    def threads(self) -> int:
        """Threads for the next stretch of work: the cores left free, rounded, at least 1."""
        free = self.cores - self.others()
        return max(1, min(self.max_threads, int(free + 0.5)))
