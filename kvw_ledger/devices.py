"""Where a model runs and in which dtype: ``--device`` and ``--dtype``, checked.

``auto`` picks the first GPU when torch sees one (else the CPU), and the model's
own dtype (its config's ``dtype``/``torch_dtype``, as ``from_pretrained(dtype="auto")``
reads it). The ledger's base stays in the checkpoint's dtype whatever is chosen
here: a model loaded in another dtype gets ``base * exp(-w)`` computed in float32
and cast once into its own dtype, and exports are rebuilt from the checkpoint's
tensors in their dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvw_ledger.errors import BadInputError

if TYPE_CHECKING:  # torch is imported where it is used: the cli package imports this module's names
    import torch

__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "Placement"]

DEVICE_CHOICES = "auto|cpu|cuda[:N]"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
_CUDA = re.compile(r"cuda(?::([0-9]{1,3}))?")


@dataclass(frozen=True)
class Placement:
    """A checked device and dtype for loading a model; build one with :meth:`resolve`."""

    device: torch.device  # where the model and its coefficient sums live
    dtype: torch.dtype | None  # the model's dtype; None keeps the checkpoint's (auto)

    @classmethod
    def resolve(cls, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
        """Checks ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, bfloat16,
        float16, float32); None means auto.

        Raises:
            BadInputError: an unknown name, CUDA without a GPU, or a GPU index torch
                does not see; the message names the option and what to pass instead.
        """
        return cls(_device(device), _dtype(dtype))

    def describe(self) -> str:
        """``cuda:0, bfloat16`` / ``cpu, checkpoint dtype``: for messages and benchmarks."""
        return f"{self.device}, {'checkpoint dtype' if self.dtype is None else str(self.dtype).removeprefix('torch.')}"


def _device(value: str | torch.device | None) -> torch.device:
    import torch

    text = "auto" if value is None else str(value).strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise BadInputError(f"--device {value!r} is not one of {DEVICE_CHOICES}; pass e.g. --device cpu")
    if not torch.cuda.is_available():
        raise BadInputError(
            f"--device {text}: torch sees no CUDA GPU here (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}); pass --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise BadInputError(
            f"--device {text}: torch sees {count} GPU(s), cuda:0..cuda:{count - 1}; pass one of those "
            "(CUDA_VISIBLE_DEVICES renumbers them)"
        )
    return torch.device("cuda", index)


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    else:
        name = "auto" if value is None else str(value).strip().lower()
    if name == "auto":
        return None
    if name not in DTYPE_CHOICES:
        raise BadInputError(
            f"--dtype {value!r} is not one of {', '.join(DTYPE_CHOICES)}; auto keeps the model's own dtype"
        )
    dtype: torch.dtype = getattr(torch, name)
    return dtype
