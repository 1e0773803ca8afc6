"""The unlearning frontier on the bundled benchmark: KVW against GradDiff.

On the demo's LLaVA model (``kvw_ledger.bench``, 200 people, trained once and cached in
``kvw-demo/models`` where ``make demo`` finds it too), forget demo group 1
(``groups/g1.jsonl``, both modalities) and measure greedy generation accuracy
(``gen_acc``) per modality on the forget group and on a seeded sample of the retain
people (``retain_demo.jsonl``):

  kvw       ``kvw_ledger.kvw.run_kvw`` (the loop ``Ledger.forget`` runs) over a sweep of
            gamma and layer ranges, batch size 24, C_r from a retain sample measured once
  graddiff  benchmarks/baselines.py over a sweep of learning rates, evaluated after
            several step counts (1, 2, 4, 8 epochs over the same 24-record forget batches,
            each step paired with a retain batch from the same retain sample)

Every point starts from the trained model and records its compute: wall seconds and
forward/backward passes (KVW's passes stop after the last weakened layer; C_r is
reported once, apart, since the ledger measures it once for every request). The
retain sample that C_r and GradDiff's retain batches come from excludes the records
evaluated, so neither method trains on what retain accuracy is measured on.

Writes ``benchmarks/frontier.png`` (``frontier-quick.png`` with --quick: a 20-person
benchmark and a barely trained tiny model, to exercise the code only).

    python benchmarks/run.py --only frontier [--quick]
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvw_ledger import coefficients
from kvw_ledger.bench.instill import InstillConfig, build_model
from kvw_ledger.bench.profiles import BenchConfig, BenchPaths, generate
from kvw_ledger.data import Encoder, Example, encode_all, iter_batches, read_records
from kvw_ledger.evaluate import evaluate_split
from kvw_ledger.kvw import KVWConfig, run_kvw
from kvw_ledger.loading import load_model, load_processor, max_length, torch_threads
from kvw_ledger.sites import discover_sites

from baselines import GradDiffConfig, GradDiffResult, graddiff, kvw_batches, retain_batches
from common import Figure, Result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ITEM = "6. unlearning frontier"
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class Sweep:
    """What one run measures."""

    n_people: int = 200  # the demo's benchmark (same data and model cache as `make demo`)
    instill: InstillConfig = field(default_factory=InstillConfig)  # the demo's model
    workdir: Path = ROOT / "kvw-demo"
    gammas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
    layer_ranges: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 3), (1, 3), (2, 3))
    batch_size: int = 24  # KVW and GradDiff batch size (forget records per batch)
    lrs: tuple[float, ...] = (3e-5, 1e-4, 2e-4, 3e-4, 1e-3)  # GradDiff learning rates
    epochs: tuple[int, ...] = (1, 2, 4, 8)  # GradDiff evaluated after this many epochs
    retain_records: int = 400  # retain sample for C_r and GradDiff's retain batches
    eval_records: int = 160  # retain records evaluated per point (a seeded sample)
    kvw_repeats: int = 3  # KVW runs per point, timed (median); GradDiff runs are long enough
    threshold: float = 0.30  # forget gen_acc at or below which a point has forgotten
    threads: int = 1  # torch threads (the machine is shared; see benchmarks/graddiff.py)
    plot: str = "frontier.png"


TINY = InstillConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vision_hidden_size=16,
    vision_layers=1, vision_heads=2, vision_intermediate_size=32, text_epochs=1, align_steps=5,
    joint_epochs=1, batch_size=64,
)  # fmt: skip; the tests' tiny model (tests/test_demo.py)

QUICK = Sweep(
    n_people=20, instill=TINY, workdir=HERE / "_work" / "frontier-quick", gammas=(0.6, 1.0),
    layer_ranges=((0, 1),), batch_size=4, lrs=(1e-3,), epochs=(1, 2), retain_records=40,
    eval_records=20, kvw_repeats=1, plot="frontier-quick.png",
)  # fmt: skip


# --- the benchmark ------------------------------------------------------------------


@dataclass
class Bench:
    """The trained model and the data every point uses."""

    model: Any
    processor: Any
    paths: BenchPaths
    forget: list[Example]
    retain: list[Example]  # the retain sample (eval records excluded)
    pad: int
    base: dict[str, torch.Tensor]  # the trained weights, to start every point from


def load_bench(sweep: Sweep) -> Bench:
    """Generates the data and builds (or finds cached) the model, as ``make demo`` does."""
    paths = generate(sweep.workdir / "data", config=BenchConfig(n_people=sweep.n_people, seed=0))
    assert paths.retain_demo is not None and paths.groups, "the benchmark has no demo groups"
    model_dir = build_model(sweep.workdir / "models", paths, sweep.instill)
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    encoder = Encoder(processor, max_length(model))
    forget = encode_all(encoder, read_records(paths.groups[0]))
    retain = encode_all(encoder, retain_sample(paths.retain_demo, sweep))
    base = copy.deepcopy(model.state_dict())
    return Bench(model, processor, paths, forget, retain, encoder.pad_token_id, base)


def retain_sample(path: Path, sweep: Sweep) -> list[Any]:
    """A seeded sample of retain records, leaving out those ``evaluate_split`` evaluates."""
    records = read_records(path)
    evaluated = set(_evaluated_indices(len(records), sweep.eval_records))
    pool = [r for i, r in enumerate(records) if i not in evaluated]
    return random.Random(1).sample(pool, min(sweep.retain_records, len(pool)))


def _evaluated_indices(n: int, k: int) -> list[int]:
    # The same seeded subset evaluate_split(max_records=k) draws (kvw_ledger.evaluate).
    return list(range(n)) if n <= k else random.Random(0).sample(range(n), k)


def evaluate(bench: Bench, sweep: Sweep) -> dict[str, dict[str, float]]:
    """gen_acc per modality on the forget group and on the retain evaluation sample."""
    assert bench.paths.retain_demo is not None
    out = {}
    for split, path, limit in (
        ("forget", bench.paths.groups[0], None),
        ("retain", bench.paths.retain_demo, sweep.eval_records),
    ):
        figures = evaluate_split(bench.model, bench.processor, path, max_records=limit, multiple_choice=False)
        out[split] = {m: figures[m]["gen_acc"] for m in MODALITIES if m in figures}
    return out


def reset(bench: Bench) -> None:
    """Every point starts from the trained model."""
    bench.model.load_state_dict(bench.base)
    bench.model.eval()


# --- the two sweeps -----------------------------------------------------------------


def retain_stats(bench: Bench, sweep: Sweep) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """C_r on the trained model, once (the ledger's ``retain``); its cost, apart."""
    sites = discover_sites(bench.model)
    start = time.perf_counter()
    batches = list(iter_batches(bench.retain, sweep.batch_size, bench.pad))
    measured = coefficients.collect(bench.model, sites, batches, progress=False)
    cost = {"seconds": time.perf_counter() - start, "forward_passes": len(batches),
            "records": len(bench.retain)}  # fmt: skip
    return measured.means(), cost


def kvw_points(bench: Bench, sweep: Sweep, means: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One point per (gamma, layers): a request from the trained model, then evaluation.

    A request takes about a second, so its time is the median of ``kvw_repeats`` runs."""
    sites = discover_sites(bench.model)
    points = []
    for layers in sweep.layer_ranges:
        for gamma in sweep.gammas:
            config = KVWConfig(gamma=gamma, layers=layers, batch_size=sweep.batch_size)
            times = []
            for _ in range(sweep.kvw_repeats):  # deterministic: every repeat ends the same
                reset(bench)
                start = time.perf_counter()
                result = run_kvw(bench.model, sites, bench.forget, means, config,
                                 pad_token_id=bench.pad, progress=False)  # fmt: skip
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            points.append({
                "method": "kvw", "gamma": gamma, "layers": list(layers), "seconds": seconds,
                "forward_passes": result.n_batches, "backward_passes": 0, **evaluate(bench, sweep),
            })  # fmt: skip
            _say(points[-1])
    return points


def graddiff_points(bench: Bench, sweep: Sweep) -> list[dict[str, Any]]:
    """Per learning rate one GradDiff run, evaluated after each step count in the sweep.

    With a constant learning rate the model after k steps of a longer run is the model
    of a k-step run, so one run gives every step count; evaluation time is not counted.
    """
    forget = kvw_batches(bench.forget, KVWConfig(batch_size=sweep.batch_size), bench.pad)
    checkpoints = {e * len(forget): e for e in sweep.epochs}
    retain = retain_batches(bench.retain, max(checkpoints), sweep.batch_size, bench.pad)
    points: list[dict[str, Any]] = []
    for lr in sweep.lrs:
        reset(bench)
        clock = {"start": time.perf_counter(), "paused": 0.0}

        def on_step(result: GradDiffResult, lr: float = lr, clock: dict[str, float] = clock) -> None:
            if result.steps not in checkpoints:
                return
            paused = time.perf_counter()
            seconds = paused - clock["start"] - clock["paused"]
            points.append({
                "method": "graddiff", "lr": lr, "steps": result.steps,
                "epochs": checkpoints[result.steps], "seconds": seconds,
                "forward_passes": result.forward_passes, "backward_passes": result.backward_passes,
                **evaluate(bench, sweep),
            })  # fmt: skip
            _say(points[-1])
            clock["paused"] += time.perf_counter() - paused

        config = GradDiffConfig(lr=lr, steps=max(checkpoints))
        graddiff(bench.model, forget, retain, config, on_step=on_step)
    return points


def _say(point: dict[str, Any]) -> None:
    # A full sweep takes minutes: one line per point shows it is moving.
    print(f"   {point['method']:<8} {_describe(point)} ({point['seconds']:.1f} s)", flush=True)


# --- figures and the plot -----------------------------------------------------------


def _mean(split: dict[str, float]) -> float:
    return sum(split.values()) / len(split)


def _forgot(point: dict[str, Any], threshold: float) -> bool:
    return all(v <= threshold for v in point["forget"].values())


def _best(points: list[dict[str, Any]], method: str, threshold: float) -> dict[str, Any] | None:
    """The point of ``method`` with the best mean retain accuracy among those that forgot."""
    eligible = [p for p in points if p["method"] == method and _forgot(p, threshold)]
    return max(eligible, key=lambda p: _mean(p["retain"]), default=None)


def _describe(point: dict[str, Any]) -> str:
    knobs = (
        f"gamma {point['gamma']:g}, layers {tuple(point['layers'])}"
        if point["method"] == "kvw"
        else f"lr {point['lr']:g}, {point['steps']} steps"
    )
    accs = ", ".join(
        f"{split} {'/'.join(f'{point[split][m]:.2f}' for m in point[split])}"
        for split in ("forget", "retain")
    )
    return f"{knobs}: {accs}"


def headline(points: list[dict[str, Any]], threshold: float = 0.30) -> Figure:
    """KVW's best retain accuracy among points that forgot (forget gen_acc <= threshold in
    every modality) over GradDiff's; mean of the modalities. A method with no such point
    counts as retaining nothing there: 0 if KVW never forgot, infinite if only GradDiff
    never did (the detail says which).
    """
    kvw, gd = _best(points, "kvw", threshold), _best(points, "graddiff", threshold)
    parts = [f"KVW {_describe(kvw)}" if kvw else f"KVW reached no point with forget <= {threshold:g}",
             f"GradDiff {_describe(gd)}" if gd else f"GradDiff reached no point with forget <= {threshold:g}"]  # fmt: skip
    if kvw is None:
        ratio = 0.0
    elif gd is None or _mean(gd["retain"]) == 0:
        ratio = float("inf")
    else:
        ratio = _mean(kvw["retain"]) / _mean(gd["retain"])
    detail = " vs ".join(parts) + " (gen_acc image/text)"
    return Figure(ITEM, f"KVW retain at forget <= {threshold:.2f} vs GradDiff's", ratio, None, detail)


def compute_figure(points: list[dict[str, Any]], threshold: float, kvw_repeats: int = 1) -> Figure | None:
    """GradDiff's seconds over KVW's at the two points the headline compares."""
    kvw, gd = _best(points, "kvw", threshold), _best(points, "graddiff", threshold)
    if kvw is None or gd is None:
        return None
    return Figure(
        ITEM, "compute at those points (GradDiff / KVW seconds)", gd["seconds"] / kvw["seconds"], None,
        f"{gd['seconds']:.1f} s, {gd['forward_passes']} fwd + {gd['backward_passes']} bwd vs "
        f"{kvw['seconds']:.2f} s, {kvw['forward_passes']} partial fwd (C_r apart); one GradDiff run, KVW median of {kvw_repeats}, "
        f"{torch.get_num_threads()} torch thread(s)",
    )  # fmt: skip


def plot(points: list[dict[str, Any]], before: dict[str, Any], threshold: float, path: Path) -> None:
    """Forget vs retain gen_acc, one panel per modality; labels give each point's knobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, modality in zip(axes, MODALITIES, strict=True):
        for method, style in (("kvw", {"marker": "o", "color": "tab:blue"}),
                              ("graddiff", {"marker": "x", "color": "tab:red"})):  # fmt: skip
            mine = [p for p in points if p["method"] == method and modality in p["forget"]]
            xs = [p["forget"][modality] for p in mine]
            ys = [p["retain"][modality] for p in mine]
            ax.scatter(xs, ys, label="KVW" if method == "kvw" else "GradDiff", **style)
            for p, x, y in zip(mine, xs, ys, strict=True):
                label = (f"{p['gamma']:g} L{p['layers'][0]}-{p['layers'][1]}" if method == "kvw"
                         else f"{p['lr']:g}x{p['steps']}")  # fmt: skip
                ax.annotate(label, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if modality in before["forget"]:
            ax.scatter([before["forget"][modality]], [before["retain"][modality]], marker="*", s=150,
                       color="black", label="before")  # fmt: skip
        ax.axvline(threshold, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{modality} records", xlabel="forget group gen_acc (lower: forgot more)",
               xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("retain gen_acc (higher: kept more)")
    axes[0].legend(loc="lower right")
    fig.suptitle("Unlearning frontier: KVW (gamma, layers) vs GradDiff (lr x steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Item 6: the KVW and GradDiff sweeps, the plot, and the headline figures."""
    sweep = QUICK if quick else Sweep()
    with torch_threads(sweep.threads):
        started = time.perf_counter()
        bench = load_bench(sweep)
        if device != "cpu":
            bench.model.to(device)
            bench.base = copy.deepcopy(bench.model.state_dict())
        ready = time.perf_counter()
        before = evaluate(bench, sweep)
        means, c_r = retain_stats(bench, sweep)
        points = kvw_points(bench, sweep, means) + graddiff_points(bench, sweep)
        figures = [headline(points, sweep.threshold)]
        extra = compute_figure(points, sweep.threshold, sweep.kvw_repeats)  # names the threads
        if extra is not None:
            figures.append(extra)
    plot(points, before, sweep.threshold, HERE / sweep.plot)
    details = {
        "benchmark": f"{sweep.n_people} people, forget {bench.paths.groups[0].name} "
        f"({len(bench.forget)} records), retain sample {len(bench.retain)} records, "
        f"{sweep.eval_records} retain records evaluated",
        "instill": "default (docs/demo-model.md)" if not quick else "tiny (quick run)",
        "threshold": sweep.threshold,
        "before": before,
        "retain_stats": c_r,
        "points": points,
        "plot": str((HERE / sweep.plot).relative_to(ROOT)),
        "setup_seconds": round(ready - started, 1),
        "threads": sweep.threads,
    }
    return Result(figures, details)
