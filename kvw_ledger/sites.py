"""Which modules of a model hold its FFN knowledge vectors, found from the model's structure.

A *site* is one FFN value projection. KVW needs two things from it: the module
whose forward input is the coefficient vector (``f(x K^T)``, for gated MLPs
``act(gate_proj(x)) * up_proj(x)``), and the weight whose slices along ``axis``
are the value vectors.

Sites are found the same way in every architecture, from facts rather than names:

1. the towers: the language model is the module that owns the input embeddings;
   a vision tower is any other list of blocks, measured against ``vision_config``;
2. the blocks: the ``nn.ModuleList`` children of a tower (the decoder layers);
3. in each block, outside its attention (a submodule with a ``head_dim`` or
   ``head_size``), every projection whose input has an FFN width of the config
   (``intermediate_size``, ``n_inner``, ``ffn_dim``, ``moe_intermediate_size``,
   ``shared_expert_intermediate_size`` ...) and whose output has the model width
   (``hidden_size`` / ``n_embd``): an ``nn.Linear`` (value vectors on axis 1) or
   GPT-2's ``Conv1D`` (axis 0), and fused MoE experts (3-D parameters of
   transformers' experts interface), one site per routed expert.

:data:`OVERRIDES` holds the few architectures whose structure is ambiguous; an
architecture nothing here recognises can name its modules with ``--site-glob``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from kvw_ledger.errors import BadInputError, UnknownArchitectureError
from kvw_ledger.offload import parameter_data

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


# Config keys that state the width of the residual stream, in the order they are tried.
_MODEL_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
# Qwen2-VL's vision config calls its blocks' width embed_dim; its hidden_size is the
# width the merger projects to, so embed_dim must win where it exists.
_VISION_WIDTH_KEYS = ("embed_dim", "hidden_size")
# Config keys that state an FFN's hidden width (dense, routed-expert and shared-expert).
_FFN_WIDTH_KEYS = (
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "ffn_hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_ffn_dim",
)
# An attention module keeps its per-head width; no FFN module does.
_ATTENTION_MARKS = ("head_dim", "head_size")


@dataclass(frozen=True)
class _Override:
    """A value projection named for an architecture whose structure is ambiguous.

    ``path`` is relative to a block of ``tower``; the override applies only to the
    blocks where structure finds no single projection (see OVERRIDES).
    """

    tower: Tower
    path: str
    axis: int = 1


# model_type -> overrides.  Consulted only where structure is ambiguous: a block in
# which several projections map an FFN width to the model width under one parent
# (which happens when d_ff equals d_model, so gate, up and down all qualify).  Each
# entry says why it exists; every other architecture is found from its structure.
OVERRIDES: dict[str, tuple[_Override, ...]] = {
    # Gated MLPs built with d_ff == d_model (small test and draft configs): gate_proj,
    # up_proj and down_proj are then all [d, d]; the value projection is the one fed
    # by their product, down_proj.  Only the families such configs are made of are
    # listed; any other such model is refused with a --site-glob suggestion.
    "llama": (_Override("language", "mlp.down_proj"),),
    "qwen2": (_Override("language", "mlp.down_proj"),),
    # GPT-2's MLP is c_fc then c_proj, both Conv1D; with n_inner == n_embd both map
    # d to d and only the order of the computation says which is the value side.
    "gpt2": (_Override("language", "mlp.c_proj", axis=0),),
}


def _towers(which: str) -> set[str]:
    if which not in TOWER_CHOICES:
        raise BadInputError(f"--sites must be one of {', '.join(TOWER_CHOICES)}, not {which!r}")
    return {"language", "vision"} if which == "all" else {which}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def _first_int(config: Any, keys: Sequence[str]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class _Widths:
    """What the config says about one tower: its model width and its FFN widths."""

    model: int
    ffn: frozenset[int]


def _widths(config: Any, width_keys: Sequence[str]) -> _Widths | None:
    model = _first_int(config, width_keys)
    if model is None:
        return None
    ffn: set[int] = set()
    for key in _FFN_WIDTH_KEYS:
        value = getattr(config, key, None)
        values = value if isinstance(value, list | tuple) else [value]  # per-layer widths
        ffn.update(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    ratio = getattr(config, "mlp_ratio", None)
    if isinstance(ratio, int | float) and ratio > 0:
        ffn.add(int(model * ratio))  # vision configs that state d_ff as a ratio (Qwen2-VL)
    if not ffn:
        # Configs that leave the width unset get the 4 x d_model default (GPT-2's
        # n_inner=None, BLOOM's MLP), which their modules then build.
        ffn.add(4 * model)
    return _Widths(model, frozenset(ffn))


def _projection_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(input width, output width, value-vector axis) of a 2-D projection, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return int(weight.shape[1]), int(weight.shape[0]), 1  # [out, in]
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: [in, out]
        return int(weight.shape[0]), int(weight.shape[1]), 0
    return None


def _expert_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _is_fused_experts(module: nn.Module) -> bool:
    # transformers' experts interface (use_experts_implementation) marks every fused
    # experts module with these flags, which say how its 3-D weights are laid out.
    return bool(_expert_params(module)) and hasattr(module, "is_transposed") and hasattr(
        module, "has_gate"
    )


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Submodules of a block in registration order, without its attention subtrees."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if any(hasattr(child, mark) for mark in _ATTENTION_MARKS):
            continue
        if isinstance(child, nn.ModuleList):
            # Routed experts kept as separate modules (transformers before fused
            # experts): each runs on its own tokens only, which a pre-hook cannot
            # map back to the batch's positions.
            raise UnknownArchitectureError(
                f"{path} is a list of modules inside a block (routed experts kept as separate "
                "modules?); their inputs hold only the tokens routed to them, which coefficient "
                "collection cannot place. Use a transformers release with fused experts, or name "
                "non-routed projections with --site-glob."
            )
        yield path, child
        if not _is_fused_experts(child):
            yield from _walk(child, path)


def _block_sites(
    block: nn.Module, prefix: str, layer: int, tower: Tower, widths: _Widths
) -> list[Site]:
    sites: list[Site] = []
    for path, module in _walk(block, prefix):
        if _is_fused_experts(module):
            sites.extend(_expert_sites(module, path, layer, tower, widths))
            continue
        shape = _projection_shape(module)
        if shape is None:
            continue
        d_in, d_out, axis = shape
        if d_out == widths.model and d_in in widths.ffn:
            sites.append(Site(path, path, f"{path}.weight", layer, tower, d_in, axis))
    return sites


def _expert_sites(
    module: nn.Module, path: str, layer: int, tower: Tower, widths: _Widths
) -> list[Site]:
    transposed = bool(module.is_transposed)
    found = []
    for pname, param in _expert_params(module).items():
        # Per expert: [d_model, d_ff] (nn.Linear layout), or [d_ff, d_model] transposed.
        d_out, d_in = (param.shape[2], param.shape[1]) if transposed else param.shape[1:]
        if d_out == widths.model and d_in in widths.ffn:
            found.append((pname, param))
    if len(found) != 1:
        shapes = {n: tuple(p.shape) for n, p in _expert_params(module).items()}
        raise UnknownArchitectureError(
            f"fused experts {path} ({type(module).__name__}, weights {shapes}): "
            f"{'several' if found else 'none'} of their 3-D weights map an FFN width "
            f"{sorted(widths.ffn)} to the model width {widths.model}, so the routed experts' "
            "value vectors cannot be told. Name the sites with --site-glob."
        )
    pname, param = found[0]
    n_vectors = int(param.shape[1] if transposed else param.shape[2])
    return [
        Site(
            name=f"{path}.{e}",
            module=path,
            param=f"{path}.{pname}",
            layer=layer,
            tower=tower,
            n_vectors=n_vectors,
            axis=0 if transposed else 1,
            kind="experts",
            expert=e,
        )
        for e in range(int(param.shape[0]))
    ]


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _block_lists(root: nn.Module, prefix: str) -> Iterator[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists under ``root`` (lists inside a list's blocks are not towers)."""
    for name, child in root.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.ModuleList):
            yield path, child
        else:
            yield from _block_lists(child, path)


