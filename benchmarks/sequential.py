"""Many requests in a row: ten disjoint groups forgotten one after another, then a revert.

On the demo's LLaVA model (the same training data, so the same cached model as
``make demo``) the benchmark draws ten disjoint groups of people and answers one
deletion request per group, in order, with each method; then it reverts one group
(the second). After every step it scores, per modality, with greedy generation
accuracy on held-out paraphrases:

  just     the group just forgotten (after the revert: the reverted group)
  earlier  the groups forgotten before it (mean over groups)
  later    the groups not yet requested (mean over groups)
  retain   people in no group, and none of whose records went into C_r or any
           retain batch (the retain people are split in two, seeded)

Methods:

  kvw-mean     the paper's accessor: Ledger.forget with retain means, gamma 0.6,
               layers 0-3, batch 24 (the demo's setting)
  kvw-q90      the calibrated accessor: retain --statistic q90 at batch 24, gamma 16
  kvw-target   forget --target-forget 0.30 with the q90 stats, the group's own
               training records as the forget probe (attenuation budget 0.95)
  graddiff     GradDiff, full fine-tuning, lr 2e-4, 4 epochs at batch 24 (the frontier's
               best point that forgot, benchmarks/frontier.py)
  graddiff-lora  GradDiff as the KVW authors ran their baselines: LoRA rank 4, alpha 8,
               lr 1e-5, batch 4, one epoch, every linear layer but the LM head (peft);
               each request's adapter is merged before the next

KVW reverts through the ledger with ``revert --retain-with`` (retain stats that again
hold the reverted group's data, and a fast re-derivation of the others); GradDiff has
no revert but re-running every remaining request from the trained model, which is
what it does here, its compute counted. Every step records its compute: seconds,
forward and backward passes. Writes ``benchmarks/sequential.png`` (one panel per
method; ``sequential-quick.png`` with --quick: a tiny model, 2 groups and three of
the methods, to exercise the code only) and the figures in results.json / RESULTS.md.

    python benchmarks/run.py --only sequential [--quick]
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvw_ledger.bench.instill import InstillConfig, build_model
from kvw_ledger.bench.profiles import BenchConfig, BenchPaths, generate
from kvw_ledger.data import Encoder, combine_jsonl, encode_all, read_records
from kvw_ledger.errors import TargetNotReachedError
from kvw_ledger.evaluate import evaluate_records
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model, load_processor, max_length, torch_threads
from kvw_ledger.target import TargetSearch

from baselines import GradDiffConfig, graddiff, kvw_batches, retain_batches
from common import Figure, Result
from frontier import TINY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ITEM = "7. many requests in a row"
MODALITIES = ("image", "text")
METHODS = ("kvw-mean", "kvw-q90", "kvw-target", "graddiff", "graddiff-lora")


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    n_people: int = 200
    n_groups: int = 10
    group_percent: int = 5  # people per group, % of all
    instill: InstillConfig = field(default_factory=InstillConfig)
    workdir: Path = ROOT / "kvw-demo"  # the demo's model cache; data in workdir/data-sequential
    revert_group: int = 2  # 1-based
    batch_size: int = 24
    layers: tuple[int, int] = (0, 3)
    gamma_mean: float = 0.6
    gamma_q90: float = 16.0
    target: float = 0.30
    target_start: float = 8.0  # the search's first gamma (q90 stats)
    target_doublings: int = 8  # TargetSearch.max_doublings
    target_steps: int = 6  # TargetSearch.steps
    lr: float = 2e-4  # full GradDiff
    epochs: int = 4
    eval_group: int | None = None  # held-out records scored per group (None: all)
    eval_retain: int = 160
    methods: tuple[str, ...] = METHODS
    # One thread: with another process on one of two cores, a 2-thread pool stalls at
    # every OpenMP barrier (the quick form's tiny layer norms took 10 ms a call, 475 s in all).
    threads: int = 1
    plot: str = "sequential.png"


# The code only, in seconds: a tiny model, 2 groups, and one method per code path (the
# calibrated statistic, the target search, GradDiff through peft); the full form runs all five.
QUICK = Plan(
    n_people=40, n_groups=2, group_percent=5, instill=TINY,
    workdir=HERE / "_work" / "sequential-quick", batch_size=8, gamma_q90=4.0, target_start=2.0,
    target_doublings=2, target_steps=1, epochs=1, eval_group=8, eval_retain=16,
    methods=("kvw-q90", "kvw-target", "graddiff-lora"), plot="sequential-quick.png",
)  # fmt: skip


@dataclass
class Bench:
    """The data and the trained model every method starts from."""

    paths: BenchPaths
    model_dir: Path
    groups: list[Path]  # training records of each group (the forget data)
    heldout: list[list[dict[str, Any]]]  # held-out records scored per group
    retain_fit: Path  # retain records for C_r and GradDiff's retain batches
    retain_eval: list[dict[str, Any]]  # held-out records of the other retain people
    base_dir: Path  # retain_eval's image paths are relative to this; the groups' to their folder


def prepare(plan: Plan) -> Bench:
    """Data with ``n_groups`` disjoint groups, and the demo's model (built once, cached)."""
    config = BenchConfig(
        n_people=plan.n_people, seed=0, demo_group_percent=plan.group_percent, n_demo_groups=plan.n_groups
    )
    paths = generate(plan.workdir / "data-sequential", config=config)
    # The training data does not depend on the groups (people.json only records their
    # count), so the model is the demo's: built from the demo's split, found cached.
    demo = generate(plan.workdir / "data", config=BenchConfig(n_people=plan.n_people, seed=0))
    model_dir = build_model(plan.workdir / "models", demo, plan.instill)
    assert paths.retain_demo is not None and paths.retain_demo_heldout is not None
    people = sorted({r["person"] for r in _jsonl(paths.retain_demo)})
    fit = set(random.Random(0).sample(people, len(people) // 2))
    retain_fit = paths.retain_demo.parent / "retain_fit.jsonl"
    retain_fit.write_text("".join(
        line + "\n" for line in paths.retain_demo.read_text().splitlines()
        if line.strip() and json.loads(line)["person"] in fit
    ))  # fmt: skip
    retain_eval = [r for r in _jsonl(paths.retain_demo_heldout) if r["person"] not in fit]
    heldout = [_sample(_jsonl(p), plan.eval_group) for p in paths.groups_heldout]
    return Bench(paths, model_dir, list(paths.groups), heldout, retain_fit,
                 _sample(retain_eval, plan.eval_retain), paths.retain_demo_heldout.parent)  # fmt: skip


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sample(records: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    if n is None or len(records) <= n:
        return records
    return [records[i] for i in sorted(random.Random(0).sample(range(len(records)), n))]


def score(model: Any, processor: Any, bench: Bench, step: int, just: int) -> dict[str, Any]:
    """Per modality: the group ``just`` (0-based), the earlier and later groups, retain."""

    def acc(records: list[dict[str, Any]], base_dir: Path) -> dict[str, float]:
        figures = evaluate_records(model, processor, records, base_dir, multiple_choice=False)
        return {m: figures[m]["gen_acc"] for m in MODALITIES if m in figures}

    groups = [acc(h, p.parent) for h, p in zip(bench.heldout, bench.paths.groups_heldout, strict=True)]

    def mean(indices: list[int]) -> dict[str, float] | None:
        if not indices:
            return None
        return {m: sum(groups[i][m] for i in indices) / len(indices) for m in groups[0]}

    return {
        "step": step, "groups": groups, "just": groups[just],
        "earlier": mean([i for i in range(len(groups)) if i < just]),
        "later": mean([i for i in range(len(groups)) if i > just]),
        "retain": acc(bench.retain_eval, bench.base_dir),
    }  # fmt: skip


# --- the methods -------------------------------------------------------------------------


def run_kvw(method: str, plan: Plan, bench: Bench) -> list[dict[str, Any]]:
    """One ledger, ten requests, a revert --retain-with; scored after each step."""
    root = plan.workdir / "sequential" / method
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ledger = Ledger.create(root / "ledger", bench.model_dir, progress=False)
    statistic = "mean" if method == "kvw-mean" else "q90"
    start = time.perf_counter()
    ledger.retain(bench.retain_fit, stats_id="r1", batch_size=plan.batch_size, statistic=statistic, progress=False)
    retain_cost = {"seconds": time.perf_counter() - start}
    model, processor = load_model(bench.model_dir), load_processor(bench.model_dir)
    gamma = plan.gamma_mean if method == "kvw-mean" else plan.target_start if method == "kvw-target" else plan.gamma_q90
    config = KVWConfig(gamma=gamma, layers=plan.layers, batch_size=plan.batch_size)
    steps = [{**score(model, processor, bench, 0, 0), "label": "before", "retain_stats": retain_cost}]
    for i, group in enumerate(bench.groups):
        start = time.perf_counter()
        info: dict[str, Any] = {}
        try:
            if method == "kvw-target":
                entry = ledger.forget(group, request_id=f"g{i + 1}", config=config, forget_probe=group,
                                      target=TargetSearch(plan.target, plan.target_doublings, plan.target_steps), limits=ledger.limits(max_attenuation=0.95),
                                      progress=False)  # fmt: skip
                trials = entry.body["target"]["trials"]
                # Each trial runs the request's batches and generates on the probe once.
                info = {"gamma": entry.body["target"]["chosen_gamma"], "trials": len(trials),
                        "probe_generations": len(trials)}  # fmt: skip
                passes = entry.body["batches"] * len(trials)
            else:
                entry = ledger.forget(group, request_id=f"g{i + 1}", config=config,
                                      limits=ledger.limits(on_fail="warn"), progress=False)  # fmt: skip
                passes = entry.body["batches"]
                info = {"gamma": gamma, "failed_checks": [c["name"] for c in entry.body["stability"]["failed"]]}
        except TargetNotReachedError as e:
            info, passes = {"refused": str(e)[:300]}, 0
        seconds = time.perf_counter() - start
        ledger.materialize(model)
        steps.append({**score(model, processor, bench, i + 1, i), "label": f"forget g{i + 1}",
                      "seconds": seconds, "forward_passes": passes, "backward_passes": 0, **info})  # fmt: skip
        print(f"   {method:<14} {_line(steps[-1])}", flush=True)
    k = plan.revert_group - 1
    withdrawn = combine_jsonl([bench.retain_fit, bench.groups[k]], root / "retain+withdrawn.jsonl")
    start = time.perf_counter()
    entry = ledger.revert(f"g{k + 1}", retain_with=withdrawn, retain_id="r2", limits=ledger.limits(on_fail="warn"), progress=False)
    seconds = time.perf_counter() - start
    ledger.materialize(model)
    steps.append({**score(model, processor, bench, len(bench.groups) + 1, k), "label": f"revert g{k + 1}",
                  "seconds": seconds, "forward_passes": -(-entry.body["retain"]["records"] // plan.batch_size),
                  "backward_passes": 0, "rederived": sorted(entry.body["rederived"]["requests"])})  # fmt: skip
    print(f"   {method:<14} {_line(steps[-1])}", flush=True)
    return steps


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")})  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=linear, bias="none")
    return get_peft_model(model, config)


def gd_request(model: Any, method: str, plan: Plan, forget: list, retain: list, pad: int) -> tuple[Any, dict[str, Any]]:
    """One GradDiff request on ``model`` in place (LoRA: trained, then merged)."""
    lora = method == "graddiff-lora"
    batch = 4 if lora else plan.batch_size
    forget_b = kvw_batches(forget, KVWConfig(batch_size=batch), pad)
    retain_b = retain_batches(retain, len(forget_b), batch, pad)
    config = GradDiffConfig(lr=1e-5 if lora else plan.lr, steps=len(forget_b) * (1 if lora else plan.epochs))
    start = time.perf_counter()
    target = _lora(model) if lora else model
    result = graddiff(target, forget_b, retain_b, config)
    if lora:
        model = target.merge_and_unload()
    model.eval()
    return model, {"seconds": time.perf_counter() - start, "forward_passes": result.forward_passes,
                   "backward_passes": result.backward_passes}  # fmt: skip


def run_graddiff(method: str, plan: Plan, bench: Bench) -> list[dict[str, Any]]:
    """Ten GradDiff requests in a row; the revert re-runs the others from the trained model."""
    model, processor = load_model(bench.model_dir), load_processor(bench.model_dir)
    trained = copy.deepcopy(model.state_dict())
    encoder = Encoder(processor, max_length(model))
    forget = [encode_all(encoder, read_records(g)) for g in bench.groups]
    retain = encode_all(encoder, read_records(bench.retain_fit))
    pad = encoder.pad_token_id
    steps = [{**score(model, processor, bench, 0, 0), "label": "before"}]
    for i in range(len(forget)):
        model, cost = gd_request(model, method, plan, forget[i], retain, pad)
        steps.append({**score(model, processor, bench, i + 1, i), "label": f"forget g{i + 1}", **cost})
        print(f"   {method:<14} {_line(steps[-1])}", flush=True)
    k = plan.revert_group - 1
    model = load_model(bench.model_dir)
    model.load_state_dict(trained)
    total = {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0}
    for i in range(len(forget)):
        if i != k:
            model, cost = gd_request(model, method, plan, forget[i], retain, pad)
            total = {key: total[key] + cost[key] for key in total}
    steps.append({**score(model, processor, bench, len(forget) + 1, k), "label": f"revert g{k + 1}", **total})
    print(f"   {method:<14} {_line(steps[-1])}", flush=True)
    return steps


def _fmt(figures: dict[str, float] | None) -> str:
    return "-" if figures is None else "/".join(f"{figures[m]:.2f}" for m in MODALITIES if m in figures)


def _line(step: dict[str, Any]) -> str:
    return (f"{step['label']:<10} just {_fmt(step['just'])} earlier {_fmt(step['earlier'])} "
            f"later {_fmt(step['later'])} retain {_fmt(step['retain'])} ({step.get('seconds', 0):.1f} s)")  # fmt: skip


# --- targets, figures, plot --------------------------------------------------------------


def targets(steps: list[dict[str, Any]], revert_group: int) -> dict[str, dict[str, Any]]:
    """Issue 15's targets, each with the figure reached (worst modality) and met or not."""
    before = steps[0]
    out: dict[str, dict[str, Any]] = {}

    def worst_ratio(step: dict[str, Any], key: str, reference: dict[str, float]) -> float:
        return min(step[key][m] / max(reference[m], 1e-9) for m in step[key])

    forgets = [s for s in steps if s["label"].startswith("forget")]
    first3 = forgets[:3]
    out["group <= 0.30 after each of the first three"] = _check(max(max(s["just"].values()) for s in first3), "<=", 0.30)
    out["retain >= 0.90 of before after each of the first three"] = _check(
        min(worst_ratio(s, "retain", before["retain"]) for s in first3), ">=", 0.90)
    n = len(before["groups"])
    later = [s["groups"][i][m] / max(before["groups"][i][m], 1e-9)
             for s in forgets for i in range(s["step"], n) for m in s["groups"][i]]  # fmt: skip
    out["groups not yet requested >= 0.95 of before"] = _check(min(later, default=1.0), ">=", 0.95)
    revert = steps[-1]
    k = revert_group - 1
    prior = steps[k]  # the step right before the group's own request
    out["revert within 0.05 of where it was"] = _check(
        max(abs(revert["just"][m] - prior["groups"][k][m]) for m in revert["just"]), "<=", 0.05)
    out["retain >= 0.80 of before after all requests"] = _check(worst_ratio(forgets[-1], "retain", before["retain"]), ">=", 0.80)
    return out


def _check(value: float, op: str, limit: float) -> dict[str, Any]:
    return {"value": round(value, 3), "limit": limit, "met": value <= limit if op == "<=" else value >= limit}


def compute(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Total seconds and passes over the run's steps (evaluation not counted)."""
    keys = ("seconds", "forward_passes", "backward_passes")
    return {k: round(sum(s.get(k, 0) for s in steps[1:]), 1) for k in keys}


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy per step, one panel per method: just, earlier, later, retain; both modalities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), sharey=True, squeeze=False)
    colours = {"just": "tab:red", "earlier": "tab:orange", "later": "tab:green", "retain": "tab:blue"}
    for ax, (method, steps) in zip(axes[0], runs.items(), strict=True):
        for key, colour in colours.items():
            for modality, style in (("image", "-"), ("text", "--")):
                xs = [s["step"] for s in steps if s[key] is not None]
                ys = [s[key][modality] for s in steps if s[key] is not None]
                ax.plot(xs, ys, style, color=colour, marker=".", label=f"{key} {modality}")
        ax.axhline(0.30, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{method} ({compute(steps)['seconds']:.0f} s)", xlabel="step (last: revert)", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gen_acc, held-out paraphrases")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, device: str = "cpu") -> Result:
    """Every method over the same sequence of requests; targets per method, and compute."""
    plan = QUICK if quick else Plan()
    with torch_threads(plan.threads):
        bench = prepare(plan)
        runs = {}
        for method in plan.methods:
            runs[method] = (run_kvw if method.startswith("kvw") else run_graddiff)(method, plan, bench)
    plot(runs, HERE / plan.plot)
    figures = []
    reached = {m: targets(s, plan.revert_group) for m, s in runs.items()}
    for method, checks in reached.items():
        met = sum(c["met"] for c in checks.values())
        detail = "; ".join(f"{name}: {c['value']:g} {'met' if c['met'] else 'MISS'}" for name, c in checks.items())
        figures.append(Figure(ITEM, f"{method}: targets met of {len(checks)}", float(met), None,
                              f"{detail}; compute {compute(runs[method])}"))  # fmt: skip
    details = {
        "plan": {"n_people": plan.n_people, "n_groups": plan.n_groups, "methods": list(plan.methods),
                 "batch_size": plan.batch_size, "layers": list(plan.layers)},
        "runs": runs, "targets": reached, "compute": {m: compute(s) for m, s in runs.items()},
        "plot": str((HERE / plan.plot).relative_to(ROOT)), "device": device,
    }  # fmt: skip
    return Result(figures, details)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Many requests in a row (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 2 groups: the code only")
    result = run(quick=parser.parse_args().quick)
    for figure in result.figures:
        print(f"{figure.name}: {figure.ratio:g} ({figure.detail})")
