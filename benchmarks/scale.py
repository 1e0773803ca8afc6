"""How the ledger scales with the number of requests (issue 7, item 5).

A Llama-shaped model with the layout of a 7B model's FFNs (32 sites of 11,008 value
vectors; a hidden size of 64 keeps it small) gets 1, 100 and 1,000 requests (quick:
a 4-site layout and 1, 10, 50). At each N the ledger directory is copied aside, so
at the end the three ledgers exist side by side and every timing below is
interleaved across them:

  log       ``kvw-ledger log LEDGER``            (in-process click runner)
  diff      ``kvw-ledger diff LEDGER HEAD~1 HEAD``
  verify    ``kvw-ledger verify LEDGER``         (model check included)
  materialise  ``Ledger.materialize(model)`` at HEAD into a loaded model
  bytes     the ledger directory's file sizes, per request and vs one full
            checkpoint per request

How the requests are made: the first is a real ``Ledger.forget`` (1 forget record,
retain statistics from 8 others). Running KVW a thousand times would take an hour
(each forget loads the model and hashes its files), so the others go through the
ledger's commit path below the KVW loop, which the ledger only has as private
method ``_session`` (its ``WriteSession``'s ``claim``, ``append``, ``write_head``): each takes the
writer lock, writes the request's exponent and trace arrays with ``Store.write_array``
and appends the journal entry, exactly as ``forget`` does after its loop. Their
arrays are the first request's, with the value vectors permuted by a per-request
seed: the same sizes, values and sparsity (so the same compressed bytes), distinct
content. While building, fsync is skipped and the head cache is only written at
each measured N (kept in memory in between, summed in chain order as ``forget``
does); neither changes a byte of the ledger, and the last commit before each
measurement runs with both, timed, as the detail "commit at N".

    python benchmarks/scale.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from click.testing import CliRunner
from torch import nn
from transformers import AutoModelForCausalLM

from kvw_ledger.bench.tokenizer import train_tokenizer
from kvw_ledger.cli import main as cli_main
from kvw_ledger.journal import Entry
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model
from kvw_ledger.store import Store
from kvw_ledger.weakening import Weakening

from common import Figure, Result, median_seconds

ITEM = "5. scale with requests"
NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]


# --- models and data --------------------------------------------------------------


def llama_config(quick: bool) -> tf.LlamaConfig:
    """A 7B model's FFN layout (32 x 11,008 value vectors) on a tiny hidden size; quick: 4 x 2,048."""
    return tf.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=2048 if quick else 11008,
        num_hidden_layers=4 if quick else 32, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=128,
    )


