"""A forget's fixed cost, before and after the model fingerprint cache (issue 11).

The fixed cost of a request is everything ``Ledger.forget`` does besides its forward
passes: open the ledger, check the model directory (hash its files, or find their
digests in the cache), load the model and tokenizer, encode the data, rewrite the
weights after each batch, run the stability checks, commit. It is measured as the
request's wall time minus the time spent inside ``CoefficientHooks.measure`` (the
forward passes; on a GPU each is synchronised so that its time is its own).

Two models, each with a ledger holding retain statistics, and one 32-record request
(4 batches of 8), every run a real ``Ledger.forget`` in a fresh interpreter, as each
``kvw-ledger forget`` is:

  134M   the Llama of item 2 (benchmarks/graddiff.py, float32, 512 MiB of weights)
  2 GB   a Llama whose 2 GB are mostly embeddings (96,000 words x 2048, untied), with
         2 layers: hashing and loading grow with the directory, the forward passes
         (which stop after the last layer) stay small

``before`` removes the cache from the ledger copy first (every weight file hashed, as
before the cache existed); ``after`` finds it trusted. Rounds interleave before and
after; the figures are medians. The target: the fixed cost at most 20% of the request
(request / fixed >= 5).

    python benchmarks/run.py --only fixedcost [--quick] [--device cuda]
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kvw_ledger.fingerprint_cache import CACHE_NAME
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import torch_threads

from common import Figure, Result, in_fresh_process
from graddiff import QUICK, Setting, prepare

HERE = Path(__file__).resolve().parent
ITEM = "3b. a forget's fixed cost"

MODELS: dict[str, Setting] = {
    "134M": Setting(),
    "2 GB": Setting(vocab_size=96000, hidden_size=2048, intermediate_size=5632, num_layers=2, num_heads=16),
}
QUICK_MODELS: dict[str, Setting] = {
    "tiny": QUICK,
    "200 MB": replace(QUICK, vocab_size=96000, hidden_size=256, num_layers=2),
}


def forget_side(ledger_dir: str, forget: str, setting: Setting, cached: bool, device: str) -> dict[str, Any]:
    """One request in this (fresh) interpreter; returns its wall time and its parts."""
    from kvw_ledger import coefficients, model_files
    from kvw_ledger import ledger as ledger_module

    ledger_path = Path(ledger_dir)
    if not cached:
        (ledger_path / CACHE_NAME).unlink(missing_ok=True)
    spent = {"forward": 0.0, "hash": 0.0, "load": 0.0}
    measure, hash_files = coefficients.CoefficientHooks.measure, model_files._hash_files
    load_model = ledger_module.load_model

    def timed_measure(self: Any, batch: Any) -> Any:
        start = time.perf_counter()
        out = measure(self, batch)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        spent["forward"] += time.perf_counter() - start
        return out

    def timed_hash(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = hash_files(*args, **kwargs)
        spent["hash"] += time.perf_counter() - start
        return out

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = load_model(*args, **kwargs)
        spent["load"] += time.perf_counter() - start
        return out

    coefficients.CoefficientHooks.measure = timed_measure  # type: ignore[method-assign]
    ledger_module.load_model = timed_load
    model_files._hash_files = timed_hash
    config = KVWConfig(gamma=setting.gamma, batch_size=setting.batch_size)
    dtype = "bfloat16" if device == "cuda" else "auto"
    with torch_threads(setting.threads):
        start = time.perf_counter()
        entry = Ledger.open(ledger_path).forget(
            forget, request_id="bench", config=config, limits={"on_fail": "warn"}, progress=False,
            device=device, dtype=dtype,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "forward_seconds": spent["forward"],
        "hash_seconds": spent["hash"],
        "load_seconds": spent["load"],
        "fixed_seconds": seconds - spent["forward"],
        "batches": entry.body["batches"],
    }


def retain_side(ledger_dir: str, retain: str, setting: Setting, device: str) -> int:
    """Registers retain statistics (which also fills the fingerprint cache)."""
    with torch_threads(setting.threads):
        entry = Ledger.open(ledger_dir).retain(
            retain, stats_id="retain", batch_size=setting.batch_size, progress=False, device=device,
            dtype="bfloat16" if device == "cuda" else "auto",
        )
    return int(entry.body["records"])


def measure(name: str, setting: Setting, quick: bool, device: str) -> dict[str, Any]:
    """Interleaved before/after rounds on one model; medians and every round."""
    slug = name.replace(" ", "").lower()
    workdir = HERE / "_work" / (f"fixedcost-{slug}" if name not in ("134M", "tiny") else
                                ("graddiff-quick" if quick else "graddiff"))  # fmt: skip
    paths = prepare(workdir, setting)  # the 134M (tiny) one is item 2's, shared
    model_bytes = sum(p.stat().st_size for p in paths["model"].glob("*.safetensors"))
    with_stats = paths["ledger"].with_name("ledger-fixedcost")
    if not (with_stats / "journal" / "00000002.json").is_file():
        shutil.rmtree(with_stats, ignore_errors=True)
        shutil.copytree(paths["ledger"], with_stats)
        in_fresh_process(retain_side, str(with_stats), str(paths["retain"]), setting, device)
    copy = paths["ledger"].with_name("ledger-fixedcost-request")
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    rounds = setting.warmup + (2 if quick else max(3, setting.repeats))
    for round_ in range(rounds):
        for side in ("before", "after"):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(with_stats, copy)  # copy2 keeps the cache file's timestamp
            out = in_fresh_process(forget_side, str(copy), str(paths["forget"]), setting, side == "after", device)
            if round_ >= setting.warmup:
                runs[side].append(out["out"])
    shutil.rmtree(copy, ignore_errors=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    return {"model_bytes": model_bytes, "setting": asdict(setting), "median": med, "runs": runs}


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Item 3b: the fixed cost of one forget, before and after the fingerprint cache."""
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    for name, setting in (QUICK_MODELS if quick else MODELS).items():
        m = measure(name, setting, quick, device)
        details[name] = m
        before, after = m["median"]["before"], m["median"]["after"]
        size = f"{m['model_bytes'] / 2**20:.0f} MiB of weights"
        for side, got in (("before", before), ("after", after)):
            share = got["fixed_seconds"] / got["seconds"]
            figures.append(Figure(
                ITEM, f"{name}: request / fixed cost, {side} the cache (fixed <= 20%)",
                got["seconds"] / got["fixed_seconds"], 5.0,
                f"fixed {got['fixed_seconds']:.2f} s of {got['seconds']:.2f} s ({share:.0%}; hashing "
                f"{got['hash_seconds']:.2f} s, loading the model {got['load_seconds']:.2f} s; forward "
                f"passes {got['forward_seconds']:.2f} s); {size}, "
                f"{int(got['batches'])} batches of {setting.batch_size}, {setting.threads} torch thread(s), "
                f"median of {len(m['runs'][side])}",
            ))  # fmt: skip
        figures.append(Figure(
            ITEM, f"{name}: fixed cost before / after the cache", before["fixed_seconds"] / after["fixed_seconds"],
            None, f"{before['fixed_seconds']:.2f} s vs {after['fixed_seconds']:.2f} s; hashing "
            f"{before['hash_seconds']:.2f} s vs {after['hash_seconds']:.3f} s",
        ))  # fmt: skip
    return Result(figures, details)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for f in run(args.quick, args.device).figures:
        print(f"{f.name}: {f.ratio:.2f}x ({f.detail})")


if __name__ == "__main__":
    main()
