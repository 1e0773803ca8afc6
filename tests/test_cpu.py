"""Tests for kvw_ledger.cpu: the thread count follows the cores other processes leave free."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvw_ledger import cpu
from kvw_ledger.cpu import CoreMeter


def _stat(path: Path, busy_ticks: int) -> None:
    # user nice system idle iowait irq softirq steal: all the busy time as "user"
    path.write_text(f"cpu  {busy_ticks} 0 0 1000 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


class _Clock:
    """The meter's wall and CPU clocks, moved by the test alone: a loaded machine that
    stalls the test between two readings cannot change what the meter computes."""

    def __init__(self) -> None:
        self.wall = 500.0
        self.cpu = 3.0

    def monotonic(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        self.wall += seconds


@pytest.mark.parametrize(
    "others_cores, own_cores, expected",
    [(0.0, 0.0, 2), (1.0, 0.0, 1), (1.6, 0.0, 1), (0.3, 0.0, 2), (0.3, 1.0, 2), (1.0, 1.0, 1), (0.6, 0.4, 1)],
)
def test_threads_are_the_free_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, others_cores: float, own_cores: float, expected: int
) -> None:
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    clock = _Clock()
    monkeypatch.setattr(cpu, "time", clock)
    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    _stat(stat, 0)
    meter = CoreMeter(stat_path=str(stat))
    clock.wall += 2.0
    clock.cpu += own_cores * 2.0
    # Every process's busy time over the interval: others' plus our own, which the meter
    # must not count as someone else's.
    _stat(stat, round((others_cores + own_cores) * 2.0 * ticks))
    assert meter.others() == pytest.approx(others_cores, abs=1.0 / ticks)
    clock.wall += 2.0
    clock.cpu += own_cores * 2.0
    _stat(stat, round((others_cores + own_cores) * 4.0 * ticks))
    assert meter.threads() == expected


def test_own_work_is_not_counted_as_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    stat = tmp_path / "stat"
    _stat(stat, 0)
    meter = CoreMeter(stat_path=str(stat))
    own = time.process_time()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # this process keeps one core busy
        pass
    _stat(stat, round((time.process_time() - own) * os.sysconf("SC_CLK_TCK")))
    assert meter.others() < 0.2
    assert meter.threads() == 2


def test_never_more_than_asked_nor_fewer_than_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cores", lambda: 4)
    stat = tmp_path / "stat"
    _stat(stat, 0)
    assert CoreMeter(max_threads=2, stat_path=str(stat)).threads() == 2
    meter = CoreMeter(stat_path=str(stat))
    time.sleep(0.1)
    _stat(stat, 10**9)  # every core busy for ages
    assert meter.threads() == 1


def test_without_proc_stat_the_load_average_stands_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    meter = CoreMeter(stat_path=str(tmp_path / "missing"))
    time.sleep(0.1)
    assert 0.5 < meter.others() <= 1.0
    assert meter.threads() == 1
