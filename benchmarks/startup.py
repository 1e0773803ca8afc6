"""Read verbs that start at once (issue 17, item 3): whole-process wall time.

``kvw-ledger log --json``, ``show`` of a journal-only entry and ``--help`` read JSON
files, so they import neither torch, transformers nor zarr. Each is timed as a
whole process (the console script, as a user runs it), median of 5 after a
warm-up, beside ``python -c pass`` (the interpreter's own start) for scale. The
target is at most 0.25 s; the figure is 0.25 s over the measured median, so it
meets the target at >= 1. The load average at the start is recorded: on a shared
machine the interpreter's own start grows with it, and so does every figure.

The ledger read is a 4-layer random Llama's: init, retain and 10 forgets (quick:
3), so the journal holds real entries with their bodies and hashes.

    python benchmarks/startup.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import transformers as tf

from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger

from common import Figure, Result, median_seconds
from scale import qa_records, save_model, write_jsonl

TARGET_SECONDS = 0.25


def _ledger(work: Path, requests: int) -> Path:
    """init, retain and ``requests`` forgets on a 4-layer random Llama."""
    config = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    save_model(work / "model", config)
    ledger = Ledger.create(work / "led", work / "model", progress=False)
    ledger.retain(write_jsonl(work / "retain.jsonl", qa_records(8)), progress=False)
    for i in range(requests):
        data = write_jsonl(work / f"f{i}.jsonl", qa_records(1, offset=8 + i))
        ledger.forget(data, request_id=f"r{i}", config=KVWConfig(layers=(0, 3)),
                      limits=ledger.limits(on_fail="warn"), progress=False)
    return work / "led"


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Times the light verbs as whole processes; ``device`` is unused (no tensors)."""
    script = str(Path(sys.executable).with_name("kvw-ledger"))
    with tempfile.TemporaryDirectory(prefix="kvw-startup-") as tmp:
        ledger = str(_ledger(Path(tmp), 3 if quick else 10))

        def process(*argv: str) -> Any:
            return lambda: subprocess.run(argv, check=True, capture_output=True)

        runs = {
            "python -c pass": process(sys.executable, "-c", "pass"),
            "log --json": process(script, "log", ledger, "--json"),
            "show 2": process(script, "show", ledger, "2"),
            "--help": process(script, "--help"),
        }
        load = os.getloadavg()[0]
        seconds = median_seconds(runs, repeats=5, warmup=1)
    interpreter = seconds["python -c pass"]
    figures = [
        Figure(
            "3. read verbs start at once",
            f"kvw-ledger {name} within {TARGET_SECONDS} s",
            TARGET_SECONDS / seconds[name],
            1.0,
            f"{seconds[name]:.3f} s whole process, median of 5 (python -c pass: {interpreter:.3f} s; "
            f"load average {load:.1f} on {os.cpu_count()} cores)",
        )
        for name in ("log --json", "show 2", "--help")
    ]
    return Result(figures, {"seconds": seconds, "requests": 3 if quick else 10, "load_average": load})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(quick=args.quick)
    for f in result.figures:
        print(f"{f.name}: {f.detail}")
    print(json.dumps(result.details, indent=2))


if __name__ == "__main__":
    main()
