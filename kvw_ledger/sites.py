"""The architecture table: which modules of a model hold its FFN knowledge vectors.

A *site* is one FFN value projection. KVW needs two things from it: the module
whose forward input is the coefficient vector (``f(x K^T)``, for gated MLPs
``act(gate_proj(x)) * up_proj(x)``), and the weight whose slices along ``axis``
are the value vectors. ``ARCHITECTURES`` maps each supported ``model_type`` to
explicit rules; nothing here guesses from name suffixes. An architecture the
table does not know can name its modules with a glob instead.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from kvw_ledger.errors import BadInputError, UnknownArchitectureError

Tower = Literal["language", "vision"]
Kind = Literal["linear", "experts"]
TOWER_CHOICES = ("language", "vision", "all")


@dataclass(frozen=True)
class Site:
    """One FFN value projection of a model.

    Attributes:
        name: unique id; the module path, plus ``.<expert>`` for one MoE expert.
        module: path of the module whose forward input holds the coefficients.
        param: path of the parameter holding the value vectors.
        layer: block index inside its tower.
        tower: ``language`` or ``vision``.
        n_vectors: number of value vectors (d_ff).
        axis: axis of the (expert-sliced) weight that indexes value vectors:
            1 for ``nn.Linear`` ([d_model, d_ff]), 0 for GPT-2's ``Conv1D``.
        kind: ``linear`` (pre-hook on ``module``) or ``experts`` (fused MoE experts,
            whose per-expert down-projection input is recomputed in the hook).
        expert: expert index for ``experts`` sites, else None.
    """

    name: str
    module: str
    param: str
    layer: int
    tower: Tower
    n_vectors: int
    axis: int
    kind: Kind = "linear"
    expert: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the ledger's root attributes."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class _Rule:
    tower: Tower
    pattern: str  # regex over module paths; group "layer" is the block index
    axis: int  # value-vector axis of the weight (see Site.axis)
    kind: Kind = "linear"


def _language(pattern: str, axis: int = 1, kind: Kind = "linear") -> _Rule:
    return _Rule("language", pattern, axis, kind)


def _vision(pattern: str) -> _Rule:
    return _Rule("vision", pattern, 1)


_DECODER = _language(r"model\.layers\.(?P<layer>\d+)\.mlp\.down_proj")
_VLM_LANGUAGE = _language(r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.down_proj")

# model_type -> rules.  Keep one line per architecture: this table is the single
# place that knows module names.
ARCHITECTURES: dict[str, tuple[_Rule, ...]] = {
    "llama": (_DECODER,),
    "mistral": (_DECODER,),
    "qwen2": (_DECODER,),
    "qwen3": (_DECODER,),
    "gemma": (_DECODER,),
    "gemma2": (_DECODER,),
    "phi3": (_DECODER,),
    "phi": (_language(r"model\.layers\.(?P<layer>\d+)\.mlp\.fc2"),),
    "gpt2": (_language(r"transformer\.h\.(?P<layer>\d+)\.mlp\.c_proj", axis=0),),
    "gpt_neox": (_language(r"gpt_neox\.layers\.(?P<layer>\d+)\.mlp\.dense_4h_to_h"),),
    "opt": (_language(r"model\.decoder\.layers\.(?P<layer>\d+)\.fc2"),),
    "mixtral": (_language(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts", kind="experts"),),
    "llava": (
        _VLM_LANGUAGE,
        _vision(
            r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(?P<layer>\d+)\.mlp\.fc2"
        ),
    ),
    "qwen2_vl": (_VLM_LANGUAGE, _vision(r"model\.visual\.blocks\.(?P<layer>\d+)\.mlp\.fc2")),
    "qwen2_5_vl": (
        _VLM_LANGUAGE,
        _vision(r"model\.visual\.blocks\.(?P<layer>\d+)\.mlp\.down_proj"),
    ),
}


def _towers(which: str) -> set[str]:
    if which not in TOWER_CHOICES:
        raise BadInputError(f"--sites must be one of {', '.join(TOWER_CHOICES)}, not {which!r}")
    return {"language", "vision"} if which == "all" else {which}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def _value_weight_shape(module: nn.Module, axis: int, name: str) -> tuple[int, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnknownArchitectureError(
            f"module {name} ({type(module).__name__}) has no 2-D weight; it cannot be an FFN "
            "value projection. Name another module with --site-glob."
        )
    # nn.Linear stores [out, in] and Conv1D [in, out]: the value-vector axis must be the
    # input side, which is what the table's axis says.  Catch a table/model mismatch here.
    expected_axis = 0 if type(module).__name__ == "Conv1D" else 1
    if axis != expected_axis:
        raise UnknownArchitectureError(
            f"module {name} is a {type(module).__name__}; its value vectors lie on axis "
            f"{expected_axis}, not {axis}"
        )
    return (int(weight.shape[0]), int(weight.shape[1]))


def _sites_for_module(rule: _Rule, name: str, module: nn.Module, layer: int) -> list[Site]:
    if rule.kind == "experts":
        down = getattr(module, "down_proj", None)
        if not isinstance(down, torch.Tensor) or down.dim() != 3:
            raise UnknownArchitectureError(
                f"module {name} ({type(module).__name__}) has no fused [experts, d_model, d_ff] "
                "down_proj parameter"
            )
        return [
            Site(
                name=f"{name}.{e}",
                module=name,
                param=f"{name}.down_proj",
                layer=layer,
                tower=rule.tower,
                n_vectors=int(down.shape[2]),
                axis=1,
                kind="experts",
                expert=e,
            )
            for e in range(int(down.shape[0]))
        ]
    shape = _value_weight_shape(module, rule.axis, name)
    return [
        Site(
            name=name,
            module=name,
            param=f"{name}.weight",
            layer=layer,
            tower=rule.tower,
            n_vectors=shape[rule.axis],
            axis=rule.axis,
        )
    ]


def discover_sites(
    model: nn.Module, towers: str = "language", site_glob: str | None = None
) -> list[Site]:
    """Lists the FFN value projections of ``model``, in forward order.

    Args:
        model: a loaded transformers model.
        towers: ``language``, ``vision`` or ``all``.
        site_glob: fnmatch pattern over module paths that overrides the table, for
            architectures it does not know (the layer is the first number in the path).

    Raises:
        UnknownArchitectureError: nothing matched; the message lists the patterns tried.
    """
    wanted = _towers(towers)
    modules = dict(model.named_modules())
    if site_glob is not None:
        return _glob_sites(modules, site_glob)
    model_type = _model_type(model)
    rules = [r for r in ARCHITECTURES.get(model_type, ()) if r.tower in wanted]
    sites: list[Site] = []
    for rule in rules:
        regex = re.compile(rule.pattern)
        for name, module in modules.items():
            match = regex.fullmatch(name)
            if match:
                sites.extend(_sites_for_module(rule, name, module, int(match.group("layer"))))
    if not sites:
        tried = [r.pattern for r in ARCHITECTURES.get(model_type, ())]
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitectureError(
            f"found no FFN value projections for towers {sorted(wanted)} in a {type(model).__name__} "
            f"(model_type {model_type!r}); looked for: {tried or 'nothing, the type is not in the table'}. "
            f"Known model types: {known}. Name the modules yourself with "
            "--site-glob, e.g. --site-glob 'model.layers.*.mlp.down_proj'."
        )
    return sorted(sites, key=lambda s: (s.tower != "vision", s.layer, s.name))


def _glob_sites(modules: dict[str, nn.Module], pattern: str) -> list[Site]:
    sites: list[Site] = []
    for name, module in modules.items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        number = re.search(r"\.(\d+)(?:\.|$)", name)
        if number is None:
            raise BadInputError(
                f"--site-glob matched {name}, which has no layer number in its path"
            )
        axis = 0 if type(module).__name__ == "Conv1D" else 1
        sites.extend(
            _sites_for_module(_language(pattern, axis), name, module, int(number.group(1)))
        )
    if not sites:
        raise UnknownArchitectureError(
            f"--site-glob {pattern!r} matched no module; module paths look like "
            f"{', '.join(list(modules)[1:4])}"
        )
    return sorted(sites, key=lambda s: (s.layer, s.name))


def parse_layers(text: str) -> tuple[int, int]:
    """Parses an inclusive ``START:END`` layer range (``--layers 1:25``)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise BadInputError(
            f"--layers must look like START:END (inclusive), e.g. 1:25; got {text!r}"
        )
    start, end = int(match.group(1)), int(match.group(2))
    if start > end:
        raise BadInputError(f"--layers {text}: START must not exceed END")
    return start, end


def select_layers(sites: Sequence[Site], layers: tuple[int, int]) -> list[Site]:
    """Sites whose layer lies in the inclusive range, clipped to each tower's depth.

    Raises:
        BadInputError: the range selects nothing (it lies outside the model).
    """
    start, end = layers
    chosen = [s for s in sites if start <= s.layer <= end]
    if not chosen:
        depth = max((s.layer for s in sites), default=-1) + 1
        raise BadInputError(
            f"--layers {start}:{end} selects no layer; this model's FFN layers are 0:{depth - 1}"
        )
    return chosen


def site_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """The live weight (a view) whose slices along ``site.axis`` are the value vectors."""
    param = model.get_parameter(site.param)
    return param.data[site.expert] if site.expert is not None else param.data


def sites_to_json(sites: Iterable[Site]) -> list[dict[str, Any]]:
    """JSON-ready list of sites."""
    return [s.to_dict() for s in sites]
