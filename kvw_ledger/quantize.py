"""Weight-only quantization of a model copy, to see whether forgotten knowledge resurfaces.

Zhang et al. (ICLR 2025) found that 4-bit quantization brings back much of what
utility-constrained unlearning hid: small weight changes vanish when weights are
rounded onto a coarse grid. This module rounds a model's weights as a quantized
deployment would, then dequantizes them, so the usual evaluation measures exactly
what the quantized model computes.

Schemes (every linear weight except the output head, groups of ``group_size``
consecutive weights along the input dimension):

- ``int8``: symmetric round-to-nearest per group onto [-128, 127];
- ``int4``: asymmetric round-to-nearest per group onto [0, 15] with a zero point;
- ``nf4``: 4-bit NormalFloat (QLoRA) per group, with double-quantized scales.

The rounding is torchao's (PyTorch's quantization library): its affine
quantize/dequantize primitives and its NF4 tensor run on the CPU in plain torch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kvw_ledger.errors import BadInputError

__all__ = ["SCHEMES", "library", "parse_schemes", "quantized_copy"]

SCHEMES = ("int8", "int4", "nf4")
_BY_BITS = {"8": ("int8",), "4": ("int4", "nf4")}
_NF4_SCALER_BLOCK = 256  # torchao's default block of double-quantized scales


def parse_schemes(text: str) -> tuple[str, ...]:
    """``8,4`` (bit widths: 4 means int4 and nf4) or scheme names -> schemes, in order given;
    ``none`` -> no scheme.

    Raises:
        BadInputError: an item is neither 8, 4 nor a scheme name.
    """
    schemes: list[str] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item or item == "none":
            continue
        found = _BY_BITS.get(item) or ((item,) if item in SCHEMES else None)
        if found is None:
            raise BadInputError(
                f"--quantize takes bit widths 8 and 4 or schemes {', '.join(SCHEMES)}, not {item!r}"
            )
        schemes += [s for s in found if s not in schemes]
    return tuple(schemes)


def library() -> str:
    """The quantization library and its version, as audits record it."""
    try:
        return f"torchao {metadata.version('torchao')}"
    except metadata.PackageNotFoundError as e:
        raise BadInputError(
            "quantized audits need torchao; install it with `pip install torchao --no-deps`"
        ) from e


def quantized_copy(model: nn.Module, scheme: str, group_size: int = 64) -> nn.Module:
    """A deep copy of ``model`` whose linear weights went through ``scheme`` and back.

    The output head is kept as it is, as weight-only quantization of LLMs does.
    A dimension that ``group_size`` does not divide uses its largest divisor below it.

    Raises:
        BadInputError: ``scheme`` is unknown or ``group_size`` < 2.
    """
    if scheme not in SCHEMES:
        raise BadInputError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if group_size < 2:
        raise BadInputError(f"--group-size must be at least 2, not {group_size}")
    primitives = _torchao()
    copied = copy.deepcopy(model)
    head = _output_weight(copied)
    with torch.no_grad():
        for module in copied.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight is head:
                continue
            if isinstance(module, nn.Linear):
                weight.copy_(_round_trip(weight, scheme, group_size, primitives))
            elif type(module).__name__ == "Conv1D":  # GPT-2 keeps [in, out]: group along in
                weight.copy_(_round_trip(weight.t(), scheme, group_size, primitives).t())
    return copied


def _output_weight(model: nn.Module) -> torch.Tensor | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return getattr(head, "weight", None)


def _group(width: int, wanted: int) -> int:
    group = min(wanted, width)
    while width % group:
        group -= 1
    return group


def _round_trip(weight: torch.Tensor, scheme: str, group_size: int, p: Any) -> torch.Tensor:
    """``weight`` [out, in] quantized per group along ``in`` and dequantized, in its dtype."""
    w = weight.detach().to(torch.float32).contiguous()
    group = _group(w.shape[1], group_size)
    if scheme == "nf4":
        n_scales = w.numel() // group
        nf4 = p.to_nf4(w, group, _group(n_scales, _NF4_SCALER_BLOCK))
        return nf4.get_original_weight().to(weight.dtype)
    block = (1, group)
    if scheme == "int8":
        mapping, qmin, qmax, target = p.MappingType.SYMMETRIC, -128, 127, torch.int8
    else:
        mapping, qmin, qmax, target = p.MappingType.ASYMMETRIC, 0, 15, torch.uint8
    scale, zero = p.choose_qparams_affine(w, mapping, block, target, quant_min=qmin, quant_max=qmax)
    q = p.quantize_affine(w, block, scale, zero, target, qmin, qmax)
    out = p.dequantize_affine(q, block, scale, zero, target, qmin, qmax, output_dtype=torch.float32)
    return out.to(weight.dtype)


def _torchao() -> Any:
    """torchao's primitives, imported quietly: it logs every CUDA kernel a CPU build lacks."""
    library()
    with _quiet("torchao", "torch.utils._pytree"):
        from torchao.quantization import to_nf4
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            dequantize_affine,
            quantize_affine,
        )

    return SimpleNamespace(
        to_nf4=to_nf4,
        MappingType=MappingType,
        choose_qparams_affine=choose_qparams_affine,
        quantize_affine=quantize_affine,
        dequantize_affine=dequantize_affine,
    )


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
