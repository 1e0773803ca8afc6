"""What every benchmark shares: the figure format, interleaved median timing, peak memory.

A benchmark module in this folder defines ``run(quick: bool, device: str) -> Result``;
``benchmarks/run.py`` calls each one and writes ``results.json`` and ``RESULTS.md``.
Every figure is a ratio measured side by side in one run: both sides on the same
machine, at the same time, interleaved, so load from other processes hits both
alike. Nothing here asserts a time; targets are reported as met or missed.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Figure:
    """One measured ratio and the target it is held to.

    ``ratio`` is always oriented so that larger is better for kvw_ledger (baseline
    time over ours, say); ``target`` is the least ratio that meets the goal, or
    ``None`` for a figure reported without a target.
    """

    item: str  # the item, e.g. "1. coefficient collection"
    name: str  # what the ratio compares, e.g. "vs a plain no-grad forward"
    ratio: float
    target: float | None
    detail: str  # the raw figures behind the ratio, with units

    @property
    def met(self) -> bool | None:
        """Whether the target is met; ``None`` without a target."""
        return None if self.target is None else self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class Result:
    """What one benchmark module returns."""

    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)  # raw numbers for results.json


def median_seconds(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall seconds of each callable; rounds are interleaved (a, b, a, b, ...)
    after ``warmup`` untimed rounds, so drift in machine load hits every side alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets the kernel's RSS high-water mark to the current RSS (Linux); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _child(target: Callable[..., object], args: tuple[Any, ...], conn: Any) -> None:
    # Runs in a fresh interpreter (spawn). The high-water mark is reset after the
    # imports, so the peak is the target's own plus the RSS it started from.
    if _reset_peak():
        base, peak_of = _status_bytes("VmRSS"), lambda: _status_bytes("VmHWM")
    else:  # no /proc: ru_maxrss (KiB on Linux, bytes on macOS) cannot be reset
        scale = 1 if sys.platform == "darwin" else 1024
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale  # noqa: E731
    start = time.perf_counter()
    out = target(*args)
    seconds = time.perf_counter() - start
    conn.send({"seconds": seconds, "peak_rss": peak_of(), "base_rss": base, "out": out})
    conn.close()


def in_fresh_process(target: Callable[..., object], *args: Any) -> dict[str, Any]:
    """Runs ``target(*args)`` in a new interpreter; returns its wall seconds, peak RSS
    during it (bytes, whole process), the RSS the interpreter had just before
    ``target`` started (imports included), and ``target``'s return value (which must
    pickle). ``peak_rss - base_rss`` is what the target added at its peak.

    ``target`` must be importable by name (a module-level function), as spawn requires.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    proc = context.Process(target=_child, args=(target, args, child))
    proc.start()
    child.close()
    try:
        result: dict[str, Any] = parent.recv()
    except EOFError as e:
        proc.join()
        raise RuntimeError(f"{target.__name__} died in its child (exit code {proc.exitcode})") from e
    proc.join()
    return result


class PeakRSS:
    """Samples this process's resident set every ``interval`` seconds while open;
    ``peak`` is the largest sample above the RSS at entry (bytes)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self._base = self.rss()
        self._max = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._max = max(self._max, self.rss())
        self.peak = self._max - self._base


def mib(n: float) -> str:
    """Bytes as MiB, for detail strings."""
    return f"{n / 2**20:.0f} MiB"
