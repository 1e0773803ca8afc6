"""Benchmarks users already hold -> our JSONL: MLLMU-Bench, CLEAR and TOFU.

``import_benchmark("mllmu", SOURCE, OUT_DIR)`` reads a local copy laid out as on
the dataset hub (one folder per config, parquet shards inside) and writes
``OUT_DIR/<config>.jsonl`` per config, with the images under ``OUT_DIR/images/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kvw_ledger.errors import BadInputError
from kvw_ledger.importers import clear, mllmu, tofu
from kvw_ledger.importers._common import ImportReport, Schema, SplitReport, run_import

__all__ = ["BENCHMARKS", "ImportReport", "SplitReport", "configs", "import_benchmark"]

BENCHMARKS: dict[str, dict[str, Schema]] = {
    "mllmu": mllmu.CONFIGS,
    "clear": clear.CONFIGS,
    "tofu": tofu.CONFIGS,
}


def configs(benchmark: str) -> list[str]:
    """The config names ``benchmark`` knows, in import order."""
    return list(_configs(benchmark))


def _configs(benchmark: str) -> dict[str, Schema]:
    if benchmark not in BENCHMARKS:
        raise BadInputError(
            f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}"
        )
    return BENCHMARKS[benchmark]


def import_benchmark(
    benchmark: str, source: str | Path, out_dir: str | Path, splits: Iterable[str] = ()
) -> ImportReport:
    """Converts a local copy of a benchmark into our JSONL, one file per config.

    Args:
        benchmark: ``mllmu``, ``clear`` or ``tofu``.
        source: the benchmark's folder (``SOURCE/<config>/*.parquet``, as on the hub).
        out_dir: where ``<config>.jsonl`` and ``images/`` go (created if needed).
        splits: the configs to import; default every known config found in ``source``.

    Returns:
        What was written, per config.

    Raises:
        BadInputError: unknown benchmark or config, no parquet files, or a JSONL that
            exists already.
        DataError: a file lacks a column the config needs, or a cell is malformed; the
            message names the file, the row and the column.
    """
    return run_import(benchmark, source, out_dir, _configs(benchmark), splits)
