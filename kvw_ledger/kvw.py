"""Knowledge Vector Weakening: accessor, gate, and the progressive loop.

For each shuffled forget batch b, the pooled mean coefficient C_f is measured on
the model as already weakened, compared with the retain coefficients C_r, and the
gate exp(-gamma * A_b) is applied at once, where

    A_b = max(0, log(C_f + eps) - log(C_r + eps)).

A request is kept as its exponent w = gamma * sum_b A_b (float32, >= 0), never as
a product of gates: the weights during and after the loop are
``base * exp(-(start + w))`` computed in float32 from the base and cast once, so
requests compose by adding exponents and nothing is ever divided to undo them.

With ``rescale`` (the authors' optional step, off by default) each weakened value
matrix gets its Frobenius norm back after every batch. That factor is a per-site
scalar kept as a log-scale s, so it composes like the exponents: the weights are
``base * exp(S - W)`` where W and S are the sums of the active requests' exponent
vectors and log-scales, and a request's s restores the norm the site had before it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kvw_ledger.coefficients import CoefficientHooks, measure_shared
from kvw_ledger.data import Example
from kvw_ledger.distributed import LOCAL, World
from kvw_ledger.errors import BadInputError, NonFiniteActivationError
from kvw_ledger.sites import Site, select_layers, site_weight
from kvw_ledger.weakening import Weakening


@dataclass(frozen=True)
class KVWConfig:
    """Parameters of one deletion request (defaults follow the KVW paper's code)."""

    gamma: float = 0.02  # weakening strength: exponent added per nat of accessor, per batch
    layers: tuple[int, int] = (1, 25)  # inclusive layer range weakened, clipped to the model
    batch_size: int = 1  # forget records per batch (one C_f and one gate per batch)
    epochs: int = 1  # passes over the forget set
    seed: int = 0  # shuffle seed of the forget batches
    eps: float = 1e-12  # added inside both logs of the accessor
    keep_trace: bool = True  # keep each batch's C_f so the request can be re-derived fast
    rescale: bool = False  # restore each weakened site's Frobenius norm (a log-scale per site)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise BadInputError(f"--gamma must be a finite number > 0, not {self.gamma}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.epochs < 1:
            raise BadInputError(f"--epochs must be at least 1, not {self.epochs}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise BadInputError(f"eps must be a finite number > 0, not {self.eps}")
        start, end = self.layers
        if start < 0 or start > end:
            raise BadInputError(f"--layers {start}:{end} is not an inclusive range of layers")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters, recorded in the journal.

        ``rescale`` is recorded only when on, so a request without it is recorded
        exactly as before the option existed.
        """
        data = asdict(self)
        data["layers"] = list(self.layers)
        if not self.rescale:
            del data["rescale"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVWConfig:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["layers"] = tuple(values["layers"])
        return cls(**values)


@dataclass
class KVWResult:
    """What one request produced."""

    exponents: dict[str, torch.Tensor]  # site -> (n_vectors,) float32, on the CPU
    trace: dict[str, torch.Tensor] | None  # site -> (n_batches, n_vectors) float32 C_f per batch
    n_batches: int
    n_tokens: int  # selected (answer-predicting) tokens over all batches
    log_scales: dict[str, torch.Tensor] | None = None  # site -> () float32 s, with rescale only


def accessor(c_forget: torch.Tensor, c_retain: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """A = max(0, log(C_f + eps) - log(C_r + eps)), elementwise."""
    return _accessor(c_forget, torch.log(c_retain + eps), eps)


def _accessor(c_forget: torch.Tensor, log_retain: torch.Tensor, eps: float) -> torch.Tensor:
    return (torch.log(c_forget + eps) - log_retain).clamp_(min=0)


def exponents_from_trace(
    trace: torch.Tensor, retain_mean: torch.Tensor, config: KVWConfig
) -> torch.Tensor:
    """Re-derives one site's exponent from its per-batch C_f trace and (new) C_r.

    The accumulation repeats the progressive loop's operations in the same order,
    so the same C_r reproduces the stored exponent bit for bit. With another C_r it
    is the fast approximation: the C_f were measured on the model as weakened
    under the old statistics.
    """
    log_retain = torch.log(retain_mean.to(torch.float32) + config.eps)
    w = torch.zeros_like(log_retain)
    for c_forget in trace.to(torch.float32):  # (n_batches, d_ff) -> one (d_ff,) per batch
        w.add_(_accessor(c_forget, log_retain, config.eps), alpha=config.gamma)
    return w


def gate(a: torch.Tensor, gamma: float) -> torch.Tensor:
    """g = exp(-gamma * A): the factor each value vector is scaled by."""
    return torch.exp(-gamma * a)


def scale_vectors(weight: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiplies each value vector (slice along ``axis``) of ``weight`` by ``factor``."""
    return weight * (factor.unsqueeze(0) if axis == 1 else factor.unsqueeze(1))


def weakened(
    base: torch.Tensor,
    weakening: Weakening,
    site: str,
    axis: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base * exp(-W)`` along ``axis`` for ``site`` of ``weakening``, in float32, cast
    once to the base's dtype.

    Where ``weakening`` holds a log-scale S for the site the factor is ``exp(S - W)``.
    With ``out`` (a tensor of the base's shape, e.g. a live weight, on any device)
    the result is written there, cast once to ``out``'s dtype, and ``out`` returned:
    a model loaded in float32 from a bfloat16 checkpoint holds the float32 product,
    never one rounded through bfloat16 first. A float32 base is multiplied straight
    into a float32 ``out``, with no temporary matrix (the same products, so the same bits).
    """
    # exp runs where the exponent lives (the CPU for stored exponents), so a model on a
    # GPU gets the very factors an export computes, and so the same bits.
    w = weakening.exponents[site].to(torch.float32)
    log_scale = weakening.log_scale(site)
    if log_scale is None:
        factor = torch.exp(-w)
    else:
        factor = torch.exp(log_scale.to(device=w.device, dtype=torch.float32) - w)
    factor = factor.to(base.device)
    if out is None:
        return scale_vectors(base.to(torch.float32), factor, axis).to(base.dtype)
    if base.dtype == out.dtype == torch.float32 and base.device == out.device:
        return torch.mul(base, factor.unsqueeze(0) if axis == 1 else factor.unsqueeze(1), out=out)
    return out.copy_(scale_vectors(base.to(torch.float32), factor, axis).to(out.dtype))


def column_log_norms(base: torch.Tensor, axis: int) -> torch.Tensor:
    """log ||v_i||^2 of every value vector of ``base``, in float64 (-inf for a zero vector)."""
    reduce = 0 if axis == 1 else 1
    squares = base.to(torch.float64).square().sum(reduce)  # (d_model, n) or (n, d_model) -> (n,)
    return torch.log(squares)


def log_norm(log_sq: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """log ||base * exp(-exponent)||_F in float64, from :func:`column_log_norms` of the base.

    ||W diag(f)||_F^2 = sum_i f_i^2 ||v_i||^2, so the norm needs only the vector norms:
    O(n_vectors) per step, and exact up to float64 rounding.
    """
    w = exponent.to(device=log_sq.device, dtype=torch.float64)
    return 0.5 * torch.logsumexp(log_sq - 2.0 * w, dim=0)


def log_scale(log_sq: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The float32 s with ||base * exp(s - after)||_F = ||base * exp(-before)||_F.

    ``before`` and ``after`` are float32 exponent sums; a zero matrix gets s = 0.
    """
    s = log_norm(log_sq, before) - log_norm(log_sq, after)
    return torch.nan_to_num(s, nan=0.0).to(torch.float32)


def batch_order(n_examples: int, config: KVWConfig) -> list[list[int]]:
    """The batches of one request: per epoch, a seeded shuffle cut into batch-size pieces."""
    rng = random.Random(config.seed)
    batches: list[list[int]] = []
    for _ in range(config.epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        batches.extend(
            order[i : i + config.batch_size] for i in range(0, n_examples, config.batch_size)
        )
    return batches


def run_kvw(
    model: nn.Module,
    sites: Sequence[Site],
    examples: Sequence[Example],
    retain_means: Mapping[str, torch.Tensor],
    config: KVWConfig,
    *,
    pad_token_id: int,
    base: Mapping[str, torch.Tensor] | None = None,
    start: Mapping[str, torch.Tensor] | None = None,
    start_log_scale: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    world: World = LOCAL,
) -> KVWResult:
    """Runs the progressive KVW loop for one request and leaves the model weakened.

    Under data parallel every rank runs this loop on its own copy of the model with
    the same examples: the batch order comes from the seed, each rank measures its
    share of every batch, and the sums are all-reduced before the gate, so every rank
    computes the same exponents and leaves its model weakened alike.

    Args:
        model: the model, materialised at ``base * exp(start_log_scale - start)``.
        sites: every site of the model; those in ``config.layers`` are weakened.
        examples: the encoded forget set.
        retain_means: C_r per site (pooled mean |coefficient| over the retain set).
        config: the request's parameters.
        pad_token_id: id used to right-pad batches.
        base: the value matrices the ledger keeps (default: the model's current weights);
            only read, and copied only when they share memory with the model's weights.
        start: exponents already active (default: none).
        start_log_scale: summed log-scales already active, per site (default: none).
        progress: show a progress bar on stderr.
        world: the data-parallel job this process is a rank of (default: one process).

    Raises:
        BadInputError: empty forget set, or retain statistics missing a site.
        NonFiniteActivationError: NaN or infinite coefficients.
    """
    if not examples:
        raise BadInputError("the forget set is empty; a request needs at least one record")
    chosen = select_layers(sites, config.layers)
    missing = [s.name for s in chosen if s.name not in retain_means]
    if missing:
        raise BadInputError(f"the retain statistics have no coefficients for site {missing[0]}")
    state = _SiteState.build(model, chosen, retain_means, config, base, start, start_log_scale)
    plan = batch_order(len(examples), config)  # from the seed alone: the same on every rank
    traces: dict[str, list[torch.Tensor]] = {s.name: [] for s in chosen}
    n_tokens = 0
    with CoefficientHooks(model, chosen) as hooks:
        for indices in tqdm(plan, desc="forget", disable=not progress, leave=False):
            measured, share = measure_shared(hooks, [examples[i] for i in indices], pad_token_id, world)
            n_tokens += share
            for name, c_forget in measured.means().items():
                # To the weight's device: an offloaded site's weight waits on the CPU while
                # its layer runs (and its sums land) on another device.
                c_forget = c_forget.to(state.log_retain[name].device)
                state.step(name, c_forget, config)
                if config.keep_trace:
                    traces[name].append(c_forget)
    n_tokens = world.total(n_tokens)
    exponents = {name: w.cpu() for name, w in state.exponents.items()}
    for name, w in exponents.items():
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteActivationError(
                f"the forget data drove site {name} to NaN or infinite coefficients; the request "
                "was not applied"
            )
    trace = {n: torch.stack(t).cpu() for n, t in traces.items()} if config.keep_trace else None
    scales = {n: s.cpu() for n, s in state.log_scales.items()} if config.rescale else None
    return KVWResult(exponents, trace, len(plan), n_tokens, scales)


@dataclass
class _SiteState:
    """Per-site working state of one progressive loop, all on the sites' devices."""

    sites: dict[str, Site]
    weights: dict[str, torch.Tensor]  # live views into the model
    base: dict[str, torch.Tensor]  # original dtype
    start: dict[str, torch.Tensor]  # float32 exponents already active
    log_retain: dict[str, torch.Tensor]  # log(C_r + eps)
    exponents: dict[str, torch.Tensor]  # float32 w accumulated by this request
    start_scale: dict[str, torch.Tensor | None]  # float32 () log-scale already active, if any
    log_sq: dict[str, torch.Tensor]  # float64 log ||v_i||^2 of the base, with rescale only
    log_scales: dict[str, torch.Tensor]  # float32 () s of this request, with rescale only

    @classmethod
    def build(
        cls,
        model: nn.Module,
        chosen: Sequence[Site],
        retain_means: Mapping[str, torch.Tensor],
        config: KVWConfig,
        base: Mapping[str, torch.Tensor] | None,
        start: Mapping[str, torch.Tensor] | None,
        start_log_scale: Mapping[str, torch.Tensor] | None = None,
    ) -> _SiteState:
        state = cls({}, {}, {}, {}, {}, {}, {}, {}, {})
        for site in chosen:
            weight = site_weight(model, site)
            dev = weight.device
            state.sites[site.name] = site
            state.weights[site.name] = weight
            state.base[site.name] = _private_base(
                weight, base[site.name] if base is not None else None
            )
            zeros = torch.zeros(site.n_vectors, dtype=torch.float32, device=dev)
            prior = start.get(site.name) if start is not None else None
            state.start[site.name] = (
                zeros.clone() if prior is None else prior.to(dev, torch.float32)
            )
            c_retain = retain_means[site.name].to(dev, torch.float32)
            state.log_retain[site.name] = torch.log(c_retain + config.eps)
            state.exponents[site.name] = zeros
            scale = start_log_scale.get(site.name) if start_log_scale is not None else None
            state.start_scale[site.name] = None if scale is None else scale.to(dev, torch.float32)
            if config.rescale:
                state.log_sq[site.name] = column_log_norms(state.base[site.name], site.axis)
                state.log_scales[site.name] = torch.zeros((), dtype=torch.float32, device=dev)
        return state

    def step(self, name: str, c_forget: torch.Tensor, config: KVWConfig) -> None:
        """Accumulates one batch's accessor and re-materialises the site from its base."""
        a = _accessor(c_forget, self.log_retain[name], config.eps)  # (d_ff,)
        self.exponents[name].add_(a, alpha=config.gamma)
        site = self.sites[name]
        total = self.start[name] + self.exponents[name]
        scale = self.start_scale[name]
        if config.rescale:
            # The reference restores the norm after every batch; the scales of the batches
            # multiply, so s always measures from the start of the request.
            s = log_scale(self.log_sq[name], self.start[name], total)
            self.log_scales[name] = s
            scale = s if scale is None else scale + s
        now = Weakening({name: total}, {} if scale is None else {name: scale})
        weakened(self.base[name], now, name, site.axis, out=self.weights[name])


def _private_base(weight: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """The base a loop reads while it rewrites ``weight``, on the weight's device.

    A given base that lives apart from the weight is only read, so it is used as it
    is (on the weight's device); one that shares the weight's memory (or none: the
    weight itself) is copied first, since every step overwrites the weight.
    """
    source = weight if given is None else given.to(weight.device)
    if source.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        return source.clone()
    return source
