"""The real tensor behind a parameter that accelerate offloaded.

A model dispatched by accelerate (``from_pretrained(device_map=...)``, or
``dispatch_model``) keeps an offloaded layer's parameters on the ``meta`` device;
an ``AlignDevicesHook`` loads them from its ``weights_map`` before each forward and
drops them after. Reading or writing ``param.data`` there reads nothing and writes
nowhere, so KVW reads and writes the tensor in the weights map instead, which the
hook copies in at the next forward:

- a map of CPU tensors (layers offloaded to the CPU): that tensor, written in place;
- accelerate's ``OffloadedWeightsLoader`` (layers offloaded to disk): the weight is
  copied once into a file of its own in the loader's folder, memory-mapped, and put in
  the loader's ``state_dict``, which takes priority over the disk index. So the
  weights stay on disk (in the page cache while used), and every later write lands
  in that file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kvw_ledger.errors import BadInputError

__all__ = ["parameter_data"]


def parameter_data(model: nn.Module, path: str) -> torch.Tensor:
    """The tensor holding parameter ``path``'s values, writable in place.

    A parameter on its device is its ``.data``; an offloaded one (on ``meta``) is
    the tensor its accelerate hook loads it from.

    Raises:
        BadInputError: the parameter is on ``meta`` and no offload hook holds its values.
    """
    module_path, _, name = path.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    param = getattr(module, name)
    if param.device.type != "meta":
        return param.data
    weights = _weights_map(module)
    if weights is None:
        raise BadInputError(
            f"the parameter {path} is on the meta device and no accelerate offload hook holds its "
            "weights; load the model fully, or with --device-map so that accelerate keeps them"
        )
    return _writable(weights, name, path)


def _weights_map(module: nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The weights map of the offloading hook on ``module`` (hooks may be chained)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h.weights_map  # type: ignore[no-any-return]
    return None


def _writable(weights: Mapping[str, torch.Tensor], name: str, path: str) -> torch.Tensor:
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    dataset: Any = weights
    key = name
    if isinstance(weights, PrefixedDataset):
        dataset, key = weights.dataset, weights.prefix + name
    if isinstance(dataset, OffloadedWeightsLoader):
        if key not in dataset.state_dict:
            dataset.state_dict[key] = _on_disk(dataset[key], dataset.save_folder, key)
        return dataset.state_dict[key]  # type: ignore[no-any-return]
    if isinstance(dataset, dict) and isinstance(dataset.get(key), torch.Tensor):
        return dataset[key]
    raise BadInputError(
        f"the offloaded parameter {path} is kept in a {type(dataset).__name__}, which kvw-ledger "
        "cannot write; load the model with --device-map auto"
    )


def _on_disk(value: torch.Tensor, folder: str | None, key: str) -> torch.Tensor:
    """``value`` copied into a memory-mapped file of its own in ``folder`` (in memory without one)."""
    if folder is None:
        return value.detach().clone()
    raw = value.detach().cpu().contiguous().view(torch.uint8)  # any dtype, bfloat16 too, as bytes
    mapped = np.memmap(Path(folder) / f"kvw.{key}.dat", dtype=np.uint8, mode="w+", shape=tuple(raw.shape))
    mapped[:] = raw.numpy()
    return torch.from_numpy(mapped).view(value.dtype)  # shares the file's pages; writes land there
