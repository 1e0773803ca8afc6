"""A ledger's history: per version, what is active, how much each layer is weakened,
the probe figures, and warnings where a stability limit is being approached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvw_ledger.bodies import parse
from kvw_ledger.errors import KVWLedgerError
from kvw_ledger.ledger import Ledger
from kvw_ledger.replay import states
from kvw_ledger.stability import StabilityLimits, attenuation
from kvw_ledger.weakening import Weakening

WARN_AT = 0.8  # warn once a figure reaches this share of its limit


@dataclass
class VersionRecord:
    """One row of the history."""

    version: int
    op: str
    id: str | None
    active: list[str]
    attenuation: dict[int, float] | None  # layer -> largest share of norm removed among its sites
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # an audit entry's results (see kvw_ledger.audit)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (layers as string keys)."""
        return {
            "version": self.version,
            "op": self.op,
            "id": self.id,
            "active": self.active,
            "attenuation": None
            if self.attenuation is None
            else {str(k): v for k, v in self.attenuation.items()},
            "probes": self.probes,
            "warnings": self.warnings,
            "audit": self.audit,
        }


def build_history(ledger: Ledger) -> list[VersionRecord]:
    """Replays the ledger once (O(N) for N versions), summing each version's active
    requests in chain order."""
    bases = {s.name: ledger.base(s.name).to(torch.float32) for s in ledger.sites}
    cache: dict[tuple[str, str, str], Weakening] = {}  # a request's arrays, by where they are
    rows: list[VersionRecord] = []
    summed: tuple[list[tuple[str, str, str]], Weakening] | None = None  # the last chain and its sum
    for entry, state in states(ledger.entries()):
        limits = StabilityLimits(**{k: v for k, v in state.limits.items() if k != "on_fail"})
        row = VersionRecord(
            entry.version,
            entry.op,
            parse(entry).id,
            list(state.active),
            None,
        )
        stability = entry.body.get("stability", {})
        row.probes = dict(stability.get("probes") or entry.body.get("figures") or {})
        for kind, figures in row.probes.items():
            base = state.probes.get(kind, {}).get("base")
            if base and kind != "forget":
                drop = base["acc"] - figures["acc"]
                if drop >= WARN_AT * limits.max_retain_drop and drop > 0:
                    row.warnings.append(
                        f"{kind} probe accuracy down {drop:.3f} from the base (limit {limits.max_retain_drop})"
                    )
        if entry.op == "audit":
            row.audit = entry.body["results"]
            row.warnings += audit_warnings(entry.body)
        for failed in stability.get("failed", []):
            row.warnings.append(
                f"committed despite failed check {failed['name']} ({failed['value']:.4g})"
            )
        keys = [(r, state.exponents[r], state.log_scales.get(r, "")) for r in state.active]
        try:
            # Chain order, from zero: a version whose chain extends the one before
            # continues that sum (the same additions in the same order); any other
            # (a revert, a re-derivation) is summed again from zero.
            if summed is not None and keys[: len(summed[0])] == summed[0]:
                start, fresh = summed[1], keys[len(summed[0]) :]
            else:
                start, fresh = Weakening.zero(ledger.sites), keys
            for key in fresh:
                if key not in cache:
                    cache[key] = ledger.request_weakening(key[0], state)
                start = start + cache[key]
            total = start
            summed = (keys, total)
        except KVWLedgerError:
            summed = None
            row.warnings.append("exponents deleted by gc; attenuation unavailable")
            rows.append(row)
            continue
        per_layer: dict[int, float] = {}
        for spot in ledger.sites:
            share = attenuation(bases[spot.name], total, spot.name, spot.axis)
            per_layer[spot.layer] = max(per_layer.get(spot.layer, 0.0), share)
        row.attenuation = dict(sorted(per_layer.items()))
        for layer, share in row.attenuation.items():
            if share >= WARN_AT * limits.max_attenuation:
                row.warnings.append(
                    f"layer {layer} attenuation {share:.3f} is at {share / limits.max_attenuation:.0%} "
                    f"of its budget {limits.max_attenuation}"
                )
        rows.append(row)
    return rows


def audit_warnings(body: dict[str, Any]) -> list[str]:
    """Where an audit saw forgotten knowledge come back: quantization giving back at least
    half of what the request removed, or relearning recovering at least 80% of what the
    unweakened model reaches after the same fine-tuning."""
    warnings = []
    for scheme, row in body["results"].get("quantized", {}).items():
        for metric, r in row["resurfacing"].items():
            if r["share"] is not None and r["share"] >= 0.5:
                warnings.append(
                    f"{body['request']}: {scheme} quantization gives back {r['share']:.0%} of the "
                    f"{metric} the request removed"
                )
    efficacy = body["results"]["efficacy"]
    recovery = (body["results"].get("relearned") or {}).get("recovery", {})
    for metric, r in recovery.items():
        removed = (efficacy["before"]["forget"].get(metric) or 0) - (efficacy["after"]["forget"].get(metric) or 0)
        if removed > 0 and r["ratio"] is not None and r["ratio"] >= 0.8:
            warnings.append(
                f"{body['request']}: relearning brings {metric} back to {r['ratio']:.0%} of the "
                "unweakened model's: the knowledge looks hidden, not removed"
            )
    return warnings


def plot_history(rows: list[VersionRecord], path: str | Path) -> Path:
    """Per-layer attenuation and probe accuracy across versions, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = sorted({layer for r in rows if r.attenuation for layer in r.attenuation})
    for layer in layers:
        points = [(r.version, r.attenuation[layer]) for r in rows if r.attenuation is not None]
        left.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"layer {layer}"
        )
    left.set(
        title="attenuation per layer (share of norm removed)", xlabel="version", ylabel="share"
    )
    if layers:
        left.legend(fontsize=7, ncol=2)
    kinds = sorted({k for r in rows for k in r.probes})
    for kind in kinds:
        points = [(r.version, r.probes[kind]["acc"]) for r in rows if kind in r.probes]
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
    right.set(title="probe accuracy", xlabel="version", ylim=(-0.05, 1.05))
    if kinds:
        right.legend(fontsize=8)
    for axes in (left, right):  # versions are whole numbers: no 6.2, 6.4 between them
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
