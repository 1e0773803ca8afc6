"""Export and materialise: speed and memory against plain copies (issue 7, items 3 and 4).

A Llama-shaped random model (bfloat16, ~340 MB in 4 shards saved with
``save_pretrained(max_shard_size="100MB")``; quick: ~12 MB in 3 shards) gets a
ledger (``Ledger.create``, a real ``retain`` and a real ``forget``), so that an
export rewrites every site's weights. Then, side by side:

  item 3  ``Ledger.export`` of HEAD  vs  ``shutil.copyfile`` of each safetensors file,
          and vs copyfile + fsync of each (interleaved medians; each run writes a
          new directory); and the export's peak memory in a fresh process vs the
          largest shard
  item 4  ``LiveModel.apply()`` at HEAD (bases read once, kept in memory) into a
          loaded model  vs  ``param.data.copy_(tensor)`` of the same (precomputed)
          site tensors; and, as a second figure without a target, the cold
          ``Ledger.materialize(model)``, which reads every base from the store per call

Export checks the model directory's fingerprint first (it hashes every weight
file, once per process: model_files remembers the digests), then reads,
transforms, writes and fsyncs each shard; the copy does none of the checking or
fsyncing. The uncached hashing alone is timed too, as a detail.

    python benchmarks/transfer.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from kvw_ledger import model_files
from kvw_ledger.ledger import Ledger
from kvw_ledger.live import LiveModel
from kvw_ledger.loading import load_model
from kvw_ledger.sites import site_weight
from kvw_ledger.weakening import Weakening

from common import Figure, Result, in_fresh_process, median_seconds, mib
from scale import first_request, no_fsync, rss_over, rss_over_second, save_model

HERE = Path(__file__).resolve().parent


def io_config(quick: bool) -> tf.LlamaConfig:
    """~170M parameters (~340 MB in bfloat16); quick: ~6M (~12 MB)."""
    if quick:
        return tf.LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def copy_files(files: list[Path], out: Path, *, durable: bool = False) -> None:
    """The baseline: ``shutil.copyfile`` of each weight file into a new directory;
    ``durable`` also fsyncs each copy, as export fsyncs what it writes."""
    out.mkdir()
    for src in files:
        shutil.copyfile(src, out / src.name)
        if durable:
            with open(out / src.name, "rb") as fh:
                os.fsync(fh.fileno())


def uncached_fingerprint(model_dir: Path) -> None:
    """The sha256 of every weight file, as an export computes it without the ledger's
    fingerprint cache (the timed exports, after the warm-up round, find it trusted)."""
    model_files.fingerprint(model_dir, progress=False)


def export_vs_copy(ledger: Ledger, model_dir: Path, work: Path, repeats: int) -> dict[str, float]:
    """Interleaved median seconds of export, the copies, export without fsync, and the
    fingerprint hashing export starts with."""
    files = shards(model_dir)
    fresh = itertools.count()  # a new output directory per run: export never overwrites

    def export() -> None:
        ledger.export(work / f"export-{next(fresh)}", progress=False)

    def export_no_fsync() -> None:
        with no_fsync():  # what the rewrite costs before the data reaches the disk
            export()

    runs = {
        "export": export,
        "copy": lambda: copy_files(files, work / f"copy-{next(fresh)}"),
        "copy_fsync": lambda: copy_files(files, work / f"copy-{next(fresh)}", durable=True),
        "export_no_fsync": export_no_fsync,
        "hash": functools.partial(uncached_fingerprint, model_dir),
    }
    seconds = median_seconds(runs, repeats=repeats)
    for out in itertools.chain(work.glob("export-*"), work.glob("copy-*")):
        shutil.rmtree(out)
    return seconds


def export_memory(ledger: Ledger, work: Path) -> dict[str, Any]:
    """Peak RSS of an export in a fresh interpreter, over its RSS just before the export.

    The child has imported kvw_ledger and unpickled the ledger; ``rss_over`` resets
    the kernel's high-water mark, reads VmRSS, exports, and reads VmHWM: the
    difference is everything the export made resident (buffers, tensors, and the
    libtorch code its first tensor operations page in), whole-process, not sampled.
    A second child exports twice and measures the second export: the steady state.
    """
    export = functools.partial(ledger.export, progress=False)
    fresh = in_fresh_process(rss_over, export, work / "export-memory")["out"]
    shutil.rmtree(work / "export-memory")
    second = in_fresh_process(rss_over_second, export, (work / "export-first",), work / "export-second")["out"]
    shutil.rmtree(work / "export-first")
    shutil.rmtree(work / "export-second")
    # glibc raises its mmap threshold as big blocks are freed (up to 32 MiB), so later
    # blocks come from the heap, and freed heap memory stays resident: a fixed
    # threshold shows what the export itself holds, without what the allocator keeps.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        fixed = in_fresh_process(rss_over, export, work / "export-fixed")["out"]
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    shutil.rmtree(work / "export-fixed")
    return {"rss_before": fresh["before"], "rss_peak": fresh["peak"], "export": fresh["peak"] - fresh["before"],
            "anon_after": fresh["anon_after"], "file_after": fresh["file_after"],
            "second_export": second["peak"] - second["before"],
            "fixed_mmap_threshold": fixed["peak"] - fixed["before"]}


def materialize_vs_copy(ledger: Ledger, model: nn.Module, repeats: int) -> dict[str, float]:
    """Interleaved median seconds of ``LiveModel.apply`` and ``materialize`` at HEAD, of
    copying the same tensors in, and of reading the sums at HEAD (part of every
    ``materialize``; part of ``apply`` only after a commit); plus the one-off seconds
    of building the LiveModel (every base read once)."""
    exponents = Weakening(ledger.exponents())
    values = {s.name: ledger.effective(s.name, exponents) for s in ledger.sites}
    weights = {s.name: site_weight(model, s) for s in ledger.sites}
    start = time.perf_counter()
    live = LiveModel(ledger, model)
    build = time.perf_counter() - start
    compiled = LiveModel(ledger, model, compile=True)
    start = time.perf_counter()
    compiled.apply()  # the first call compiles the kernel (or loads it from torch's cache)
    compile_seconds = time.perf_counter() - start

    def copy() -> None:
        with torch.no_grad():
            for name, value in values.items():
                weights[name].copy_(value)

    runs = {"live": live.apply, "compiled": compiled.apply, "copy": copy,
            "materialize": functools.partial(ledger.materialize, model), "sums": ledger.sums}
    return {**median_seconds(runs, repeats=repeats), "live_build": build, "compile": compile_seconds}


def run(quick: bool = False, device: str = "cpu", repeats: int = 3) -> Result:
    """Items 3 and 4: export and materialise against plain copies."""
    del device  # export and materialise run on the CPU
    config = io_config(quick)
    with tempfile.TemporaryDirectory(prefix="kvw-transfer-") as tmp:
        work = Path(tmp)
        model_dir = save_model(work / "model", config, max_shard_size="4MB" if quick else "100MB")
        ledger = first_request(work / "ledger", model_dir, work)
        files = shards(model_dir)
        total, largest = sum(p.stat().st_size for p in files), max(p.stat().st_size for p in files)
        seconds = export_vs_copy(ledger, model_dir, work, repeats)
        memory = export_memory(ledger, work)
        model = load_model(model_dir)
        warm = materialize_vs_copy(ledger, model, repeats=5 if quick else 2 * repeats + 1)
        n_sites = len(ledger.sites)
        site_bytes = sum(site_weight(model, s).nbytes for s in ledger.sites)
    setting = f"{len(files)} shards, {mib(total)}, largest {mib(largest)}, bfloat16"

    def rate(name: str) -> str:
        return f"{total / seconds[name] / 2**20:.0f} MiB/s"

    return Result(
        figures=[
            Figure("3. export", "throughput vs shutil.copyfile of the shards", seconds["copy"] / seconds["export"], 0.5,
                   f"export {rate('export')} ({seconds['export']:.2f} s; {seconds['export_no_fsync']:.2f} s "
                   f"without fsync; the fingerprint check finds the ledger's cache trusted; without it, add "
                   f"~{seconds['hash']:.2f} s) vs copy {rate('copy')} ({seconds['copy']:.2f} s, not fsynced); "
                   f"{setting}"),
            Figure("3. export", "throughput vs copyfile + fsync of the shards",
                   seconds["copy_fsync"] / seconds["export"], 0.5,
                   f"export {rate('export')} vs durable copy {rate('copy_fsync')} ({seconds['copy_fsync']:.2f} s); "
                   "export fsyncs every file it writes"),
            Figure("3. export", "peak memory: 1.25 x largest shard / export's peak RSS",
                   1.25 * largest / memory["export"], 1.0,
                   f"export peak {mib(memory['export'])} over the RSS before it (fresh process: "
                   f"{mib(memory['rss_peak'])} peak, {mib(memory['rss_before'])} before; still resident after "
                   f"it: {mib(memory['file_after'])} file-backed, {mib(memory['anon_after'])} anonymous) vs "
                   f"largest shard {mib(largest)}; a second export in the same process peaks at "
                   f"{mib(memory['second_export'])} over its start; with glibc's mmap threshold fixed at 1 MiB "
                   f"(MALLOC_MMAP_THRESHOLD_) at {mib(memory['fixed_mmap_threshold'])}: the rest is freed "
                   f"memory the allocator keeps"),
            Figure("4. materialise", "LiveModel(compile=True).apply vs param.data.copy_ of the same tensors",
                   warm["copy"] / warm["compiled"], 0.5,
                   f"{warm['compiled'] * 1e3:.1f} vs {warm['copy'] * 1e3:.1f} ms for {n_sites} sites "
                   f"({mib(site_bytes)}, bfloat16): one torch.compile kernel per site widens, multiplies and "
                   f"rounds in one pass, bit-identical to materialize; its first call took "
                   f"{warm['compile']:.1f} s (compiling, or loading torch's on-disk cache)"),
            Figure("4. materialise", "LiveModel.apply (eager, no compiler) vs the same copy_",
                   warm["copy"] / warm["live"], 0.5,
                   f"{warm['live'] * 1e3:.1f} vs {warm['copy'] * 1e3:.1f} ms for {n_sites} sites "
                   f"({mib(site_bytes)}, bfloat16); model loaded, at HEAD; the bases read once "
                   f"({warm['live_build']:.2f} s, {mib(site_bytes)} kept), every site written per call; "
                   f"HEAD's factors kept while no commit lands (after one, reading the sums adds "
                   f"{warm['sums'] * 1e3:.1f} ms)"),
            Figure("4. materialise", "cold Ledger.materialize vs param.data.copy_ (no target)",
                   warm["copy"] / warm["materialize"], None,
                   f"{warm['materialize'] * 1e3:.0f} vs {warm['copy'] * 1e3:.1f} ms; page cache hot, at HEAD "
                   "(head cache), but every base read and decompressed from the store on every call: "
                   "the path for one-off use, not for switching versions"),
        ],
        details={"weight_bytes": total, "largest_shard_bytes": largest, "shards": len(files),
                 "export_seconds": seconds, "export_memory": memory, "materialize_seconds": warm,
                 "sites": n_sites, "site_bytes": site_bytes},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    out = run(args.quick, repeats=args.repeats)
    for f in out.figures:
        print(f"{f.item} {f.name}: {f.ratio:.2f}x (target {f.target}) - {f.detail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"figures": [f.to_json() for f in out.figures], **out.details}, fh, indent=2)


if __name__ == "__main__":
    main()
