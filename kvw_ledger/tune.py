"""Choosing gamma and the layer range: the paper's validation sweep, on a staged copy.

For each gamma and layer bucket the model is materialised at HEAD, weakened with
KVW on the forget validation set, and measured on both validation sets. Nothing is
committed. The recommendation is the setting with the largest forget-accuracy drop
whose retain-accuracy drop stays within the stability limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvw_ledger import data
from kvw_ledger.devices import Placement
from kvw_ledger.errors import BadInputError
from kvw_ledger.kvw import KVWConfig, run_kvw
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import max_length
from kvw_ledger.sites import parse_layers
from kvw_ledger.stability import probe_metrics


@dataclass(frozen=True)
class TuneRow:
    """One point of the sweep."""

    gamma: float
    layers: tuple[int, int]
    forget_acc: float
    retain_acc: float
    forget_drop: float  # accuracy lost on the forget validation set vs HEAD
    retain_drop: float  # accuracy lost on the retain validation set vs HEAD
    within_limit: bool


def recommend(rows: Sequence[TuneRow]) -> TuneRow | None:
    """The largest forget drop among rows within the retain limit; ties go to the smaller gamma.

    A row that forgets nothing (a forget drop of 0 or less) is never recommended.
    """
    eligible = [r for r in rows if r.within_limit and r.forget_drop > 0]
    return max(eligible, key=lambda r: (r.forget_drop, -r.gamma), default=None)


def _why_none(rows: Sequence[TuneRow]) -> str:
    """Says why :func:`recommend` found nothing to recommend."""
    if not any(r.forget_drop > 0 for r in rows):
        return (
            "no setting forgets: every forget drop is 0 or less. Try larger --gammas, other "
            "--layer-buckets or more --epochs"
        )
    return "no setting that forgets keeps the retain drop within the limit"


def parse_list(text: str, what: str) -> list[str]:
    """Splits a comma-separated option value."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInputError(f"{what} needs at least one value")
    return items


def parse_gammas(text: str) -> list[float]:
    """``0.01,0.02,0.05`` -> floats (each validated by KVWConfig)."""
    try:
        return [float(t) for t in parse_list(text, "--gammas")]
    except ValueError as e:
        raise BadInputError(f"--gammas must be numbers separated by commas, not {text!r}") from e


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """``1:8,9:16`` -> inclusive layer ranges."""
    return [parse_layers(t) for t in parse_list(text, "--layer-buckets")]


def tune(
    ledger: Ledger,
    forget_val: str | Path,
    retain_val: str | Path,
    gammas: Sequence[float],
    buckets: Sequence[tuple[int, int]],
    *,
    batch_size: int = 1,
    epochs: int = 1,
    retain_stats: str | None = None,
    max_retain_drop: float | None = None,
    rescale: bool = False,
    model_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """Runs the sweep and returns {"baseline", "rows", "recommended", "why_none", "limit", "rescale"}.

    ``recommended`` is None (and ``why_none`` says why) when no setting forgets
    anything within the limit.

    With ``rescale`` every point restores each weakened site's Frobenius norm, as
    ``forget --rescale`` would. ``device`` and ``dtype`` place the model as
    :meth:`Ledger.load` does.
    """
    placement = Placement.resolve(device, dtype)  # a bad option fails before anything is read
    state = ledger.state()
    stats_id = retain_stats or state.latest_retain
    if stats_id is None:
        raise BadInputError("no retain statistics are registered; run `kvw-ledger retain` first")
    if stats_id not in state.retain_stats:
        raise BadInputError(f"retain stats {stats_id!r} do not exist in this ledger")
    limit = (
        max_retain_drop
        if max_retain_drop is not None
        else state.limits.get("max_retain_drop", 0.05)
    )
    retain_means = ledger.retain_means(stats_id)
    model, processor = ledger.load(
        model_dir, "HEAD", progress=progress, device=placement.device, dtype=placement.dtype
    )
    # Positions counted as the retain stats counted them (older stats labelled the eos).
    label_eos = bool(state.retain_info[stats_id].get("label_eos", True))
    encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
    forget_ex = data.encode_all(encoder, data.read_records(forget_val))
    retain_ex = data.encode_all(encoder, data.read_records(retain_val))
    head = ledger.exponents()
    head_scales = ledger.log_scales()
    bases = {s.name: ledger.base(s.name) for s in ledger.sites}
    baseline = {
        "forget": probe_metrics(model, forget_ex, encoder.pad_token_id),
        "retain": probe_metrics(model, retain_ex, encoder.pad_token_id),
    }
    rows: list[TuneRow] = []
    grid = [(g, b) for g in gammas for b in buckets]
    for gamma, bucket in tqdm(grid, desc="tune", disable=not progress):
        config = KVWConfig(
            gamma=gamma,
            layers=bucket,
            batch_size=batch_size,
            epochs=epochs,
            keep_trace=False,
            rescale=rescale,
        )
        ledger.materialize(model, "HEAD")
        run_kvw(
            model,
            ledger.sites,
            forget_ex,
            retain_means,
            config,
            pad_token_id=encoder.pad_token_id,
            base=bases,
            start=head,
            start_log_scale=head_scales,
            progress=False,
        )
        forget = probe_metrics(model, forget_ex, encoder.pad_token_id)
        retain = probe_metrics(model, retain_ex, encoder.pad_token_id)
        retain_drop = baseline["retain"]["acc"] - retain["acc"]
        rows.append(
            TuneRow(
                gamma,
                bucket,
                forget["acc"],
                retain["acc"],
                baseline["forget"]["acc"] - forget["acc"],
                retain_drop,
                retain_drop <= limit + 1e-12,
            )
        )
    best = recommend(rows)
    return {
        "why_none": None if best is not None else _why_none(rows),
        "baseline": baseline,
        "limit": limit,
        "rescale": rescale,
        "rows": [{**asdict(r), "layers": list(r.layers)} for r in rows],
        "recommended": None if best is None else {"gamma": best.gamma, "layers": list(best.layers)},
    }
