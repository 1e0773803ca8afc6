"""One deletion request: kvw_ledger against GradDiff, wall time and peak memory.

On a Llama-shaped random model (134M parameters, 85M of them in its 12 layers; a tiny
one with --quick) saved as a model directory with a word-level tokenizer, and synthetic
forget and retain records (random words; the answer is the last dozen words):

  kvw       a real ``Ledger.forget`` on a ledger with retain statistics already
            registered: open the ledger, load and fingerprint-check the model, encode
            the forget file, run the progressive KVW loop, run the stability checks,
            commit the request (exponents and trace) to Zarr and the journal.
  graddiff  load the same model and tokenizer, encode the forget and retain files,
            then GradDiff (benchmarks/baselines.py): full fine-tuning with AdamW (fused,
            as transformers' Trainer runs it by default), one epoch over the very
            batches the KVW request uses, each paired with a retain batch of the same
            size. The fine-tuned model is not saved (that would only add to its time).
  load      the common floor: load the model and tokenizer, encode both files.

On the CPU each side runs in a fresh interpreter (``common.in_fresh_process``), so
its peak resident set is its own. Memory counts the peak RSS above the RSS the child
had right before the work started (interpreter, torch, transformers and kvw_ledger
imported): model weights, data, activations, and for GradDiff its gradients and
AdamW state. The interpreter and imports are subtracted; the model weights are not,
because each side must hold them (as ``torch.cuda.max_memory_allocated`` counts them
on a GPU). The weights are memory-mapped, so they count as they are touched: KVW stops
after its last weakened layer and never pages in the LM head. The increments above the ``load`` floor are in the details. Retain
statistics are measured once per retain set and reused by every request, so their
cost is reported on its own, as the ratio if a request had to pay them too.

With ``device="cuda"`` the model is a ~1.1B-parameter Llama in bfloat16 (``GPU``), both
sides run in this process on the GPU (the KVW side a real ``Ledger.forget(device="cuda")``,
model loading included; a ``load`` floor is timed beside it) and memory is
``torch.cuda.max_memory_allocated``.

    python benchmarks/run.py --only graddiff [--quick]
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama import modeling_llama  # noqa: F401  (see below)

from kvw_ledger.data import Encoder, encode_all, read_records
from kvw_ledger.devices import Placement
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model, load_processor, max_length, torch_threads

from baselines import GradDiffConfig, graddiff, kvw_batches, retain_batches
from common import Figure, PeakRSS, Result, in_fresh_process, mib

# The modeling_llama import above: transformers imports its model code lazily, on the
# first from_pretrained, ~2 s and tens of MiB that would land inside whichever side is
# measured. Importing it with this module puts it in every child's floor instead.

HERE = Path(__file__).resolve().parent
ITEM = "2. one request vs GradDiff"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Setting:
    """The model and data of one run."""

    vocab_size: int = 32000  # tokens; the tokenizer has one word per id
    hidden_size: int = 768
    intermediate_size: int = 2048  # d_ff: value vectors per layer
    num_layers: int = 12
    num_heads: int = 12
    forget_records: int = 32  # records in the deletion request
    retain_records: int = 64  # records the retain statistics are measured on
    question_words: int = 24  # random words per question (one token each)
    answer_words: int = 12  # random words per answer, + EOS: the tokens both methods work on
    batch_size: int = 8  # KVW batch size = GradDiff batch size (forget and retain)
    gamma: float = 0.02  # KVW strength (the paper's default)
    lr: float = 1e-5  # GradDiff learning rate
    repeats: int = 3  # timed rounds (each side once per round, interleaved)
    warmup: int = 1  # untimed rounds first (page cache, allocator)
    threads: int = 1  # torch threads per side: on a shared 2-core machine, 2 OpenMP threads stall
    dtype: str = "float32"  # the checkpoint's dtype (and the model's: --dtype auto)


# On a GPU (--device cuda): a ~1.1B-parameter Llama (TinyLlama's shape) in bfloat16.
GPU = Setting(
    hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16, dtype="bfloat16", threads=4,
)  # fmt: skip
QUICK = Setting(
    vocab_size=8000, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
    forget_records=16, retain_records=32, repeats=1, warmup=0,
)  # fmt: skip


# --- the setting on disk ---------------------------------------------------------


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. wN``: one token per word, BOS first, <unk> else."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_records(path: Path, n: int, setting: Setting, seed: int) -> Path:
    """``n`` records of random words (the ``Question: ...`` frame adds two <unk> tokens)."""
    rng = random.Random(seed)
    top = setting.vocab_size - len(SPECIALS)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(top)}" for _ in range(k))

    lines = [
        json.dumps({"question": words(setting.question_words), "answer": words(setting.answer_words)})
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(workdir: Path, setting: Setting) -> dict[str, Path]:
    """Model directory, data files and a fresh ledger (init only), reused while the
    setting is unchanged; returns their paths."""
    described = {k: v for k, v in asdict(setting).items() if (k, v) != ("dtype", "float32")}  # keys as before
    key = json.dumps({**described, "layout": 2}, sort_keys=True)  # bump when this changes
    paths = {
        "model": workdir / "model",
        "forget": workdir / "forget.jsonl",
        "retain": workdir / "retain.jsonl",
        "ledger": workdir / "ledger",
    }
    stamp = workdir / "setting.json"
    if stamp.is_file() and stamp.read_text() == key:
        return paths
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=setting.vocab_size, hidden_size=setting.hidden_size,
        intermediate_size=setting.intermediate_size, num_hidden_layers=setting.num_layers,
        num_attention_heads=setting.num_heads, num_key_value_heads=setting.num_heads,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).to(getattr(torch, setting.dtype)).save_pretrained(paths["model"])
    word_tokenizer(setting.vocab_size).save_pretrained(paths["model"])
    write_records(paths["forget"], setting.forget_records, setting, seed=1)
    write_records(paths["retain"], setting.retain_records, setting, seed=2)
    Ledger.create(paths["ledger"], paths["model"], progress=False)
    stamp.write_text(key)
    return paths


# --- what each fresh interpreter runs (module level, as spawn needs) ----------------


def load_side(model_dir: str, forget: str, retain: str, threads: int) -> dict[str, Any]:
    """The floor both sides stand on: model, tokenizer, both files encoded."""

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        model = load_model(model_dir)
        encoder = Encoder(load_processor(model_dir), max_length(model))
        encode_all(encoder, read_records(forget))
        encode_all(encoder, read_records(retain))
        return {"load_seconds": time.perf_counter() - start}

    return tracked(work, threads)


def retain_side(ledger_dir: str, retain: str, batch_size: int, threads: int) -> dict[str, Any]:
    """Registers retain statistics: done once per retain set, not per request."""

    def work() -> dict[str, Any]:
        ledger = Ledger.open(ledger_dir)
        entry = ledger.retain(retain, stats_id="retain", batch_size=batch_size, progress=False)
        return {"records": entry.body["records"]}

    return tracked(work, threads)


def kvw_side(ledger_dir: str, forget: str, setting: Setting) -> dict[str, Any]:
    """One deletion request through the ledger, exactly as ``kvw-ledger forget`` runs it."""

    def work() -> dict[str, Any]:
        config = KVWConfig(gamma=setting.gamma, batch_size=setting.batch_size)
        opened = Ledger.open(ledger_dir)
        entry = opened.forget(
            forget, request_id="bench", config=config, limits=opened.limits(on_fail="warn"),
            progress=False,
        )
        return {"batches": entry.body["batches"], "tokens": entry.body["tokens"]}

    return tracked(work, setting.threads)


def graddiff_side(model_dir: str, forget: str, retain: str, setting: Setting) -> dict[str, Any]:
    """GradDiff on the request's batches; times the loading and the training apart."""

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        model = load_model(model_dir)
        encoder = Encoder(load_processor(model_dir), max_length(model))
        pad = encoder.pad_token_id
        config = KVWConfig(gamma=setting.gamma, batch_size=setting.batch_size)
        forget_batches = kvw_batches(encode_all(encoder, read_records(forget)), config, pad)
        retain_examples = encode_all(encoder, read_records(retain))
        retain_b = retain_batches(retain_examples, len(forget_batches), setting.batch_size, pad)
        loaded = time.perf_counter()
        result = graddiff(model, forget_batches, retain_b, GradDiffConfig(lr=setting.lr))
        return {
            "load_seconds": loaded - start,
            "compute_seconds": time.perf_counter() - loaded,
            "steps": result.steps,
            "forward_passes": result.forward_passes,
            "backward_passes": result.backward_passes,
        }

    return tracked(work, setting.threads)


