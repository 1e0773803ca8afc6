"""``forget --target-forget``: trials of gamma on the loaded model, each from HEAD
(the search itself is :mod:`kvw_ledger.target`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvw_ledger import data, staging, weights
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.replay import LedgerState
from kvw_ledger.stability import StabilityLimits
from kvw_ledger.target import TargetSearch, Trial, search
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def search_gamma(
    ledger: Ledger,
    state: LedgerState,
    model: Any,
    processor: Any,
    config: KVWConfig,
    spec: TargetSearch,
    forget_probe: str | Path,
    limits: StabilityLimits,
    weaken: Callable[[KVWConfig], Any],
    staged_sums: Callable[[Any], Weakening],
    start: Weakening,
    progress: bool,
) -> tuple[KVWConfig, Any, dict[str, Any]]:
    """``forget --target-forget``: trials on the loaded model, each from HEAD; returns the
    chosen config, its result (the model left holding it) and the search's record."""
    from kvw_ledger.evaluate import evaluate_split  # generation: only this search needs it

    results: dict[float, Any] = {}
    warn = dataclasses.replace(limits, on_fail="warn")

    def trial(gamma: float) -> Trial:
        weights.materialize(ledger, model, start)  # each trial starts at HEAD
        candidate = dataclasses.replace(config, gamma=gamma)
        result = weaken(candidate)
        figures = evaluate_split(model, processor, forget_probe, multiple_choice=False)
        accuracy = max(f["gen_acc"] for f in figures.values())  # the worst modality
        report = staging.check_staged(ledger, state, staged_sums(result), warn, model=model,
                                    processor=processor, progress=progress)
        failed = [c.describe() for c in report.failures()]
        results.clear()  # only the newest is kept: a trace per trial could be large
        results[gamma] = result
        return Trial(gamma, accuracy, report.passed, failed)

    chosen, trials = search(trial, config.gamma, spec)
    if chosen.gamma not in results:  # a later trial replaced it: weaken once more
        weights.materialize(ledger, model, start)
        results[chosen.gamma] = weaken(dataclasses.replace(config, gamma=chosen.gamma))
    record = {
        "forget_acc": spec.target,
        "metric": "greedy generation accuracy on the forget probe, worst modality",
        "probe_fingerprint": data.fingerprint(data.read_records(forget_probe)),
        "chosen_gamma": chosen.gamma,
        "trials": [t.to_json() for t in trials],
    }
    return dataclasses.replace(config, gamma=chosen.gamma), results[chosen.gamma], record
