"""Runs the benchmark suite and writes ``benchmarks/results.json`` and ``RESULTS.md``.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--only NAME ...]

Each module named in ``SUITE`` defines ``run(quick, device) -> common.Result``. The
figures of one device form one column; a run on another device (a GPU machine) adds
its column beside the CPU one instead of replacing it. ``--quick`` runs small
versions of everything (under 5 minutes on 2 cores) and writes
``results-quick.json`` / ``RESULTS-quick.md`` so it never overwrites a full run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# In the order; a module that is missing is reported, not skipped silently.
SUITE = ("coefficients", "graddiff", "fixedcost", "transfer", "scale", "frontier", "startup", "parallel", "sequential")


def machine(device: str) -> dict[str, Any]:
    """The machine and library versions a column was measured with."""
    import numpy
    import torch
    import transformers
    import zarr

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_suite(names: list[str], quick: bool, device: str) -> dict[str, Any]:
    """Runs each named benchmark; a failure is recorded in the column and the rest go on."""
    column: dict[str, Any] = {"machine": machine(device), "quick": quick, "benchmarks": {}}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            result = module.run(quick=quick, device=device)
        except Exception:
            column["benchmarks"][name] = {"error": traceback.format_exc(limit=8)}
            print(column["benchmarks"][name]["error"], file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - start
        column["benchmarks"][name] = {
            "seconds": round(seconds, 1),
            "figures": [f.to_json() for f in result.figures],
            "details": result.details,
        }
        for f in result.figures:
            print(f"   {_verdict(f.to_json()):<6}{f.item} {f.name}: {f.ratio:.2f}x ({f.detail})")
        print(f"   ({seconds:.0f} s)", flush=True)
    column["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return column


def _verdict(figure: dict[str, Any]) -> str:
    return {True: "met", False: "MISS", None: "-"}[figure["met"]]


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: per device, the machine and a table of every figure."""
    lines = [
        "# kvw_ledger benchmarks",
        "",
        "Written by `make bench` (`benchmarks/run.py`); every figure is a ratio of two",
        "measurements taken side by side in one run (interleaved, median after a warm-up),",
        "oriented so that larger is better for kvw_ledger.",
        "",
    ]
    for device, column in sorted(results["columns"].items()):
        m = column["machine"]
        lines += [
            f"## {device}{' (quick)' if column['quick'] else ''}, finished {column['finished']}",
            "",
            f"{m['platform']}, {m['cores']} cores, {m['torch_threads']} torch threads"
            + (f", {m['gpu']}" if "gpu" in m else "")
            + f"; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
            f"zarr {m['zarr']}, numpy {m['numpy']}.",
            "",
            "| item | comparison | ratio | target | | measured |",
            "| --- | --- | ---: | ---: | --- | --- |",
        ]
        for name, bench in column["benchmarks"].items():
            if "error" in bench:
                last = bench["error"].strip().splitlines()[-1]
                lines.append(f"| {name} | failed | | | | `{last}` |")
                continue
            for f in bench["figures"]:
                target = "" if f["target"] is None else f">= {f['target']:g}x"
                lines.append(
                    f"| {f['item']} | {f['name']} | {f['ratio']:.2f}x | {target} "
                    f"| {_verdict(f)} | {f['detail']} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small versions, under 5 minutes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", nargs="+", choices=SUITE, help="run only these benchmarks")
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    json_path = HERE / f"results{suffix}.json"
    results: dict[str, Any] = {"columns": {}}
    if json_path.exists():
        results = json.loads(json_path.read_text())
    column = run_suite(list(args.only or SUITE), args.quick, args.device)
    if args.only and args.device in results["columns"]:
        # A partial rerun updates those benchmarks and keeps the others.
        kept = results["columns"][args.device]["benchmarks"]
        column["benchmarks"] = {**kept, **column["benchmarks"]}
    results["columns"][args.device] = column
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(json_path)
    (HERE / f"RESULTS{suffix}.md").write_text(markdown(results))
    print(f"wrote {json_path} and {HERE / f'RESULTS{suffix}.md'}")
    failed = [n for n, b in column["benchmarks"].items() if "error" in b]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