def tracked(work: Callable[[], dict[str, Any]], threads: int) -> dict[str, Any]:
    """Runs ``work`` with ``threads`` torch threads and adds ``seconds`` (its wall time) and
    ``memory``: its peak RSS above the RSS right before it (bytes).

    The kernel's lifetime peak (ru_maxrss) is exact but may date from the imports; when
    the work raised it, the peak is the work's and exact, else the work stayed below the
    imports' transient peak and a sampled peak (every 5 ms) is used instead.
    """
    start_max = _maxrss()
    with torch_threads(threads), PeakRSS() as sampler:
        start = PeakRSS.rss()
        clock = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - clock
    end_max = _maxrss()
    exact = end_max > start_max
    memory = end_max - start if exact else sampler.peak
    return {**out, "seconds": seconds, "memory": memory, "memory_exact": exact}


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- measuring --------------------------------------------------------------------


def measure_cpu(paths: dict[str, Path], setting: Setting) -> dict[str, Any]:
    """Each side in fresh interpreters, rounds interleaved; medians of the timed rounds.

    The warm-up rounds run only the loading floor: enough to bring the model files into
    the page cache, which is all a fresh interpreter can carry over from one run to the next.
    Retain statistics are measured once, after the warm-up.
    """
    model, forget, retain = str(paths["model"]), str(paths["forget"]), str(paths["retain"])
    for _ in range(setting.warmup):
        in_fresh_process(load_side, model, forget, retain, setting.threads)
    # Retain statistics once per run, on a copy of the fresh ledger; every request then
    # starts from a copy of that one.
    with_stats = paths["ledger"].with_name("ledger-retain")
    shutil.rmtree(with_stats, ignore_errors=True)
    shutil.copytree(paths["ledger"], with_stats)
    retain_cost = _side(
        in_fresh_process(retain_side, str(with_stats), retain, setting.batch_size, setting.threads)
    )
    copy = paths["ledger"].with_name("ledger-request")
    runs: dict[str, list[dict[str, Any]]] = {"load": [], "kvw": [], "graddiff": []}
    for _ in range(setting.repeats):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(with_stats, copy)
        runs["load"].append(_side(in_fresh_process(load_side, model, forget, retain, setting.threads)))
        runs["kvw"].append(_side(in_fresh_process(kvw_side, str(copy), forget, setting)))
        runs["graddiff"].append(_side(in_fresh_process(graddiff_side, model, forget, retain, setting)))
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(with_stats, ignore_errors=True)
    med = {name: _median(r) for name, r in runs.items()}
    # The loading floor in seconds: the load side's and GradDiff's own loading (same work).
    load_seconds = statistics.median(
        [r["load_seconds"] for r in runs["load"]] + [r["load_seconds"] for r in runs["graddiff"]]
    )
    kvw = {**med["kvw"], "compute_seconds": med["kvw"]["seconds"] - load_seconds}
    return {
        "kvw": kvw,
        "graddiff": med["graddiff"],
        "load": {**med["load"], "floor_seconds": load_seconds},
        "retain_stats": retain_cost,
        "runs": runs,
    }