def _language_root(model: nn.Module) -> str | None:
    """Path of the decoder: the nearest owner of the input embeddings that holds blocks."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Module):
        return None
    path = _module_path(model, embeddings)
    if path is None:
        return None
    # Walk up from the embeddings to the first module that holds a list of blocks
    # (GPT-2: transformer; BERT-style: the embeddings module, then its owner).
    while path:
        path = path.rsplit(".", 1)[0] if "." in path else ""
        if next(_block_lists(model.get_submodule(path) if path else model, path), None):
            return path
    return None


def _tower_sites(
    model: nn.Module,
    lists: Iterable[tuple[str, nn.ModuleList]],
    tower: Tower,
    widths: _Widths,
    overrides: Sequence[_Override],
) -> list[Site]:
    sites: list[Site] = []
    offset = 0  # a tower with several block lists (Mllama's vision) numbers them on
    for path, blocks in lists:
        found_any = False
        for index, block in enumerate(blocks):
            prefix = f"{path}.{index}"
            found = _resolve(model, block, prefix, offset + index, tower, widths, overrides)
            found_any = found_any or bool(found)
            sites.extend(found)
        if found_any:
            offset += len(blocks)
    return sites


def _resolve(
    model: nn.Module,
    block: nn.Module,
    prefix: str,
    layer: int,
    tower: Tower,
    widths: _Widths,
    overrides: Sequence[_Override],
) -> list[Site]:
    found = _block_sites(block, prefix, layer, tower, widths)
    parents = [s.module.rsplit(".", 1)[0] for s in found if s.kind == "linear"]
    if len(parents) == len(set(parents)):
        return found
    # Several candidates under one parent: structure cannot tell the value side.
    modules = dict(model.named_modules())
    for override in overrides:
        if override.tower != tower:
            continue
        path = f"{prefix}.{override.path}"
        module = modules.get(path)
        shape = _projection_shape(module) if module is not None else None
        if shape is not None and shape[2] == override.axis:
            chosen = Site(path, path, f"{path}.weight", layer, tower, shape[0], shape[2])
            parent = path.rsplit(".", 1)[0]
            return [chosen, *(s for s in found if s.module.rsplit(".", 1)[0] != parent)]
    names = ", ".join(s.module for s in found)
    raise UnknownArchitectureError(
        f"block {prefix} has several projections from an FFN width to the model width ({names}) "
        "and its structure does not say which holds the value vectors. Name them with "
        "--site-glob, e.g. --site-glob '" + re.sub(r"\.\d+\.", ".*.", found[-1].module, count=1) + "'"
    )


def discover_sites(
    model: nn.Module, towers: str = "language", site_glob: str | None = None
) -> list[Site]:
    """Lists the FFN value projections of ``model``, found from its structure.

    Sites come vision tower first, then by layer and name (the order ledgers store).

    Args:
        model: a loaded transformers model.
        towers: ``language``, ``vision`` or ``all``.
        site_glob: fnmatch pattern over module paths that replaces discovery, for
            architectures it does not recognise (the layer is the first number in the path).

    Raises:
        UnknownArchitectureError: nothing was found; the message explains ``--site-glob``.
    """
    wanted = _towers(towers)
    config: Any = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if site_glob is not None:
        return _glob_sites(model, site_glob, _widths(text, _MODEL_WIDTH_KEYS))
    overrides = OVERRIDES.get(_model_type(model), ())
    root = _language_root(model)
    sites: list[Site] = []
    looked: list[str] = []
    if "language" in wanted and root is not None and config is not None:
        widths = _widths(text, _MODEL_WIDTH_KEYS)
        decoder = model.get_submodule(root) if root else model
        lists = list(_block_lists(decoder, root))
        if widths is not None:
            looked.append(
                f"language blocks {[p for p, _ in lists]} for width {widths.model} "
                f"from FFN widths {sorted(widths.ffn)}"
            )
            sites += _tower_sites(model, lists, "language", widths, overrides)
    vision_config = getattr(config, "vision_config", None)
    if "vision" in wanted and vision_config is not None:
        widths = _widths(vision_config, _VISION_WIDTH_KEYS)
        lists = [
            (p, blocks)
            for p, blocks in _block_lists(model, "")
            if root is None or not (p == root or p.startswith(f"{root}."))
        ]
        if widths is not None:
            looked.append(
                f"vision blocks {[p for p, _ in lists]} for width {widths.model} "
                f"from FFN widths {sorted(widths.ffn)}"
            )
            sites += _tower_sites(model, lists, "vision", widths, overrides)
    if not sites:
        raise UnknownArchitectureError(
            f"found no FFN value projections for towers {sorted(wanted)} in a "
            f"{type(model).__name__} (model_type {_model_type(model)!r}); looked in "
            f"{'; '.join(looked) or 'nothing: no input embeddings or vision_config to start from'}. "
            "Name the modules yourself with --site-glob, e.g. "
            "--site-glob 'model.layers.*.mlp.down_proj'."
        )
    return sorted(sites, key=lambda s: (s.tower != "vision", s.layer, s.name))


def _glob_sites(model: nn.Module, pattern: str, widths: _Widths | None) -> list[Site]:
    modules = dict(model.named_modules())
    sites: list[Site] = []
    for name, module in modules.items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        number = re.search(r"\.(\d+)(?:\.|$)", name)
        if number is None:
            raise BadInputError(
                f"--site-glob matched {name}, which has no layer number in its path"
            )
        sites.extend(_glob_site(name, module, int(number.group(1)), widths))
    if not sites:
        raise UnknownArchitectureError(
            f"--site-glob {pattern!r} matched no module; module paths look like "
            f"{', '.join(list(modules)[1:4])}"
        )
    return sorted(sites, key=lambda s: (s.layer, s.name))


def _glob_site(name: str, module: nn.Module, layer: int, widths: _Widths | None) -> list[Site]:
    if _is_fused_experts(module):
        if widths is None:
            raise UnknownArchitectureError(
                f"module {name} holds fused experts, but the model config states no width to "
                "tell their down projection by"
            )
        return _expert_sites(module, name, layer, "language", widths)
    shape = _projection_shape(module)
    if shape is None:
        raise UnknownArchitectureError(
            f"module {name} ({type(module).__name__}) has no 2-D weight; it cannot be an FFN "
            "value projection. Name another module with --site-glob."
        )
    d_in, _, axis = shape
    return [Site(name, name, f"{name}.weight", layer, "language", d_in, axis)]


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
    """The live weight (a view) whose slices along ``site.axis`` are the value vectors.

    For a layer accelerate offloaded (its parameters on ``meta``), the tensor its
    hook loads them from (see :mod:`kvw_ledger.offload`).
    """
    data = parameter_data(model, site.param)
    return data[site.expert] if site.expert is not None else data
