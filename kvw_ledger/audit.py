"""Audits: does a request's forgetting hold, at full precision, quantized and relearned?

An audit measures the version where a request is active against the version just
before the request, on a forget probe (and optionally a retain probe):

- efficacy: generation and multiple-choice accuracy and ROUGE-L (``evaluate.py``);
- quantization: the same after weight-only 8- and 4-bit rounding of both versions
  (``quantize.py``); ``resurfaced`` is the forget accuracy the rounding brought back,
  ``share`` that gain over what the request removed;
- relearning: both versions fine-tuned alike on ``relearn_data`` (``relearn.py``), then
  measured on the probe records that data does not cover. ``recovery`` is each
  fine-tuned version's accuracy over the pre-request accuracy on those records (as
  Deeb and Roger count it); ``ratio`` is the weakened version's over the unweakened
  one's after the same fine-tuning: near 1 the knowledge was hidden, near 0 removed.

The result is one ``audit`` journal entry holding the probes' fingerprints, never
their records. An audit changes no weight of the ledger.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kvw_ledger import data
from kvw_ledger.errors import BadInputError, RequestStateError
from kvw_ledger.evaluate import evaluate_records
from kvw_ledger.journal import Entry
from kvw_ledger.ledger import Ledger
from kvw_ledger.quantize import SCHEMES, library, quantized_copy
from kvw_ledger.relearn import held_out, relearn
from kvw_ledger.views import audit_lines as summary_lines

__all__ = ["audit", "audits_of", "latest_audit", "summary_lines"]

# evaluate_records' signature: (model, processor, records, base_dir, multiple_choice=...) -> figures
Evaluator = Callable[..., dict[str, dict[str, float]]]
_METRICS = ("gen_acc", "mc_acc", "rouge_l")
_SCORED = ("gen_acc", "mc_acc")  # the accuracies resurfacing is counted on


def audit(
    ledger: Ledger,
    request_id: str,
    forget_probe: str | Path,
    *,
    retain_probe: str | Path | None = None,
    quantize: Sequence[str] = SCHEMES,
    group_size: int = 64,
    relearn_data: str | Path | None = None,
    relearn_steps: int = 20,
    relearn_lr: float = 1e-5,
    relearn_batch_size: int = 4,
    seed: int = 0,
    at: str | int = "HEAD",
    model_dir: str | Path | None = None,
    progress: bool = True,
    evaluator: Evaluator | None = None,
) -> Entry:
    """Audits ``request_id`` at ``at`` and commits the result as an ``audit`` entry.

    ``evaluator`` stands in for :func:`kvw_ledger.evaluate.evaluate_records` (same
    arguments and result); the demo passes one that reuses figures of identical weights.

    Raises:
        RequestStateError: the request does not exist, or is not active at ``at``.
        BadInputError: a probe or the relearn data is unusable, or relearn covers the whole probe.
    """
    for scheme in quantize:
        if scheme not in SCHEMES:
            raise BadInputError(f"unknown quantization scheme {scheme!r}; use {', '.join(SCHEMES)}")
    score = evaluator or evaluate_records
    probes = {"forget": _Probe(forget_probe, score)}
    if retain_probe is not None:
        probes["retain"] = _Probe(retain_probe, score)
    taught = _Probe(relearn_data, score) if relearn_data is not None else None
    entries = ledger.entries()
    version = ledger.resolve(at, entries)
    state = ledger.state(version)
    if request_id not in state.requests:
        raise RequestStateError(f"no request {request_id!r} at version {version} (see `kvw-ledger log`)")
    if request_id not in state.active:
        raise RequestStateError(
            f"request {request_id!r} is not active at version {version}; pass --at a version "
            f"where it is, e.g. --at {state.requests[request_id].version}"
        )
    before = state.requests[request_id].version - 1
    held = held_out(probes["forget"].records, taught.records) if taught is not None else None
    if quantize:
        library()  # a missing library fails before the model loads

    model, processor = ledger.load(model_dir, version, progress=progress)
    unweakened = copy.deepcopy(model)
    ledger.materialize(unweakened, before)
    versions = {"after": model, "before": unweakened}

    def measure(m: nn.Module) -> dict[str, Any]:
        return {kind: p.measure(m, processor) for kind, p in probes.items()}

    results: dict[str, Any] = {"efficacy": {label: measure(m) for label, m in versions.items()}}
    quantized: dict[str, Any] = {}
    for scheme in quantize:
        row = {label: measure(quantized_copy(m, scheme, group_size)) for label, m in versions.items()}
        row["resurfacing"] = _resurfacing(results["efficacy"], row["after"]["forget"])
        quantized[scheme] = row
    results["quantized"] = quantized
    if taught is not None and held is not None:
        results["relearned"] = _relearned(
            versions, processor, taught, held, probes["forget"].base_dir, score,
            steps=relearn_steps, lr=relearn_lr, batch_size=relearn_batch_size, seed=seed,
        )
    body: dict[str, Any] = {
        "request": request_id,
        "version": version,
        "before": before,
        "probes": {kind: p.fingerprint() for kind, p in probes.items()},
        "quantization": {"library": library(), "group_size": group_size, "schemes": list(quantize)}
        if quantize
        else None,
        "relearn": None
        if taught is None
        else {
            **taught.fingerprint(),
            "steps": relearn_steps,
            "lr": relearn_lr,
            "batch_size": relearn_batch_size,
            "seed": seed,
            "held_out": len(held or []),
        },
        "results": _finite(results),
    }
    return ledger.record_audit(body)


class _Probe:
    """One JSONL file: its validated records, for fingerprints and for evaluate."""

    def __init__(self, path: str | Path, score: Evaluator) -> None:
        self.path = Path(path)
        self.score = score
        self.records = data.read_records(self.path)  # validates; errors name file and line
        self.base_dir = self.path.parent

    def fingerprint(self) -> dict[str, Any]:
        return {"data_fingerprint": data.fingerprint(self.records), "records": len(self.records)}

    def measure(self, model: nn.Module, processor: Any) -> dict[str, Any]:
        return _figures(model, processor, self.records, self.base_dir, str(self.path), self.score)


def _figures(
    model: nn.Module, processor: Any, records: Sequence[data.Record], base_dir: Path, where: str,
    score: Evaluator = evaluate_records,
) -> dict[str, Any]:
    """Accuracies over all records (and per modality), weighted by each modality's count."""
    choice = all("options" in r.extra and "correct" in r.extra for r in records)
    by_modality = score(
        model,  # type: ignore[arg-type]  # any causal LM: evaluate.py only calls it
        processor, records, base_dir, multiple_choice=choice,
    )
    n = sum(v["n"] for v in by_modality.values())
    if not n:
        raise BadInputError(f"{where}: no record this model can answer (image records need a vision model)")
    overall: dict[str, Any] = {
        k: sum(v[k] * v["n"] for v in by_modality.values()) / n
        for k in _METRICS
        if all(k in v for v in by_modality.values())
    }
    overall["n"] = int(n)
    overall["by_modality"] = {m: {**v, "n": int(v["n"])} for m, v in by_modality.items()}
    return overall


