"""One value for what a set of requests does to the sites: exponents and log-scales.

A site's value matrix at a version is ``base * exp(S - W)``: ``W`` the summed
exponents of the active requests (one per value vector) and ``S`` the summed
log-scales of those made with ``rescale`` (a scalar, present only where such a
request weakened the site; elsewhere the factor is ``exp(-W)``). The two always
travel together, so they are one value with its arithmetic. ``+`` adds in the
order written: chain order in, the same float32 bits out as every earlier sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvw_ledger.sites import Site

__all__ = ["Weakening"]


@dataclass(frozen=True)
class Weakening:
    """Per-site exponents (float32, ``(n_vectors,)``) and log-scales (float32 scalars).

    A request's own value names only the sites in its layers; a sum starts from
    :meth:`zero`, which names every site with zero exponents and no log-scale.
    """

    exponents: Mapping[str, torch.Tensor] = field(default_factory=dict)
    log_scales: Mapping[str, torch.Tensor] = field(default_factory=dict)  # rescaled sites only

    @classmethod
    def zero(cls, sites: Sequence[Site]) -> Weakening:
        """Nothing weakened: every site's exponents zero, no log-scale."""
        return cls({s.name: torch.zeros(s.n_vectors, dtype=torch.float32) for s in sites}, {})

    @classmethod
    def total(cls, sites: Sequence[Site], parts: Iterable[Weakening]) -> Weakening:
        """``zero(sites) + parts[0] + parts[1] + ...``, in the order given."""
        out = cls.zero(sites)
        for part in parts:
            out = out + part
        return out

    def __add__(self, other: Weakening) -> Weakening:
        exponents = dict(self.exponents)
        for site, value in other.exponents.items():
            exponents[site] = exponents[site] + value if site in exponents else value
        scales = dict(self.log_scales)
        for site, value in other.log_scales.items():
            # Each log-scale sum starts from a float32 zero, as replay has always summed them.
            scales[site] = scales.get(site, torch.zeros((), dtype=torch.float32)) + value.reshape(())
        return Weakening(exponents, scales)

    def log_scale(self, site: str) -> torch.Tensor | None:
        """The summed log-scale of ``site``; None where no rescaled request weakened it."""
        return self.log_scales.get(site)

    def is_zero(self) -> bool:
        """Whether the sites hold the base (no exponent set, no log-scale)."""
        return not self.log_scales and not any(bool(w.any()) for w in self.exponents.values())
