"""Data parallel: one deletion request by one process against the same by a torchrun job.

Both sides are the real command, ``kvw-ledger forget LEDGER forget.jsonl``, each on a
fresh copy of one ledger (retain statistics already registered), in fresh processes,
rounds interleaved, median of the timed rounds; wall time end to end (interpreter
start, imports, model fingerprint and load, the progressive loop, checks, commit):

  one        ``kvw-ledger forget ...``
  parallel   ``torchrun --nproc_per_node N kvw-ledger forget ...``: every rank measures
             its share of each batch, sums are all-reduced, rank 0 commits

On the CPU, N = 2 with the gloo backend and one thread per process (these are 2-core
machines: one process gets one thread too, so both sides use the same cores). On CUDA
the model is a ~1.1B-parameter Llama in bfloat16; the one-process side runs on one GPU
(``--device-map auto`` with one GPU visible) and the parallel side, when more than one
GPU is visible, uses N = the number of GPUs with nccl, one GPU per rank. With one GPU
there is nothing to run in parallel and the module says so.

Beside the time, the equality the tests hold: the largest absolute difference between
the two ledgers' exponents.

    python benchmarks/run.py --only parallel [--quick] [--device cuda]
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from kvw_ledger.ledger import Ledger

import graddiff
from common import Figure, Result

HERE = Path(__file__).resolve().parent
ITEM = "7. data parallel"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Setting:
    """The model and data of one run (also what graddiff.write_records reads)."""

    vocab_size: int = 8000
    hidden_size: int = 512
    intermediate_size: int = 1536  # d_ff: value vectors per layer
    num_layers: int = 8
    num_heads: int = 8
    forget_records: int = 48
    retain_records: int = 32
    question_words: int = 48
    answer_words: int = 16
    batch_size: int = 8  # records per batch: each rank measures batch_size / N of them
    gamma: float = 0.02
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"


QUICK = Setting(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                forget_records=16, question_words=24, answer_words=8, repeats=1, warmup=0)  # fmt: skip
# A ~1.1B-parameter Llama in bfloat16 (TinyLlama's shape), as items 1-2 use on a GPU.
CUDA = Setting(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16,
               forget_records=64, retain_records=64, batch_size=16, dtype="bfloat16")  # fmt: skip


def prepare(workdir: Path, setting: Setting) -> dict[str, Path]:
    """graddiff's model, data and ledger, with retain statistics registered once."""
    paths = graddiff.prepare(workdir, setting)  # type: ignore[arg-type]  # rebuilds the workdir when the setting changes
    retained = workdir / "retained"
    if not retained.is_file():
        ledger = Ledger.open(paths["ledger"])
        ledger.retain(paths["retain"], batch_size=setting.batch_size, progress=False)
        retained.touch()
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(paths: dict[str, Path], ledger: Path, setting: Setting, ranks: int, device: str) -> list[str]:
    """The forget command line: plain for one process, under torchrun for ``ranks`` > 1."""
    forget = [str(BIN / "kvw-ledger"), "forget", str(ledger), str(paths["forget"]), "--id", "bench",
              "--batch-size", str(setting.batch_size), "--gamma", str(setting.gamma), "-q",
              "--on-fail", "warn"]  # fmt: skip
    if device == "cuda" and ranks == 1:
        forget += ["--device-map", "auto"]  # one GPU visible (see environment())
    if ranks == 1:
        return forget
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *forget]  # fmt: skip


def environment(device: str, ranks: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif ranks == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def timed(paths: dict[str, Path], setting: Setting, ranks: int, device: str, name: str) -> tuple[float, Path]:
    """Seconds of one forget on a fresh copy of the ledger; returns the copy too."""
    copy = paths["ledger"].with_name(f"ledger-{name}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(paths["ledger"], copy)
    start = time.perf_counter()
    run = subprocess.run(command(paths, copy, setting, ranks, device), env=environment(device, ranks),
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{name} forget failed ({run.returncode}): {run.stderr[-2000:]}")
    return seconds, copy


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Item 7: a forget by one process vs by a torchrun job, wall time; and their equality."""
    ranks = 2 if device == "cpu" else torch.cuda.device_count()
    setting = QUICK if quick else CUDA if device == "cuda" else Setting()
    if ranks < 2:
        return Result([], {"skipped": f"{ranks} GPU visible: the data-parallel form needs more than one"})
    paths = prepare(HERE / "_work" / f"parallel-{device}{'-quick' if quick else ''}", setting)
    times: dict[str, list[float]] = {"one": [], "parallel": []}
    ledgers: dict[str, Path] = {}
    for round_ in range(setting.warmup + setting.repeats):
        for name, n in (("one", 1), ("parallel", ranks)):
            seconds, ledgers[name] = timed(paths, setting, n, device, name)
            if round_ >= setting.warmup:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    a, b = Ledger.open(ledgers["one"]), Ledger.open(ledgers["parallel"])
    wa, wb = a.request_exponents("bench"), b.request_exponents("bench")
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    body = b.head().body
    backend = "gloo, 1 thread per process" if device == "cpu" else "nccl, 1 GPU per rank"
    with torch.device("meta"):  # the shapes only
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            tf.AutoConfig.from_pretrained(paths["model"])).parameters())  # fmt: skip
    described = (
        f"{n_params / 1e6:.0f}M-parameter Llama ({setting.num_layers} layers, {setting.dtype}), "
        f"{setting.forget_records} forget records in {body['batches']} batches of {setting.batch_size}, "
        f"{body['tokens']} answer tokens; {ranks} ranks ({backend}); median of {setting.repeats}, end to end"
    )
    figures = [
        Figure(ITEM, f"forget wall time, one process / torchrun x{ranks}", med["one"] / med["parallel"], None,
               f"{med['one']:.1f} s vs {med['parallel']:.1f} s; {described}"),
        Figure(ITEM, "exponents equal one process's (1e-6 / max abs difference)",
               1e-6 / max(diff, 1e-12), 1.0, f"max abs difference {diff:.3g}"),
    ]  # fmt: skip
    for ledger in ledgers.values():
        shutil.rmtree(ledger, ignore_errors=True)
    return Result(figures, {"setting": asdict(setting), "ranks": ranks, "seconds": times,
                            "max_abs_exponent_difference": diff, "model_parameters": n_params})  # fmt: skip


if __name__ == "__main__":
    result = run("--quick" in sys.argv, "cuda" if "--cuda" in sys.argv else "cpu")
    for f in result.figures:
        print(f"{f.name}: {f.ratio:.3g}x - {f.detail}")
