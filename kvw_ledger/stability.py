"""Stability checks on a staged HEAD, run before a step is committed.

Sequential weakening can erode a model quietly, so every step that changes HEAD
is checked first: its exponents must be finite and non-negative, no site may lose
more than a budgeted share of its value matrix's Frobenius norm, and, with probe
sets, retain accuracy and answer NLL may not fall further than configured limits.
Forget-probe figures are recorded as efficacy, never as a limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from kvw_ledger.coefficients import model_device
from kvw_ledger.data import IGNORE_INDEX, Batch, Example, iter_batches
from kvw_ledger.errors import BadInputError
from kvw_ledger.kvw import weakened
from kvw_ledger.weakening import Weakening

OnFail = Literal["abort", "warn"]


@dataclass(frozen=True)
class StabilityLimits:
    """Limits a staged step must stay within."""

    max_attenuation: float = 0.5  # share of a site's Frobenius norm removed vs the base, 0..1
    max_retain_drop: float = (
        0.05  # retain-probe accuracy lost vs the base and the previous version (fraction)
    )
    max_nll_increase: float = (
        1.0  # retain-probe answer NLL gained vs the base (nats per answer token)
    )
    max_zeroed: float = 0.25  # share of a site's value vectors allowed below zero_floor, 0..1
    zero_floor: float = 1e-3  # a vector scaled by a factor under this counts as zeroed
    on_fail: OnFail = "abort"  # abort: commit nothing; warn: commit and record the failure

    def __post_init__(self) -> None:
        if not 0 <= self.max_zeroed <= 1:
            raise BadInputError(f"--max-zeroed must be in [0, 1], not {self.max_zeroed}")
        if not 0 < self.zero_floor < 1:
            raise BadInputError(f"--zero-floor must be in (0, 1), not {self.zero_floor}")
        if not 0 < self.max_attenuation <= 1:
            raise BadInputError(f"--max-attenuation must be in (0, 1], not {self.max_attenuation}")
        if not 0 <= self.max_retain_drop <= 1:
            raise BadInputError(f"--max-retain-drop must be in [0, 1], not {self.max_retain_drop}")
        if not (math.isfinite(self.max_nll_increase) and self.max_nll_increase >= 0):
            raise BadInputError(f"--max-nll-increase must be >= 0, not {self.max_nll_increase}")
        if self.on_fail not in ("abort", "warn"):
            raise BadInputError(f"--on-fail must be abort or warn, not {self.on_fail!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``value`` against ``limit``."""

    name: str  # e.g. "attenuation model.layers.3.mlp.down_proj"
    passed: bool
    value: float
    limit: float
    detail: str = ""

    def describe(self) -> str:
        """One line for an error message."""
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {self.value:.4g} (limit {self.limit:.4g}) {verdict}{' - ' + self.detail if self.detail else ''}"