def qa_records(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Small question/answer records (the ledger's data format)."""
    return [
        {"question": f"Where does {NAMES[i % 12]}{i} live?", "answer": f"City {i * 7 % 13}"}
        for i in range(offset, offset + n)
    ]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_model(
    path: Path, config: tf.PretrainedConfig, *, dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Saves a random causal LM (seeded) and a tokenizer trained on the records: a model directory."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    corpus = [f"{r['question']} {r['answer']}" for r in qa_records(16)]
    train_tokenizer(corpus, vocab_size=min(300, config.vocab_size)).save_pretrained(path)
    return path


def first_request(ledger_path: Path, model_dir: Path, work: Path) -> Ledger:
    """``Ledger.create``, real ``retain`` (8 records) and a real ``forget`` (1 record): version 3."""
    ledger = Ledger.create(ledger_path, model_dir, progress=False)
    ledger.retain(write_jsonl(work / "retain.jsonl", qa_records(8)), progress=False)
    ledger.forget(
        write_jsonl(work / "forget.jsonl", qa_records(1, offset=8)), request_id="r0",
        config=KVWConfig(), limits=ledger.limits(on_fail="warn"), progress=False,
    )
    return ledger


# --- the cheap commit path --------------------------------------------------------


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Makes os.fsync a no-op while building (setup only: durability is not what is measured)."""
    saved = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = saved


class RequestWriter:
    """Commits requests through the ledger's commit path, without the KVW loop.

    Each request reuses the arrays and body of a real one (``template``), with the
    value vectors permuted by its seed. The active list, the newest entry and the
    head sum are kept here instead of being replayed from the journal per commit
    (``forget`` replays it; that cost is what ``commit at N`` in the details shows).
    """

    def __init__(self, ledger: Ledger, template: str) -> None:
        self.ledger = ledger
        state = ledger.state()
        self.body = dict(state.requests[template].body)
        self.exponents = ledger.request_exponents(template, state)
        self.traces = {
            name.rsplit("/", 1)[1]: ledger.store.read_array(name)
            for name in ledger.store.list_arrays(state.traces[template])
        }
        self.active = list(state.active)
        self.head = ledger.head()
        self.total = ledger.exponents()  # the head sum, in chain order

    def commit(self, request_id: str, seed: int, *, write_head: bool) -> Entry:
        """One forget entry: lock, arrays, journal append, and the head cache if asked."""
        ledger = self.ledger
        generator = torch.Generator().manual_seed(seed)
        with ledger._session("forget") as tx:  # private: the write protocol forget runs under
            tx.claim(Store.request_path(request_id))
            files: dict[str, str] = {}
            arrays: dict[str, str] = {}
            for site, exponent in self.exponents.items():
                order = torch.randperm(exponent.numel(), generator=generator)
                # index_select: plain ``exponent[order]`` takes ~6 ms here (torch 2.13, CPU)
                new = exponent.index_select(0, order)
                trace = self.traces[site].index_select(1, order)
                for kind, value in (("exponent", new), ("trace", trace)):
                    record = ledger.store.write_array(f"{Store.request_path(request_id, kind)}/{site}", value)
                    files.update(record.files)
                    arrays[record.name] = record.sha256
                self.total[site] = self.total[site] + new  # chain order, as forget's staged sum
            files.update(ledger.store.group_files(Store.request_path(request_id)))
            self.active.append(request_id)
            body = {**self.body, "request": request_id, "arrays": arrays, "active": list(self.active)}
            self.head = tx.append("forget", body, files, parent=self.head)
            if write_head:
                tx.write_head(self.head, Weakening(self.total))
        return self.head


def grow(writer: RequestWriter, upto: int) -> float:
    """Commits requests until ``upto`` are active; returns the seconds of the last, full commit."""
    with no_fsync():
        while len(writer.active) < upto - 1:
            n = len(writer.active)
            writer.commit(f"r{n}", n, write_head=False)
    n = len(writer.active)
    start = time.perf_counter()
    writer.commit(f"r{n}", n, write_head=True)  # with fsync and the head cache, as forget
    return time.perf_counter() - start


# --- measurements -----------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_over(fn: Any, *args: Any) -> dict[str, int]:
    """Calls ``fn(*args)``; returns the RSS just before it and the peak RSS during it (bytes),
    and how much anonymous and file-backed memory stayed resident after it.

    The kernel's high-water mark is reset to the current RSS first (Linux
    ``/proc/self/clear_refs`` "5"), so the peak is the call's alone, not an import's.
    For ``common.in_fresh_process``, which needs a target importable by name: it lives
    here because ``io.py`` cannot be imported as ``io``.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = {field: _status_bytes(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    fn(*args)
    after = {field: _status_bytes(field) for field in ("RssAnon", "RssFile")}
    return {
        "before": before["VmRSS"],
        "peak": _status_bytes("VmHWM"),
        # What stays resident after the call, by kind: file-backed pages (library
        # code run for the first time, mapped files) vs anonymous memory.
        "anon_after": after["RssAnon"] - before["RssAnon"],
        "file_after": after["RssFile"] - before["RssFile"],
    }


def rss_over_second(fn: Any, first: tuple[Any, ...], *args: Any) -> dict[str, int]:
    """:func:`rss_over` of ``fn(*args)`` after one untimed ``fn(*first)`` in the same
    process: the steady state, without what a first call loads once (library code,
    kernels, lazy imports)."""
    fn(*first)
    return rss_over(fn, *args)




def cli(*args: str) -> None:
    """Runs one kvw-ledger command in-process; raises if it fails."""
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"kvw-ledger {' '.join(args)} exited {result.exit_code}: {result.output[-500:]}")


def tree_bytes(root: Path) -> int:
    """Sum of the sizes of every file under ``root`` (apparent sizes)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's safetensors files: what one full checkpoint per request would store."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def timed(runs: Mapping[str, Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Interleaved medians (after ``warmup`` untimed rounds: page cache and imports warm)."""
    return median_seconds(dict(runs), repeats=repeats, warmup=warmup)


def build_ledgers(work: Path, counts: tuple[int, ...], model_dir: Path) -> tuple[dict[int, Path], dict[int, float]]:
    """One growing ledger, copied aside at each N; returns the copies and each N's full-commit seconds."""
    live = work / "ledger"
    ledger = first_request(live, model_dir, work)
    writer = RequestWriter(ledger, "r0")
    copies: dict[int, Path] = {}
    commit_seconds: dict[int, float] = {}
    for n in counts:
        if n > len(writer.active):
            commit_seconds[n] = grow(writer, n)
        copies[n] = work / f"ledger-{n}"
        shutil.copytree(live, copies[n], symlinks=True)
    return copies, commit_seconds


def measure(copies: dict[int, Path], model: nn.Module) -> dict[str, dict[int, float]]:
    """Medians of log, diff, verify and materialise on every ledger, interleaved across N.

    diff and verify at the largest N take tens of seconds each: there they run once,
    without a warm-up (the ledger was just written, so the page cache is hot), apart
    from the smaller ledgers' interleaved rounds.
    """
    largest = max(copies)
    opened = {n: Ledger.open(p) for n, p in copies.items()}
    verbs: dict[str, Any] = {
        "log": lambda n: functools.partial(cli, "log", str(copies[n])),
        "diff": lambda n: functools.partial(cli, "diff", str(copies[n]), "HEAD~1", "HEAD"),
        "verify": lambda n: functools.partial(cli, "verify", str(copies[n])),
        "materialize": lambda n: functools.partial(opened[n].materialize, model),
    }
    out: dict[str, dict[int, float]] = {}
    for verb, make in verbs.items():
        if verb in ("diff", "verify"):
            seconds = timed({str(n): make(n) for n in copies if n != largest}, repeats=3)
            seconds.update(timed({str(largest): make(largest)}, repeats=1, warmup=0))
        else:
            seconds = timed({str(n): make(n) for n in copies}, repeats=5 if verb == "materialize" else 3)
        out[verb] = {int(k): v for k, v in seconds.items()}
    return out


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Item 5: log, diff, verify, materialise and bytes at 1, 100, 1000 requests (quick: 1, 10, 50)."""
    del device  # the ledger's verbs run on the CPU
    counts = (1, 10, 50) if quick else (1, 100, 1000)
    config = llama_config(quick)
    with tempfile.TemporaryDirectory(prefix="kvw-scale-") as tmp:
        work = Path(tmp)
        model_dir = save_model(work / "model", config)
        build_start = time.perf_counter()
        copies, commit_seconds = build_ledgers(work, counts, model_dir)
        build = time.perf_counter() - build_start
        model = load_model(model_dir)
        seconds = measure(copies, model)
        sizes = {n: tree_bytes(p) for n, p in copies.items()}
        checkpoint = weight_bytes(model_dir)
    return result(counts, config, seconds, sizes, checkpoint, commit_seconds, build)


def result(
    counts: tuple[int, ...], config: tf.LlamaConfig, seconds: dict[str, dict[int, float]],
    sizes: dict[int, int], checkpoint: int, commit_seconds: dict[int, float], build: float,
) -> Result:
    """The figures and raw numbers of :func:`run`."""
    lo, hi = counts[0], counts[-1]
    layout = f"{config.num_hidden_layers} sites x {config.intermediate_size} vectors (hidden {config.hidden_size})"

    def series(verb: str, unit: float = 1e3) -> str:
        return ", ".join(f"N={n}: {seconds[verb][n] * unit:.0f} ms" for n in counts)

    per_request = (sizes[hi] - sizes[lo]) / (hi - lo)
    figures = [
        Figure(ITEM, f"materialise flat in N (time at N={lo} / N={hi})",
               seconds["materialize"][lo] / seconds["materialize"][hi], 1 / 1.1,
               f"{series('materialize')}; warm (page cache, model loaded), at HEAD; {layout}"),
    ]
    for verb, what in (("log", "log"), ("diff", "diff HEAD~1 HEAD"), ("verify", "verify")):
        figures.append(Figure(ITEM, f"{what}: time at N={lo} / N={hi}",
                              seconds[verb][lo] / seconds[verb][hi], None, series(verb)))
    # Issue 14: at the largest N, diff HEAD~1 HEAD reads only the newest request and
    # verify reads each array once; held to a time (the figure is budget / time).
    for verb, what, budget in (("diff", "diff HEAD~1 HEAD", 1.0), ("verify", "verify", 10.0)):
        figures.append(Figure(ITEM, f"{what} at N={hi}: {budget:.0f} s / its time",
                              budget / seconds[verb][hi], 1.0, f"{seconds[verb][hi]:.2f} s at N={hi}"))
    figures.append(Figure(
        ITEM, f"one full checkpoint per request vs the ledger, bytes at N={hi}",
        hi * checkpoint / sizes[hi], None,
        f"ledger {sizes[hi] / 2**20:.1f} MiB for {hi} requests ({per_request / 2**10:.0f} KiB per request "
        f"incl. its C_f trace; base and init {sizes[lo] / 2**20:.1f} MiB at N={lo}) vs "
        f"{hi} x {checkpoint / 2**20:.0f} MiB checkpoints",
    ))
    details = {
        "layout": layout,
        "requests": list(counts),
        "seconds": {verb: {str(n): s for n, s in by_n.items()} for verb, by_n in seconds.items()},
        "commit_seconds_at_n": {str(n): s for n, s in commit_seconds.items()},
        "ledger_bytes": {str(n): b for n, b in sizes.items()},
        "bytes_per_request": per_request,
        "checkpoint_bytes": checkpoint,
        "build_seconds": build,
    }
    return Result(figures, details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 sites and 1, 10, 50 requests")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    out = run(args.quick)
    for f in out.figures:
        print(f"{f.name}: {f.ratio:.2f}x (target {f.target}) - {f.detail}")
    print(json.dumps(out.details, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"figures": [f.to_json() for f in out.figures], **out.details}, fh, indent=2)


if __name__ == "__main__":
    main()
