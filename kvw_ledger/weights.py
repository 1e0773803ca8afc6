"""The ledger's weights on a live model: the checked model directory loaded, and a
version written into its sites as ``base * exp(S - W)``, computed from the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvw_ledger import model_files
from kvw_ledger.devices import Placement
from kvw_ledger.distributed import World
from kvw_ledger.errors import ModelMismatchError
from kvw_ledger.fingerprint_cache import CACHE_NAME, FingerprintCache
from kvw_ledger.kvw import weakened
from kvw_ledger.loading import load_model, load_processor
from kvw_ledger.sites import site_weight
from kvw_ledger.store import Store
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def load(
    ledger, model_dir: str | Path | None, at: str | int, placement: Placement, progress: bool
) -> tuple[nn.Module, Any]:
    directory = ledger.model_dir(model_dir)
    check_model_dir(ledger, directory, progress)
    model = load_model(
        directory, progress=progress, placement=placement,
        device_map=ledger.device_map, offload_folder=ledger.offload_folder,
    )  # a device_map (accelerate) overrides placement's device
    _, weakening = ledger.sums(at)
    if not weakening.is_zero():
        materialize(ledger, model, weakening)
    # else the version is the base, and the checked files hold exactly the base
    # (base * exp(-0) is the base, bit for bit, and widening or rounding it into
    # another dtype is the one cast from_pretrained made): nothing to read or write.
    return model, load_processor(directory)


def holds_base_dtype(ledger: Ledger, model: nn.Module) -> bool:
    """Whether every site's weight has its stored base's dtype (no --dtype cast at load)."""
    return all(
        str(site_weight(model, s).dtype).removeprefix("torch.")
        == ledger.store.array_attrs(Store.base_path(s.name)).get("dtype")
        for s in ledger.sites
    )


def check_model_dir(ledger: Ledger, directory: Path, progress: bool = True, *, cached: bool = True) -> None:
    """The model directory must hold the model init saw: same architecture, same bytes.

    With ``cached``, files the ledger's fingerprint cache trusts are not read again
    (see :mod:`kvw_ledger.fingerprint_cache`); ``verify`` passes False and hashes all.

    Raises:
        ModelMismatchError: another architecture, or a weight file or config that differs.
    """
    recorded = ledger.model_info.get("model_type")
    try:
        found = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        found = None  # check_fingerprint names what is wrong with the directory
    if recorded and found and found != recorded:
        raise ModelMismatchError(
            f"{directory} holds a {found} model, but this ledger was made for a {recorded} model "
            f"({ledger.model_info.get('dir')}); pass that model directory, or create a new ledger"
        )
    cache = FingerprintCache.open(ledger.path / CACHE_NAME) if cached else None
    model_files.check_fingerprint(
        directory, ledger.model_info["fingerprint"], progress, cache, init_dir=ledger.model_info.get("dir")
    )


def materialize(ledger: Ledger, model: Any, weakening: Weakening) -> None:
    """Writes ``base * exp(S - W)`` of ``weakening`` into every site of ``model``."""
    with torch.no_grad():
        for site in ledger.sites:
            weight = site_weight(model, site)
            # The factors are computed on the CPU (where the sums are), the product on
            # the weight's device, cast once into the weight's dtype.
            base = ledger.base(site.name).to(weight.device)
            weakened(base, weakening, site.name, site.axis, out=weight)


def rank_device(device: str | torch.device | None, world: World) -> str | torch.device | None:
    """Under nccl, ``auto`` is this rank's own GPU (not every rank on cuda:0)."""
    if world.backend == "nccl" and (device is None or str(device).strip().lower() == "auto"):
        return f"cuda:{world.local_rank}"
    return device
