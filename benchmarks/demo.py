"""How long the first `make demo` takes, idle and beside a busy core; the second run too.

    python benchmarks/demo.py                 # first run in a fresh workdir, then a second run
    python benchmarks/demo.py --busy          # the same with a busy loop holding one core
    python benchmarks/demo.py --steps 40      # training steps: 2 threads (the old default) vs auto

Targets (issue 17): first run <= 4 min idle, <= 8 min beside a busy core, second
run <= 30 s, nothing downloaded. Absolute times depend on what else the machine
runs; ``--steps`` measures the cause side by side (interleaved, same load), which
is the figure to trust on a shared machine. Writes ``benchmarks/demo-timing.json``
(merged with earlier runs). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).with_name("demo-timing.json")
TARGETS = {"first_idle_s": 240, "first_busy_s": 480, "second_s": 30}


@contextmanager
def busy_core(on: bool):  # type: ignore[no-untyped-def]
    """A process that keeps one core busy for the duration (``while True: pass``)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def demo_runs(busy: bool) -> dict[str, Any]:
    cli = Path(sys.executable).with_name("kvw-ledger")
    with tempfile.TemporaryDirectory(prefix="kvw-demo-bench-") as tmp, busy_core(busy):
        out: dict[str, Any] = {"load_before": _load(), "busy_core": busy}
        first_metrics: list[Any] = []
        for run in ("first", "second"):
            t0 = time.perf_counter()
            done = subprocess.run(
                [str(cli), "demo", "--workdir", tmp, "--json"], capture_output=True, text=True, check=True
            )
            out[f"{run}_s"] = round(time.perf_counter() - t0, 1)
            report = json.loads(done.stdout)
            if run == "first":
                meta = json.loads((Path(report["model"]) / "instill.json").read_text())
                out["train_s"] = meta["train_seconds"]
                # The same bits whatever the load: compare this across runs (idle, --busy).
                out["model_sha256"] = hashlib.sha256(
                    b"".join(f.read_bytes() for f in sorted(Path(report["model"]).glob("*.safetensors")))
                ).hexdigest()
                out["rows"] = [
                    {"step": r["step"], **{s: [round(r["metrics"][s][m]["gen_acc"], 2) for m in ("image", "text")]
                                          for s in r["metrics"]}}
                    for r in report["rows"]
                ]  # fmt: skip
                out["targets_met"] = _targets_met(report["targets"])
            else:  # the same figures again, read from the evaluation cache
                out["second_rows_equal"] = [r["metrics"] for r in report["rows"]] == first_metrics
            first_metrics = [r["metrics"] for r in report["rows"]]
        out["load_after"] = _load()
    return out


def _targets_met(targets: dict[str, float]) -> str:
    from kvw_ledger.demo import _passes

    return f"{sum(_passes(k, v) for k, v in targets.items())} of {len(targets)}"


def step_ratio(steps: int, busy: bool) -> dict[str, Any]:
    """ms per training step with 2 threads (the old default) and with the free cores, interleaved."""
    from kvw_ledger.bench import instill
    from kvw_ledger.bench.profiles import BenchConfig, generate
    from kvw_ledger.cpu import CoreMeter
    from kvw_ledger.data import read_records

    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, config=BenchConfig(n_people=200, seed=0))
        cfg = instill.InstillConfig()
        records = read_records(paths.train)
        corpus = [f"Question: {r.question}\nAnswer: {r.answer}" for r in records]
        processor = instill._build_processor(cfg, corpus)
        examples = instill.encode_records([r for r in records if r.image is None], processor)
    model = instill._build_llava(cfg, processor.tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=True)
    hooks = instill._FFNTraining(model, True, cfg.activation_l1)
    pad = processor.tokenizer.pad_token_id
    rng = random.Random(0)
    batches = instill._batches(examples, cfg.batch_size, rng)
    meter = CoreMeter()
    model.train()

    def one(idx: list[int]) -> None:
        batch = instill.collate([examples[i] for i in idx], pad)
        hooks.mask = instill.cause_mask(batch["labels"], batch["attention_mask"])
        loss = model(**batch, use_cache=False).loss
        hooks.mask = None
        penalty = hooks.pop_penalty()
        loss = loss + penalty if penalty is not None else loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"2 threads": [], "auto": []}
    chosen: list[int] = []
    with busy_core(busy):
        load = _load()
        for k in range(steps):
            for mode in ("2 threads", "auto"):
                n = 2 if mode == "2 threads" else meter.threads()
                if mode == "auto":
                    chosen.append(n)
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                one(batches[k % len(batches)])
                times[mode].append(time.perf_counter() - t0)
    ms = {m: round(1000 * statistics.median(v[3:]), 1) for m, v in times.items()}
    return {"busy_core": busy, "load": load, "ms_per_step": ms, "auto_threads": sorted(set(chosen)),
            "ratio_2threads_over_auto": round(ms["2 threads"] / ms["auto"], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", action="store_true", help="keep one core busy beside it")
    parser.add_argument("--steps", type=int, help="time this many training steps per mode instead")
    args = parser.parse_args()
    if args.steps:
        key, result = f"steps{'_busy' if args.busy else ''}", step_ratio(args.steps, args.busy)
    else:
        key, result = f"demo{'_busy' if args.busy else ''}", demo_runs(args.busy)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[key] = result
    results["targets"] = TARGETS
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: result}, indent=2))


if __name__ == "__main__":
    main()
