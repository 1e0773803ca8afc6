"""The benchmark harness (benchmarks/common.py) and the transfer and scale benchmarks' helpers.

The benchmark modules live in benchmarks/, which is not a package: they are imported
by putting that folder on sys.path, as benchmarks/run.py does.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvw_ledger import sums

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import scale  # noqa: E402
from common import Figure, PeakRSS, in_fresh_process, median_seconds  # noqa: E402

MIB = 2**20


def filled(n_bytes: int) -> bytes:
    """``n_bytes`` of resident memory: written, unlike a fresh (zero-page) allocation."""
    return operator.mul(b"\x01", n_bytes)


# --- median_seconds -----------------------------------------------------------------


def test_median_seconds_interleaves_rounds_after_the_warmup() -> None:
    calls: list[str] = []
    seconds = median_seconds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2
    )
    assert calls == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed, a and b alternating
    assert set(seconds) == {"a", "b"}


class _Clock:
    """A perf_counter that moves only when a timed callable says so: no machine load
    can stretch it, so the medians are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_median_seconds_returns_the_median_of_each_side(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(common, "time", clock)
    delays = iter([0.0, 0.3, 0.0])  # a mean would be 0.1 s; the median is the quick rounds'

    def uneven() -> None:
        clock.now += next(delays)

    def steady() -> None:
        clock.now += 0.02

    seconds = median_seconds({"uneven": uneven, "steady": steady}, repeats=3, warmup=0)
    assert seconds["uneven"] == 0.0
    assert seconds["steady"] == pytest.approx(0.02, abs=1e-9)


# --- Figure ---------------------------------------------------------------------------


def test_figure_met_is_ratio_at_least_target() -> None:
    assert Figure("i", "n", 1.0, 1.0, "").met is True
    assert Figure("i", "n", 0.99, 1.0, "").met is False
    assert Figure("i", "n", 0.1, None, "").met is None
    as_json = Figure("i", "n", 2.0, 0.5, "d").to_json()
    assert as_json["met"] is True and as_json["ratio"] == 2.0 and as_json["target"] == 0.5


# --- peak memory ------------------------------------------------------------------------


def test_in_fresh_process_returns_the_value_and_the_peak_rss() -> None:
    # The job is the standard library's, so the child imports nothing heavy for it.
    out = in_fresh_process(operator.mul, b"\x01", 320 * MIB)
    assert len(out["out"]) == 320 * MIB and out["out"][-1:] == b"\x01"
    assert out["seconds"] > 0
    assert 0 < out["base_rss"] < out["peak_rss"]
    # The job's own 320 MiB, in bytes (not KiB), above what the imports left resident.
    assert out["peak_rss"] - out["base_rss"] >= 320 * MIB


def test_in_fresh_process_reports_a_job_that_dies() -> None:
    with pytest.raises(RuntimeError, match="_exit"):
        in_fresh_process(os._exit, 3)


def test_peak_rss_sees_a_big_allocation_and_not_a_small_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The block lives until the sampler has read the RSS at least once with it resident:
    # waiting on that, not on a sleep, holds on a machine too loaded to schedule the
    # sampler within any fixed time.
    real_rss = PeakRSS.rss
    sampled = threading.Event()
    block_resident = threading.Event()

    def rss() -> int:
        value = real_rss()
        if block_resident.is_set() and threading.current_thread() is not threading.main_thread():
            sampled.set()
        return value

    monkeypatch.setattr(PeakRSS, "rss", staticmethod(rss))
    with PeakRSS(interval=0.001) as big:
        block = torch.ones(128 * MIB // 4)  # 128 MiB, written, so resident
        block_resident.set()
        assert sampled.wait(timeout=60)
        del block
    monkeypatch.setattr(PeakRSS, "rss", staticmethod(real_rss))
    with PeakRSS(interval=0.001) as small:
        time.sleep(0.02)
    assert big.peak >= 100 * MIB
    assert small.peak < 32 * MIB


def test_rss_over_counts_the_call_not_what_came_before() -> None:
    earlier = filled(160 * MIB)  # raises this process's high-water mark, then goes
    del earlier
    out = scale.rss_over(filled, 64 * MIB)
    assert 48 * MIB <= out["peak"] - out["before"] < 128 * MIB


def test_mib_formats_bytes() -> None:
    assert common.mib(3 * MIB) == "3 MiB"


# --- the scale benchmark's building blocks ------------------------------------------


def test_no_fsync_is_restored() -> None:
    saved = os.fsync
    with scale.no_fsync():
        assert os.fsync is not saved
        os.fsync(-1)  # a no-op: a bad descriptor raises nothing
    assert os.fsync is saved


def test_request_writer_commits_through_the_journal(tmp_path: Path) -> None:
    """Cheap requests are real commits: the ledger verifies and its head equals the replay."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model_dir = scale.save_model(tmp_path / "model", config)
    ledger = scale.first_request(tmp_path / "ledger", model_dir, tmp_path)
    writer = scale.RequestWriter(ledger, "r0")
    seconds = scale.grow(writer, 4)
    assert seconds > 0
    state = ledger.state()
    assert state.active == ["r0", "r1", "r2", "r3"]
    assert ledger.head().body["active"] == state.active
    assert ledger.verify().ok
    cached = ledger.exponents()  # the head cache written by the last commit
    replayed = sums.total(ledger, state).exponents
    assert all(torch.equal(cached[s], replayed[s]) for s in replayed)
    first = ledger.request_exponents("r0", state)
    second = ledger.request_exponents("r1", state)
    site = next(iter(first))
    assert not torch.equal(first[site], second[site])  # permuted, so distinct content
    assert torch.equal(first[site].sort().values, second[site].sort().values)  # same values


def test_scale_quick_runs_and_reports_every_figure() -> None:
    """Smoke run (~7 s): the figures exist, are finite and positive, and the bytes add up.

    (``transfer.run(quick=True)`` takes ~11 s, most of it building the model and ledger,
    so it is left to ``benchmarks/run.py --quick``.)
    """
    result = scale.run(quick=True)
    names = [f.name for f in result.figures]
    assert len(names) == 7 and any("materialise" in n for n in names)
    budgets = {f.name: f for f in result.figures if f.target == 1.0}
    assert sorted(budgets) == ["diff HEAD~1 HEAD at N=50: 1 s / its time", "verify at N=50: 10 s / its time"]
    for f in budgets.values():  # budget over the measured seconds of that verb at the largest N
        verb = "diff" if f.name.startswith("diff") else "verify"
        assert f.ratio == pytest.approx(float(f.name.split(": ")[1].split(" s")[0]) / result.details["seconds"][verb]["50"])
    assert all(f.ratio > 0 and f.ratio == f.ratio for f in result.figures)  # not NaN
    sizes = {int(n): b for n, b in result.details["ledger_bytes"].items()}
    assert sorted(sizes) == [1, 10, 50]
    assert sizes[1] < sizes[10] < sizes[50]
    assert result.details["bytes_per_request"] == (sizes[50] - sizes[1]) / 49
    for verb in ("log", "diff", "verify", "materialize"):
        assert set(result.details["seconds"][verb]) == {"1", "10", "50"}
