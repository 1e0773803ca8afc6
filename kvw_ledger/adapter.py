"""A version as a peft IA3 adapter on the FFN value projections.

peft's IA3 gives a "feedforward" module a learned vector that scales the
module's *input*: ``y = W (l * x)``, and ``merge_and_unload()`` folds it into the
weight as ``W * l`` column by column. A site's input coordinates are exactly its
value vectors (columns of ``down_proj.weight``; rows of GPT-2's ``Conv1D``, which
peft handles with ``fan_in_fan_out``), so a version, ``base * exp(S - W)`` per
vector, is the IA3 vector ``l = exp(S - W)`` on the unchanged base. A serving
stack keeps one base model and switches versions by swapping these small files.

This module knows sites, not ledgers: the caller passes each site's factor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvw_ledger._fs import fsync_dir, fsync_file
from kvw_ledger.errors import BadInputError, LedgerExistsError
from kvw_ledger.export import PROVENANCE_FILE, PROVENANCE_KEY, check_out_dir
from kvw_ledger.sites import Site

__all__ = ["adapter_key", "check_ia3_sites", "write_ia3_adapter"]


def adapter_key(site: Site) -> str:
    """The key peft saves and loads a site's IA3 vector under."""
    return f"base_model.model.{site.module}.ia3_l"


def check_ia3_sites(sites: Sequence[Site]) -> bool:
    """Whether IA3 can express every site; returns ``fan_in_fan_out`` for peft.

    Raises:
        BadInputError: a fused MoE expert site (IA3 scales a whole module's input,
            and one fused module holds every expert), or a model mixing ``Linear``
            and ``Conv1D`` sites (peft's config has one ``fan_in_fan_out``); names
            the site.
    """
    for site in sites:
        if site.kind != "linear":
            raise BadInputError(
                f"site {site.name} is one expert of the fused MoE module {site.module}: an IA3 "
                "vector scales the input of a whole module, so it cannot weaken one expert's value "
                "vectors; export this ledger with --format safetensors"
            )
    axes = {s.axis for s in sites}
    if len(axes) > 1:
        conv = next(s for s in sites if s.axis == 0)
        raise BadInputError(
            f"site {conv.name} is a Conv1D while other sites are Linear; one peft IA3 config "
            "cannot hold both (fan_in_fan_out); export with --format safetensors"
        )
    return axes == {0}


def write_ia3_adapter(
    out_dir: str | Path,
    sites: Sequence[Site],
    factors: Mapping[str, torch.Tensor],
    base_model: str,
    provenance: Mapping[str, Any],
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` for peft.

    Args:
        out_dir: where to write; must not exist or be an empty directory.
        sites: every site of the ledger (unweakened ones get a vector of ones).
        factors: site name -> its per-vector factor ``exp(S - W)``, float32 [n_vectors].
        base_model: recorded as ``base_model_name_or_path``.
        provenance: JSON record of the version, also written as ``kvw_provenance.json``
            and into the safetensors metadata.

    Returns:
        ``out_dir`` as a Path. Built in a temporary sibling and renamed into place.

    Raises:
        BadInputError: a site IA3 cannot express (see :func:`check_ia3_sites`).
        LedgerExistsError: ``out_dir`` exists and is not empty.
    """
    from peft import IA3Config
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    fan_in_fan_out = check_ia3_sites(sites)
    out = Path(out_dir)
    check_out_dir(out)
    modules = [s.module for s in sites]
    config = IA3Config(
        target_modules=modules,
        feedforward_modules=modules,
        fan_in_fan_out=fan_in_fan_out,
        init_ia3_weights=True,
        inference_mode=True,
        base_model_name_or_path=base_model,
    )
    # peft's feedforward vectors are (1, in_features), for Linear and Conv1D alike.
    tensors = {
        adapter_key(s): factors[s.name].to(torch.float32).reshape(1, s.n_vectors).contiguous()
        for s in sites
    }
    provenance_json = json.dumps(provenance, sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / SAFETENSORS_WEIGHTS_NAME),
                  metadata={"format": "pt", PROVENANCE_KEY: provenance_json})  # fmt: skip
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, sort_keys=True, indent=2) + "\n")
        for p in tmp.iterdir():
            with p.open("rb") as f:
                fsync_file(f)
            p.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)  # replaces an empty directory, never a non-empty one
        except OSError as e:
            raise LedgerExistsError(f"{out} appeared during the export; export never overwrites") from e
        fsync_dir(out.parent, best_effort=True)  # as export's: outside the ledger
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
