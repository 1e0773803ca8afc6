"""Coefficient collection: how strongly each knowledge vector fires for some data.

The coefficient of value vector i at a token is the absolute value of the i-th
input of the FFN's value projection. :class:`CoefficientHooks` puts forward
pre-hooks on the sites in range only, gathers the selected positions, and sums
them on the device in float32; token counts are known on the host from the
batch, so nothing waits for the device per batch. Once every needed site has run,
the hook raises :class:`StopForward`: later layers, the LM head and the loss
never run.

The hooks read each site's input on whatever device it arrives (a model sharded
by accelerate's ``device_map`` runs its layers on several devices, and an
offloaded layer's weights live on ``meta`` until its forward): the sums stay on
that device. Under data parallel (:class:`~kvw_ledger.distributed.World`) each
rank measures its share of a batch and :func:`measure_shared` sums the shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kvw_ledger.data import Batch, Example, collate
from kvw_ledger.distributed import LOCAL, World, mark_shared
from kvw_ledger.errors import BadInputError, NonFiniteActivationError
from kvw_ledger.sites import Site


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once its last needed site has run."""


@dataclass
class Coefficients:
    """Per-site sums of |coefficient| over selected tokens, and their token counts."""

    sums: dict[str, torch.Tensor]  # site -> (n_vectors,) float32, on the site's device
    counts: dict[str, torch.Tensor]  # site -> () int64 on the same device

    def means(self) -> dict[str, torch.Tensor]:
        """Pooled mean per site: sum over tokens / token count (0 where no token was seen)."""
        return {
            name: self.sums[name] / self.counts[name].clamp(min=1).to(torch.float32)
            for name in self.sums
        }

    def add(self, other: Coefficients) -> None:
        """Adds another measurement in place (sums and counts reduce exactly)."""
        for name, value in other.sums.items():
            self.sums[name] += value.to(self.sums[name].device)
            self.counts[name] += other.counts[name].to(self.counts[name].device)

    def check_finite(self, what: str) -> None:
        """Raises NonFiniteActivationError naming the first site whose sums are NaN or infinite."""
        for name, value in self.sums.items():
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteActivationError(
                    f"{what}: the activations at site {name} are NaN or infinite; the model "
                    "overflows on this data (try float32, or check the weights)"
                )


