"""Tests for kvw_ledger.weakening: the sum is the one the ledger always made, bit for bit."""

from __future__ import annotations

import tiny
import torch

from kvw_ledger.sites import Site
from kvw_ledger.weakening import Weakening


def _sites() -> list[Site]:
    return [
        Site(f"model.layers.{i}.mlp.down_proj", f"model.layers.{i}.mlp.down_proj",
             f"model.layers.{i}.mlp.down_proj.weight", i, "language", 7 + i, 1)
        for i in range(3)
    ]


def test_total_equals_an_in_place_sum_in_chain_order() -> None:
    sites = _sites()
    torch.manual_seed(0)
    parts = []
    for k in range(6):
        exps = {s.name: torch.rand(s.n_vectors) * 10 ** (k - 3) for s in sites if (k + s.layer) % 3}
        scales = {sites[0].name: torch.tensor(0.1 * k)} if k % 2 else {}
        parts.append(Weakening(exps, scales))
    total = Weakening.total(sites, parts)
    for s in sites:  # what Ledger._sum_exponents and _sum_log_scales did before the value type
        want = torch.zeros(s.n_vectors, dtype=torch.float32)
        for p in parts:
            if s.name in p.exponents:
                want += p.exponents[s.name]
        assert tiny.same_bits(total.exponents[s.name], want)
    scale = torch.zeros((), dtype=torch.float32)
    for p in parts:
        if sites[0].name in p.log_scales:
            scale = scale + p.log_scales[sites[0].name].reshape(())
    assert set(total.log_scales) == {sites[0].name} and tiny.same_bits(total.log_scales[sites[0].name], scale)
    assert total.log_scale(sites[1].name) is None
    # Order matters in float32: the other order is generally other bits, which is why
    # the ledger sums in chain order.
    reversed_total = Weakening.total(sites, reversed(parts))
    assert any(not torch.equal(reversed_total.exponents[s.name], total.exponents[s.name]) for s in sites)


def test_zero_and_addition_leave_their_operands_alone() -> None:
    sites = _sites()
    zero = Weakening.zero(sites)
    assert zero.is_zero() and set(zero.exponents) == {s.name for s in sites}
    assert all(v.dtype == torch.float32 and v.shape == (s.n_vectors,) for s, v in zip(sites, zero.exponents.values(), strict=True))
    part = Weakening({sites[1].name: torch.ones(sites[1].n_vectors)}, {sites[1].name: torch.tensor([0.5])})
    total = zero + part
    assert not total.is_zero() and zero.is_zero() and float(part.log_scales[sites[1].name]) == 0.5
    assert total.log_scales[sites[1].name].shape == ()  # a scalar, however the array was stored
    assert torch.equal(total.exponents[sites[1].name], torch.ones(sites[1].n_vectors))
    assert not Weakening({}, {sites[0].name: torch.tensor(0.0)}).is_zero()  # a scale alone is a change
