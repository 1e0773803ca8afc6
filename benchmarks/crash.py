"""Crash trials: kill writers with SIGKILL and count the ledgers left corrupt (target 0).

A writer (forget, revert, rederive, gc) runs in a child forked from this process and
is killed either at one exact step of the write protocol (every step of every verb:
before and after each array write, group creation, rename, link, journal append,
head swap and delete) or after a seeded random delay. After each kill the ledger
must open, verify with no error (leftover arrays are warnings), have HEAD at the
old or the new version, and accept the next command, after which it verifies clean.
See tests/crashkit.py for the contract. POSIX only.

    python benchmarks/crash.py [--trials 1000] [--seed 0] [--signal KILL|INT] [--json out.json]

With ``--signal INT`` each writer is the CLI, interrupted with SIGINT (Ctrl-C): it must
exit 130 with nothing committed, or 0 with its entry committed, and the next command
(another verb) must leave no file that no entry names.

Prints one line per failure (with its seed and trial, to reproduce) and a summary:
trials, how many committed, stale-lock takeovers, corrupt ledgers, time per trial.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import crashkit  # tests/ holds the harness and the tiny model builders
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="Kills in all (default 1000).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random kill delays.")
    parser.add_argument("--no-steps", action="store_true", help="Only random-moment kills.")
    parser.add_argument("--keep", action="store_true", help="Keep the ledgers of failed trials.")
    parser.add_argument("--json", type=Path, help="Also write the summary as JSON here.")
    parser.add_argument(
        "--signal", choices=("KILL", "INT"), default="KILL",
        help="SIGKILL (a crash, the default) or SIGINT (Ctrl-C, through the CLI).",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="kvw-crash-"))
    started = time.perf_counter()
    scenario = crashkit.prepare(root / "scenario")
    print(
        "verb durations in a child: "
        + ", ".join(f"{v} {s * 1000:.0f} ms" for v, s in scenario.durations.items())
    )
    plan: list[tuple[str, str, int, str]] = []  # (kind, verb, index, step)
    if not args.no_steps:
        for verb in crashkit.VERBS:
            for index, step in enumerate(crashkit.list_steps(scenario, verb)):
                plan.append(("step", verb, index, step))
    plan = plan[: args.trials]
    for n in range(args.trials - len(plan)):
        plan.append(("random", crashkit.VERBS[n % len(crashkit.VERBS)], n, ""))

    work = root / "work"
    outcomes: list[crashkit.Outcome] = []
    trials_started = time.perf_counter()
    for number, (kind, verb, index, step) in enumerate(plan, 1):
        work.mkdir(exist_ok=True)
        if kind == "step":
            trial = crashkit.interrupt_step_trial if args.signal == "INT" else crashkit.step_trial
            outcome = trial(scenario, work, verb, index, step)
        else:
            trial = crashkit.interrupt_random_trial if args.signal == "INT" else crashkit.random_trial
            outcome = trial(scenario, work, verb, args.seed, index)
        outcomes.append(outcome)
        if outcome.errors:
            print(f"CORRUPT: {outcome.label}: {'; '.join(outcome.errors)}", flush=True)
        elif outcome.leftovers:
            print(f"left over: {outcome.label}: {'; '.join(outcome.leftovers)}", flush=True)
        if args.keep and not outcome.ok:
            kept = root / "failed" / f"{number:05d}"
            shutil.copytree(work, kept)
            print(f"  kept in {kept}")
        shutil.rmtree(work)
        if number % 100 == 0:
            print(
                f"{number}/{len(plan)} trials, {sum(bool(o.errors) for o in outcomes)} corrupt",
                flush=True,
            )
    elapsed = time.perf_counter() - trials_started

    summary = crashkit.summarize(outcomes)
    summary.update(
        {
            "seed": args.seed,
            "signal": args.signal,
            "exit_130": sum(o.exit_code == 130 for o in outcomes),
            "exit_0": sum(o.exit_code == 0 for o in outcomes),
            "step_trials": sum(kind == "step" for kind, *_ in plan),
            "random_trials": sum(kind == "random" for kind, *_ in plan),
            "seconds_per_trial": elapsed / max(1, len(plan)),
            "total_seconds": time.perf_counter() - started,
        }
    )
    print(
        f"SIG{args.signal}: {summary['trials']} trials ({summary['step_trials']} at protocol steps, "
        f"{summary['random_trials']} at random moments, seed {args.seed}): "
        f"{summary['committed']} committed, {summary['finished_before_kill']} finished before their kill, "
        f"{summary['stale_lock_takeovers']} stale locks taken over, "
        f"{summary['corrupt']} corrupt ledgers, {summary['leftovers_after_next_command']} with crash "
        f"leftovers after the next command; {summary['seconds_per_trial'] * 1000:.0f} ms per trial"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if not args.keep or all(o.ok for o in outcomes):
        shutil.rmtree(root, ignore_errors=True)
    return 1 if summary["corrupt"] or summary["leftovers_after_next_command"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
