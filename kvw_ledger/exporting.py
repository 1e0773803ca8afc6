"""What an export of a version computes: the per-tensor transform of the checkpoint
(``Ledger.export``, ``tensor_hashes``) and the peft IA3 adapter form; :mod:`export`
writes the directory."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvw_ledger import model_files, weights
from kvw_ledger.errors import BadInputError, KVWLedgerError, StorageError
from kvw_ledger.export import export_model
from kvw_ledger.journal import Entry
from kvw_ledger.kvw import weakened

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


EXPORT_FORMATS = ("safetensors", "peft")  # export: a full model directory, or a peft IA3 adapter


def export_adapter(
    ledger: Ledger, out_dir: str | Path, version: int, entries: Sequence[Entry], model_dir: str | Path | None
) -> Path:
    from kvw_ledger.adapter import check_ia3_sites, write_ia3_adapter

    check_ia3_sites(ledger.sites)  # before any array is read
    _, weakening = ledger.sums(version)
    exponents, scales = weakening.exponents, weakening.log_scales
    zero = torch.zeros((), dtype=torch.float32)
    factors = {
        s.name: torch.exp(scales.get(s.name, zero).to(torch.float32) - exponents[s.name])
        for s in ledger.sites
    }
    provenance = {
        "ledger_version": version,
        "entry_hash": entries[version - 1].hash,
        "head_hash": entries[-1].hash,
        "active_requests": ledger.state(version).active,
        "model_fingerprint": ledger.model_info["fingerprint"],
        "format": "peft-ia3",
        "tool": "kvw-ledger",
    }
    base = str(ledger.model_dir(model_dir))
    try:
        return write_ia3_adapter(out_dir, ledger.sites, factors, base, provenance)
    except OSError as e:
        if isinstance(e, KVWLedgerError):
            raise
        raise StorageError(
            f"could not write the adapter to {out_dir} ({e.strerror or e}); nothing was exported"
        ) from e


def export_transform(
    ledger, version: int
) -> tuple[Callable[[str, str, torch.Tensor], torch.Tensor | None], dict[tuple[str, str], str]]:
    """What an export of ``version`` does to each checkpoint tensor (None: left as is),
    and the (file, key) of every site's tensor."""
    _, weakening = ledger.sums(version)
    by_location = {(loc.file, loc.key): name for name, loc in ledger.locations.items()}

    def transform(file: str, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        name = by_location.get((file, key))
        if name is None:
            return None
        return weakened(tensor, weakening, name, ledger._sites_by_name[name].axis)

    return transform, by_location


def tensor_hashes(
    ledger, at: str | int = "HEAD", *, model_dir: str | Path | None = None, progress: bool = True
) -> dict[str, str]:
    """The body of :meth:`Ledger.tensor_hashes`, which documents it."""
    from safetensors import safe_open

    version = ledger.resolve(at)
    directory = ledger.model_dir(model_dir)
    weights.check_model_dir(ledger, directory, progress)
    transform, _ = export_transform(ledger, version)
    hashes: dict[str, str] = {}
    for path in model_files.weight_files(directory):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = fh.get_tensor(key)
                changed = transform(path.name, key, tensor)
                value = tensor if changed is None else changed
                hashes[key] = hashlib.sha256(model_files.raw_bits(value).numpy().tobytes()).hexdigest()
    return dict(sorted(hashes.items()))


def export(
    ledger: Ledger,
    out_dir: str | Path,
    *,
    at: str | int = "HEAD",
    model_dir: str | Path | None = None,
    progress: bool = True,
    format: str = "safetensors",
) -> int:
    """The body of :meth:`Ledger.export`, which documents it."""
    if format not in EXPORT_FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    entries = ledger.entries()
    version = ledger.resolve(at, entries)
    if format == "peft":
        export_adapter(ledger, out_dir, version, entries, model_dir)
        return version
    directory = ledger.model_dir(model_dir)
    weights.check_model_dir(ledger, directory, progress)
    transform, by_location = export_transform(ledger, version)
    state = ledger.state(version)
    provenance = {
        "ledger_version": version,
        "entry_hash": entries[version - 1].hash,
        "head_hash": entries[-1].hash,
        "active_requests": state.active,
        "tool": "kvw-ledger",
    }
    try:
        export_model(
            directory, out_dir, transform, provenance, progress=progress,
            touches=lambda file, key: (file, key) in by_location,
        )
        return version
    except OSError as e:
        if isinstance(e, KVWLedgerError):
            raise
        # export_model built it in a temporary sibling and removed that: nothing is left
        raise StorageError(
            f"could not write the export to {out_dir} ({e.strerror or e}); nothing was exported"
        ) from e
