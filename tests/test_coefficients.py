"""Coefficients of fused MoE experts against an independent capture of the eager forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import tiny
import torch
from torch import nn

from kvw_ledger.coefficients import CoefficientHooks
from kvw_ledger.data import Encoder, collate, read_records
from kvw_ledger.sites import discover_sites


@contextmanager
def captured_down_inputs(model: nn.Module) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Records what each expert's down projection receives in the eager experts loop.

    The loop calls ``F.linear(x, down_proj[e])``; a call is matched to its expert by
    the weight's storage, so nothing here knows how our hook computes its input.
    """
    downs = {
        (name, e): module.down_proj[e].data_ptr()
        for name, module in model.named_modules()
        if hasattr(module, "down_proj") and isinstance(module.down_proj, nn.Parameter)
        for e in range(module.down_proj.shape[0])
    }
    by_ptr = {ptr: key for key, ptr in downs.items()}
    seen: dict[tuple[str, int], torch.Tensor] = {}
    original = nn.functional.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = by_ptr.get(weight.data_ptr())
        if key is not None and weight.dim() == 2:
            seen[key] = x.detach().clone()
        return original(x, weight, *args, **kwargs)

    nn.functional.linear = linear  # type: ignore[assignment]
    try:
        yield seen
    finally:
        nn.functional.linear = original


def _routes(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Each MoE block's top-k expert ids per token, from its router's output."""
    routes: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(".mlp") and hasattr(module, "experts"):

            def keep(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
                routes[f"{name}.experts"] = out[2]  # (logits, weights, indices)

            handles.append(module.gate.register_forward_hook(keep))
    return routes, handles


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_routed_expert_counts_only_the_tokens_routed_to_it(name: str, tmp_path) -> None:
    model = tiny.TEXT_ARCHITECTURES[name]()
    model.config._experts_implementation = "eager"
    path = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.qa_records(3))
    encoder = Encoder(tiny.char_tokenizer())
    batch = collate([encoder.encode(r) for r in read_records(path)], encoder.pad_token_id)
    sites = discover_sites(model)

    with CoefficientHooks(model, sites, stop_early=False) as hooks:
        ours = hooks.measure(batch)

    routes, handles = _routes(model)
    try:
        with captured_down_inputs(model) as seen, torch.no_grad():
            model(**batch.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    selected = set(batch.positions.tolist())
    checked = 0
    for site in (s for s in sites if s.kind == "experts"):
        index = routes[site.module]  # (B*T, top_k)
        # The eager loop visits (slot, token) pairs slot by slot, tokens in order.
        rows = [t for k in range(index.shape[1]) for t in range(index.shape[0]) if index[t, k] == site.expert]
        expected = torch.zeros(site.n_vectors)
        if rows:
            inputs = seen[(site.module, site.expert)]
            assert inputs.shape[0] == len(rows)
            keep = torch.tensor([t in selected for t in rows])
            expected = inputs[keep].float().abs().sum(0)
        count = sum(1 for t in selected if bool((index[t] == site.expert).any()))
        assert int(ours.counts[site.name]) == count, site.name
        torch.testing.assert_close(ours.sums[site.name], expected, rtol=1e-5, atol=1e-6)
        checked += count
    assert checked > 0, "no selected token reached any expert: the comparison would be vacuous"
    if name == "qwen2_moe":  # the shared expert sees every selected token
        shared = next(s for s in sites if s.kind == "linear")
        assert int(ours.counts[shared.name]) == len(selected)