def _side(m: dict[str, Any]) -> dict[str, Any]:
    """One child's figures (see ``tracked``) and its whole-process peak RSS."""
    return {"process_peak_rss": m["peak_rss"], **m["out"]}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number across rounds (per key, so a figure may mix rounds)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if not isinstance(runs[0][k], bool)}


def measure_cuda(paths: dict[str, Path], setting: Setting) -> dict[str, Any]:
    """On the GPU, in this process, in bfloat16: a real ``Ledger.forget(device="cuda")``
    against GradDiff on a model loaded onto the GPU, rounds interleaved; memory is the peak
    allocated, weights included. Retain statistics are measured once, on the GPU too."""
    placement = Placement.resolve("cuda", setting.dtype)
    with_stats = paths["ledger"].with_name("ledger-retain")
    shutil.rmtree(with_stats, ignore_errors=True)
    shutil.copytree(paths["ledger"], with_stats)
    copy = paths["ledger"].with_name("ledger-request")
    runs: dict[str, list[dict[str, Any]]] = {"load": [], "kvw": [], "graddiff": [], "retain": []}

    def timed(name: str, work: Callable[[], dict[str, Any]], keep: bool) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = work()
        torch.cuda.synchronize()
        if keep:
            runs[name].append({"seconds": time.perf_counter() - start, "memory": torch.cuda.max_memory_allocated(), **out})
        torch.cuda.empty_cache()

    def retain() -> dict[str, Any]:
        entry = Ledger.open(with_stats).retain(paths["retain"], stats_id="retain", batch_size=setting.batch_size,
                                               progress=False, device=placement.device, dtype=placement.dtype)
        return {"records": entry.body["records"]}

    def load() -> dict[str, Any]:
        model = load_model(paths["model"], placement=placement)
        encoder = Encoder(load_processor(paths["model"]), max_length(model))
        encode_all(encoder, read_records(paths["forget"]))
        encode_all(encoder, read_records(paths["retain"]))
        return {}

    def kvw() -> dict[str, Any]:
        entry = Ledger.open(copy).forget(
            paths["forget"], request_id="bench", config=KVWConfig(gamma=setting.gamma, batch_size=setting.batch_size),
            limits={"on_fail": "warn"}, progress=False, device=placement.device, dtype=placement.dtype,
        )
        return {"batches": entry.body["batches"], "tokens": entry.body["tokens"]}

    def gd() -> dict[str, Any]:
        start = time.perf_counter()
        model = load_model(paths["model"], placement=placement)
        encoder = Encoder(load_processor(paths["model"]), max_length(model))
        pad = encoder.pad_token_id
        config = KVWConfig(gamma=setting.gamma, batch_size=setting.batch_size)
        forget_b = kvw_batches(encode_all(encoder, read_records(paths["forget"])), config, pad)
        retain_b = retain_batches(encode_all(encoder, read_records(paths["retain"])), len(forget_b),
                                  setting.batch_size, pad)
        loaded = time.perf_counter()
        out = graddiff(model, forget_b, retain_b, GradDiffConfig(lr=setting.lr))
        return {"load_seconds": loaded - start, "compute_seconds": time.perf_counter() - loaded, "steps": out.steps,
                "forward_passes": out.forward_passes, "backward_passes": out.backward_passes}

    timed("retain", retain, keep=True)
    for round_ in range(setting.warmup + setting.repeats):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(with_stats, copy)
        keep = round_ >= setting.warmup
        timed("load", load, keep)
        timed("kvw", kvw, keep)
        timed("graddiff", gd, keep)
    shutil.rmtree(copy, ignore_errors=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    med["kvw"]["compute_seconds"] = med["kvw"]["seconds"] - med["load"]["seconds"]
    return {"kvw": med["kvw"], "graddiff": med["graddiff"], "load": med["load"], "retain_stats": med["retain"],
            "runs": runs}


# --- figures ----------------------------------------------------------------------


def figures(kvw: dict[str, Any], graddiff: dict[str, Any], retain_seconds: float, setting: str) -> list[Figure]:
    """The item's figures, each GradDiff's cost over kvw_ledger's (larger is better for us).

    ``kvw`` and ``graddiff`` hold ``seconds`` (whole request, model loading included),
    ``compute_seconds`` (the loading floor taken off) and ``memory`` (peak bytes).
    """
    return [
        Figure(ITEM, "time per request, end to end (GradDiff / kvw_ledger)",
               graddiff["seconds"] / kvw["seconds"], 10.0,
               f"{graddiff['seconds']:.1f} s vs {kvw['seconds']:.1f} s, both loading the model; {setting}"),
        Figure(ITEM, "time per request, model loading taken off (GradDiff / kvw_ledger)",
               graddiff["compute_seconds"] / kvw["compute_seconds"], 10.0,
               f"{graddiff['compute_seconds']:.1f} s vs {kvw['compute_seconds']:.1f} s"),
        Figure(ITEM, "peak memory (GradDiff / kvw_ledger)", graddiff["memory"] / kvw["memory"], 3.5,
               f"{mib(graddiff['memory'])} vs {mib(kvw['memory'])}, weights included"),
        Figure(ITEM, "time if retain stats were paid per request (GradDiff / kvw_ledger + retain)",
               graddiff["seconds"] / (kvw["seconds"] + retain_seconds), None,
               f"retain stats {retain_seconds:.1f} s once per retain set, amortised over requests"),
    ]  # fmt: skip


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Item 2: one deletion request with kvw_ledger vs GradDiff, time and peak memory."""
    setting = QUICK if quick else GPU if device == "cuda" else Setting()
    workdir = HERE / "_work" / ("graddiff-quick" if quick else "graddiff-gpu" if device == "cuda" else "graddiff")
    paths = prepare(workdir, setting)
    measured = (measure_cuda if device == "cuda" else measure_cpu)(paths, setting)
    with torch.device("meta"):  # the shapes only: no weights loaded into this process
        shapes = AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(paths["model"]))
    n_params = sum(p.numel() for p in shapes.parameters())
    kvw, gd = measured["kvw"], measured["graddiff"]
    where = "peak RSS above imports" if device == "cpu" else "torch.cuda.max_memory_allocated"
    counted = {
        "cpu": "peak RSS of the work above the RSS right before it, in a fresh interpreter: the "
        "interpreter and imports are not counted; model weights, data, activations, the ledger's "
        "base copies (KVW) and gradients plus AdamW state (GradDiff) are. from_pretrained "
        "memory-maps the safetensors file, so a weight counts once it is touched: the load "
        "floor alone is small, and KVW, which stops after its last layer, never pages in the LM head",
        "cuda": "torch.cuda.max_memory_allocated from a freshly loaded model: weights counted",
    }[device]
    described = (
        f"{n_params / 1e6:.0f}M-parameter Llama, {setting.forget_records} forget records in "
        f"{int(gd['steps'])} batches of {setting.batch_size}, {int(kvw['tokens'])} answer tokens; "
        f"median of {setting.repeats}, {setting.threads} torch thread(s) per side; memory = {where}"
    )
    details = {
        "setting": asdict(setting),
        "model_parameters": n_params,
        "memory_counted": counted,
        **measured,
    }
    if device == "cpu":
        floor = measured["load"]["memory"]
        details["memory_above_load_floor"] = {"kvw": kvw["memory"] - floor, "graddiff": gd["memory"] - floor}
    return Result(figures(kvw, gd, measured["retain_stats"]["seconds"], described), details)