def _resurfacing(efficacy: dict[str, Any], quantized_forget: dict[str, Any]) -> dict[str, Any]:
    """Per accuracy: what rounding gave back (``resurfaced``) and its share of what was removed."""
    out = {}
    for k in _SCORED:
        if k not in quantized_forget:
            continue
        removed = efficacy["before"]["forget"][k] - efficacy["after"]["forget"][k]
        resurfaced = quantized_forget[k] - efficacy["after"]["forget"][k]
        out[k] = {"removed": removed, "resurfaced": resurfaced, "share": _ratio(resurfaced, removed)}
    return out


def _relearned(
    versions: dict[str, nn.Module],
    processor: Any,
    taught: _Probe,
    held: list[data.Record],
    base_dir: Path,
    score: Evaluator,
    **tuning: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, model in versions.items():
        pre = _figures(model, processor, held, base_dir, "the held-out forget probe", score)
        tuned = copy.deepcopy(model)
        losses = relearn(tuned, processor, taught.records, **tuning)
        post = _figures(tuned, processor, held, base_dir, "the held-out forget probe", score)
        out[label] = {"pre": pre, "post": post, "loss_first": losses[0], "loss_last": losses[-1]}
        del tuned
    for k in _SCORED:
        if k not in out["after"]["post"]:
            continue
        start = out["before"]["pre"][k]
        out.setdefault("recovery", {})[k] = {
            "after": _ratio(out["after"]["post"][k], start),
            "before": _ratio(out["before"]["post"][k], start),
            "ratio": _ratio(out["after"]["post"][k], out["before"]["post"][k]),
        }
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _finite(value: Any) -> Any:
    """The results with NaN (a modality without records) as null: entries are strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def audits_of(ledger: Ledger, request_id: str, entries: Sequence[Entry] | None = None) -> list[Entry]:
    """Every audit entry of ``request_id``, oldest first."""
    entries = list(entries) if entries is not None else ledger.entries()
    return [e for e in entries if e.op == "audit" and e.body.get("request") == request_id]


def latest_audit(ledger: Ledger, request_id: str, entries: Sequence[Entry] | None = None) -> Entry | None:
    """The newest audit entry of ``request_id``, or None."""
    found = audits_of(ledger, request_id, entries)
    return found[-1] if found else None