@dataclass
class StabilityReport:
    """Every check of one staged step, plus the probe figures measured."""

    checks: list[Check] = field(default_factory=list)
    probes: dict[str, dict[str, float]] = field(default_factory=dict)  # probe -> {"acc", "nll"}
    attenuation: dict[str, float] = field(default_factory=dict)  # site -> share of norm removed
    on_fail: OnFail = "abort"  # what the step was told to do on a failure

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, stored in the journal entry."""
        return {
            "passed": self.passed,
            "on_fail": self.on_fail,
            "failed": [asdict(c) for c in self.failures()],
            "probes": self.probes,
            "max_attenuation": max(self.attenuation.values(), default=0.0),
            "attenuation": self.attenuation,
        }


def check_exponents(exponents: Mapping[str, torch.Tensor]) -> list[Check]:
    """Every exponent must be finite and >= 0 (a gate never amplifies)."""
    checks = []
    for name, w in exponents.items():
        bad = int((~(torch.isfinite(w) & (w >= 0))).sum())  # each bad entry once (-inf is both)
        checks.append(
            Check(f"numbers {name}", bad == 0, float(bad), 0.0, "non-finite or negative exponents")
        )
    return checks


# Exponents past this are float32 overflow in waiting: sums of them (the head, a
# rederive's running total) reach inf, and inf - inf is NaN. A large exponent below it
# (the demo's reach 110) only zeroes its vector, which check_zeroed limits.
MAX_EXPONENT = 1e30


def overflowing(exponents: Mapping[str, torch.Tensor]) -> str | None:
    """Says which site's exponents are NaN, infinite or beyond :data:`MAX_EXPONENT`, or None.

    Such a step is refused whatever ``on_fail`` says: it is not a weakening any more.
    """
    for name, w in exponents.items():
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            return f"{name} has {int((~finite).sum())} non-finite exponent(s)"
        top = float(w.max()) if w.numel() else 0.0
        if top > MAX_EXPONENT:
            count = int((w > MAX_EXPONENT).sum())
            return (
                f"{name} has {count} exponent(s) above {MAX_EXPONENT:g} (largest {top:.4g}), "
                "where float32 sums of exponents overflow"
            )
    return None


def check_zeroed(weakening: Weakening, limit: float, floor: float) -> tuple[list[Check], dict[str, float]]:
    """Per site, the share of value vectors whose factor ``exp(s - w)`` is under ``floor``.

    The Frobenius budget can miss a step that wipes out many vectors of small norm
    (or leaves a few large ones), so effectively-zeroed vectors are counted as such.
    """
    log_floor = math.log(floor)
    shares = {}
    for name, w in weakening.exponents.items():
        s = weakening.log_scale(name)
        log_factor = -w if s is None else s.reshape(()) - w  # (n_vectors,)
        shares[name] = float((log_factor < log_floor).float().mean()) if w.numel() else 0.0
    checks = [
        Check(f"zeroed {name}", share <= limit, share, limit, f"share of vectors scaled below {floor:g}")
        for name, share in shares.items()
    ]
    return checks, shares


def check_log_scales(log_scales: Mapping[str, torch.Tensor]) -> list[Check]:
    """Every summed log-scale (``--rescale``) must be finite."""
    checks = []
    for name, s in log_scales.items():
        bad = int((~torch.isfinite(s)).sum())
        checks.append(
            Check(f"numbers log-scale {name}", bad == 0, float(bad), 0.0, "a non-finite log-scale")
        )
    return checks


def attenuation(base: torch.Tensor, weakening: Weakening, site: str, axis: int) -> float:
    """Share of ``site``'s value matrix's Frobenius norm removed: 1 - ||W|| / ||W0||.

    W is the effective matrix, ``base * exp(S - W)`` of ``weakening``: a rescaled site
    has its norm back, so it measures about 0.
    """
    original = base.to(torch.float32)
    norm0 = float(torch.linalg.vector_norm(original))
    if norm0 == 0:
        return 0.0
    norm = float(torch.linalg.vector_norm(weakened(original, weakening, site, axis)))
    return 1.0 - norm / norm0


def check_attenuation(
    bases: Mapping[str, torch.Tensor], weakening: Weakening, axes: Mapping[str, int], limit: float
) -> tuple[list[Check], dict[str, float]]:
    """The attenuation budget, per site of ``weakening``, on the effective matrices
    (log-scales included)."""
    shares = {name: attenuation(bases[name], weakening, name, axes[name]) for name in weakening.exponents}
    checks = [
        Check(f"attenuation {name}", share <= limit, share, limit) for name, share in shares.items()
    ]
    return checks, shares


def probe_metrics(
    model: nn.Module, examples: Sequence[Example], pad_token_id: int, batch_size: int = 8
) -> dict[str, float]:
    """Teacher-forced answer NLL (nats per answer token) and greedy accuracy.

    A record counts as correct when the greedy (argmax) prediction equals every
    answer token: exactly what greedy decoding would produce for the answer.
    """
    device = model_device(model)
    # Sums stay on the device until the end (no host sync per batch); the NLL adds each
    # batch's float32 sum in float64, as a Python float would.
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total_tokens = 0  # answer tokens are known on the host: the batch's selected positions
    with torch.no_grad():
        for batch in iter_batches(examples, batch_size, pad_token_id):
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            logits = model(**inputs, use_cache=False).logits.float()  # (B, T, V)
            labels = _labels(batch, device)  # (B, T)
            shifted, targets = logits[:, :-1], labels[:, 1:]
            mask = targets != IGNORE_INDEX
            logp = torch.log_softmax(shifted, dim=-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            total_nll -= (picked * mask).sum().to(torch.float64)
            total_tokens += batch.n_tokens
            hits = (shifted.argmax(-1) == targets) | ~mask
            correct += hits.all(dim=1).sum()
    return {"acc": int(correct) / len(examples), "nll": float(total_nll) / max(total_tokens, 1)}


def _labels(batch: Batch, device: torch.device) -> torch.Tensor:
    # The batch carries positions, not labels: rebuild labels from the selected positions.
    ids = batch.inputs["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX).flatten()
    targets = batch.positions + 1
    labels[targets] = ids.flatten()[targets]
    return labels.view_as(ids).to(device)


def compare_probes(
    staged: Mapping[str, dict[str, float]],
    base: Mapping[str, dict[str, float]],
    previous: Mapping[str, dict[str, float]],
    limits: StabilityLimits,
) -> list[Check]:
    """Retain-type probes may lose at most ``max_retain_drop`` accuracy and ``max_nll_increase`` NLL."""
    checks = []
    for name, figures in staged.items():
        if name.startswith("forget"):
            continue  # efficacy, recorded but never a limit
        for reference_name, reference in (("base", base), ("previous", previous)):
            if name not in reference:
                continue
            drop = reference[name]["acc"] - figures["acc"]
            checks.append(
                Check(
                    f"{name} accuracy drop vs {reference_name}",
                    drop <= limits.max_retain_drop + 1e-12,
                    drop,
                    limits.max_retain_drop,
                )
            )
        if name in base:
            rise = figures["nll"] - base[name]["nll"]
            checks.append(
                Check(
                    f"{name} NLL increase vs base",
                    rise <= limits.max_nll_increase,
                    rise,
                    limits.max_nll_increase,
                )
            )
    return checks