class CoefficientHooks:
    """Context manager that hooks the given sites and measures one batch at a time.

    The hooks are always removed on exit, even when the forward raises.

    Args:
        model: the model to hook.
        sites: the sites to measure (usually those in the layer range).
        stop_early: end each forward once every needed site has run.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], stop_early: bool = True) -> None:
        self.model = model
        self.sites = list(sites)
        self.stop_early = stop_early
        self._by_module: dict[str, list[Site]] = {}
        for site in self.sites:
            self._by_module.setdefault(site.module, []).append(site)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._batch: Batch | None = None
        self._needed: set[str] = set()
        self._fired: set[str] = set()
        self._current: Coefficients | None = None
        self._positions: dict[torch.device, torch.Tensor] = {}  # the batch's positions per device

    def __enter__(self) -> CoefficientHooks:
        modules = dict(self.model.named_modules())
        try:
            for module_name in self._by_module:
                hook = self._make_hook(module_name)
                self._handles.append(
                    modules[module_name].register_forward_pre_hook(hook, with_kwargs=True)
                )
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def measure(self, batch: Batch) -> Coefficients:
        """Runs one forward pass over ``batch`` (already on the device) and returns its sums."""
        self._batch = batch
        self._positions = {batch.positions.device: batch.positions}
        self._fired = set()
        self._needed = {
            module
            for module, sites in self._by_module.items()
            if batch.has_images or sites[0].tower == "language"
        }
        self._current = Coefficients({}, {})
        with torch.no_grad(), contextlib.suppress(StopForward):
            self.model(**batch.inputs, use_cache=False)
        result = self._current
        self._current = self._batch = None
        self._positions = {}
        # A site that did not run (e.g. the vision tower on a text-only batch) saw no tokens.
        empty = self.zeros()
        for site in self.sites:
            if site.name not in result.sums:
                result.sums[site.name] = empty.sums[site.name]
                result.counts[site.name] = empty.counts[site.name]
        return result

    def zeros(self) -> Coefficients:
        """A measurement that saw no token: what a rank without records in a batch contributes."""
        devices = {s.name: self._device_of(s) for s in self.sites}
        return Coefficients(
            {s.name: torch.zeros(s.n_vectors, device=devices[s.name]) for s in self.sites},
            {s.name: torch.zeros((), dtype=torch.long, device=devices[s.name]) for s in self.sites},
        )

    def _device_of(self, site: Site) -> torch.device:
        """The device a site's sums land on: its weight's, or for an offloaded weight
        (on ``meta`` between forwards) the device its layer runs on."""
        device = self.model.get_parameter(site.param).device
        return model_device(self.model) if device.type == "meta" else device

    def _positions_on(self, device: torch.device) -> torch.Tensor:
        """The batch's selected positions on ``device`` (a sharded model's later layers
        run elsewhere), copied once per batch and device."""
        assert self._batch is not None
        found = self._positions.get(device)
        if found is None:
            found = self._positions[device] = self._batch.positions.to(device)
        return found

    def _make_hook(self, module_name: str) -> Any:
        sites = self._by_module[module_name]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._current is None or self._batch is None:
                return  # a forward outside measure(): not ours to record
            if sites[0].kind == "experts":
                self._record_experts(module, sites, args, kwargs)
            else:
                self._record_linear(sites[0], args[0] if args else next(iter(kwargs.values())))
            self._fired.add(module_name)
            if self.stop_early and self._needed <= self._fired:
                raise StopForward

        return hook

    def _store(self, name: str, summed: torch.Tensor, count: torch.Tensor) -> None:
        assert self._current is not None
        if name in self._current.sums:  # a module called twice in one forward
            self._current.sums[name] += summed
            self._current.counts[name] += count
        else:
            self._current.sums[name] = summed
            self._current.counts[name] = count

    def _record_linear(self, site: Site, x: torch.Tensor) -> None:
        assert self._batch is not None
        flat = x.reshape(-1, x.shape[-1])  # (B*T, d_ff), or (patches, d_ff) in a vision tower
        if site.tower == "language":
            flat = flat.index_select(0, self._positions_on(flat.device))  # (B*T, d_ff) -> (N, d_ff)
        summed = flat.to(torch.float32).abs().sum(0)  # (N, d_ff) -> (d_ff,)
        # A fill on the device, not torch.tensor(n, device=...): that copies from the host.
        count = summed.new_full((), flat.shape[0], dtype=torch.long)
        self._store(site.name, summed, count)

    def _record_experts(
        self, module: nn.Module, sites: list[Site], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # Fused MoE experts never call a down-projection module we could hook, so the
        # per-expert input act(gate) * up is recomputed here for the selected tokens.
        # The experts' forward takes (hidden_states, top_k_index, top_k_weights), by
        # position or by name, in transformers' experts interface.
        assert self._batch is not None
        hidden, top_k_index = [*args, *kwargs.values()][:2]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, self._positions_on(hidden.device)
        )  # (B*T, H) -> (N, H)
        routed = top_k_index.reshape(-1, top_k_index.shape[-1]).index_select(
            0, self._positions_on(top_k_index.device)
        )  # (N, top_k) expert ids
        for site in sites:
            assert site.expert is not None
            takes = (routed == site.expert).any(dim=-1)  # (N,) bool: tokens routed to this expert
            coeff = expert_input(module, hidden, site.expert).to(torch.float32).abs()  # (N, d_ff)
            summed = (coeff * takes.unsqueeze(1)).sum(0)  # (N, d_ff) -> (d_ff,)
            self._store(site.name, summed, takes.sum())


def expert_input(module: nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """The input of one fused expert's down projection: (N, H) -> (N, d_ff).

    Follows transformers' experts interface: ``gate_up_proj`` (or ``up_proj`` when
    the experts have no gate), optional biases, weights stored [out, in] or, with
    ``is_transposed``, [in, out], and the module's own gating (``_apply_gate``).
    """
    gated = bool(getattr(module, "has_gate", True))
    name = "gate_up_proj" if gated else "up_proj"
    weight: torch.Tensor = getattr(module, name)[expert]
    if getattr(module, "is_transposed", False):
        projected = hidden @ weight  # (N, H) @ (H, 2*d_ff) -> (N, 2*d_ff)
    else:
        projected = nn.functional.linear(hidden, weight)  # (N, H) -> (N, 2*d_ff)
    if getattr(module, "has_bias", False):
        projected = projected + getattr(module, f"{name}_bias")[expert]
    if gated:
        apply_gate: Any = module._apply_gate
        return apply_gate(projected)  # type: ignore[no-any-return]
    act: Any = module.act_fn
    return act(projected)  # type: ignore[no-any-return]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where batches go)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def measure_shared(
    hooks: CoefficientHooks, examples: Sequence[Example], pad_token_id: int, world: World = LOCAL
) -> tuple[Coefficients, int]:
    """Measures this rank's share of one batch and returns the sums of the whole batch.

    Also returns this rank's selected-token count. A rank without records in the
    batch contributes zeros. Under data parallel a rank that fails still joins the
    all-reduce (flagged), so no other rank waits for it forever.
    """
    mine = world.shard(examples)
    if not mine:
        return _reduced(hooks.zeros(), hooks.sites, world), 0
    batch = collate(mine, pad_token_id)
    try:
        measured = hooks.measure(batch.to(model_device(hooks.model)))
    except Exception as e:
        if world.parallel:  # the others are in the all-reduce already
            world.all_reduce(_tensors(hooks.zeros(), hooks.sites), failed=True)
            mark_shared(e)
        raise
    return _reduced(measured, hooks.sites, world), batch.n_tokens


def _reduced(measured: Coefficients, sites: Sequence[Site], world: World) -> Coefficients:
    world.all_reduce(_tensors(measured, sites))
    return measured


def _tensors(measured: Coefficients, sites: Sequence[Site]) -> list[torch.Tensor]:
    """The sums and counts in site order: the same layout on every rank."""
    return [t for s in sites for t in (measured.sums[s.name], measured.counts[s.name])]


def collect(
    model: nn.Module,
    sites: Sequence[Site],
    batches: Iterable[Batch] | Iterable[Sequence[Example]],
    *,
    total: int | None = None,
    desc: str = "coefficients",
    progress: bool = True,
    world: World = LOCAL,
    pad_token_id: int = 0,
) -> Coefficients:
    """Sums coefficients over all ``batches`` (e.g. a whole retain set) on the unchanged model.

    ``batches`` are collated batches, or (under data parallel) lists of examples that
    every rank sees alike: each rank then measures its share of every batch, right-padded
    with ``pad_token_id``, and the totals are summed over the ranks once, at the end.

    Raises:
        NonFiniteActivationError: the forward produced NaN or infinite coefficients.
    """
    device = model_device(model)
    totals: Coefficients | None = None
    n_batches = 0  # the same on every rank: they all see every batch, and measure a share
    with CoefficientHooks(model, sites) as hooks:
        try:
            for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
                n_batches += 1
                if not isinstance(batch, Batch):  # this rank's share; C_r is one pooled mean,
                    mine = world.shard(batch)  # so the shares are summed once, below
                    if not mine:
                        continue
                    batch = collate(mine, pad_token_id)
                measured = hooks.measure(batch.to(device))
                if totals is None:
                    totals = measured
                else:
                    totals.add(measured)
        except Exception as e:
            if world.parallel:  # the others are (or will be) in the final all-reduce
                world.all_reduce(_tensors(hooks.zeros(), hooks.sites), failed=True)
                mark_shared(e)
            raise
        if not n_batches:
            raise BadInputError(f"{desc}: no data to measure")
        if totals is None:
            totals = hooks.zeros()  # a rank whose shares were all empty
        world.all_reduce(_tensors(totals, hooks.sites))
    totals.check_finite(desc)
    return totals
