"""The retain statistic the accessor compares each batch's C_f with.

The paper compares with C_r, the pooled mean |coefficient| over the whole retain set
(``mean``). A forget batch's C_f is itself a pooled mean over one batch, so it is
noisier than C_r: a neuron that fires evenly on all data still exceeds C_r in about
half of the batches and is weakened a little each time. The calibrated statistics
compare with what retain batches of the same size reach instead: per neuron, the
90th or 99th percentile (``q90``, ``q99``) or the maximum (``max``) of the retain
set's batch means, at the request's batch size.

Batch means are taken over a seeded shuffle of the retain records (a file sorted by
person would otherwise make batches of one person), cut into batches of the given
size; a last, smaller batch is dropped when there is a full one, since its noisier
mean would dominate the maximum.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kvw_ledger import coefficients
from kvw_ledger.data import Example, iter_batches
from kvw_ledger.errors import BadInputError
from kvw_ledger.sites import Site

__all__ = ["QUANTILES", "STATISTICS", "RetainStat", "check_statistic", "measure"]

QUANTILES = {"q90": 0.90, "q99": 0.99}
STATISTICS = ("mean", *QUANTILES, "max")
SHUFFLE_SEED = 0  # the seed of the batch-means shuffle, recorded with the stats


@dataclass
class RetainStat:
    """One measured retain statistic."""

    values: dict[str, torch.Tensor]  # site -> (n_vectors,) float32 on the CPU: what A compares with
    counts: dict[str, int]  # site -> selected tokens seen
    batches: int  # forward passes (batches) it took


def check_statistic(statistic: str) -> str:
    """``statistic`` if it is one of :data:`STATISTICS`, else a BadInputError."""
    if statistic not in STATISTICS:
        raise BadInputError(
            f"--statistic must be one of {', '.join(STATISTICS)}, not {statistic!r}"
        )
    return statistic


def measure(
    model: nn.Module,
    sites: Sequence[Site],
    examples: Sequence[Example],
    statistic: str,
    batch_size: int,
    pad_token_id: int,
    *,
    progress: bool = True,
) -> RetainStat:
    """Measures ``statistic`` per site over ``examples`` on the model as it is.

    ``mean`` is the pooled mean over every selected token (in file order, exactly as
    before the option existed); the others are per-neuron quantiles or the maximum of
    batch means at ``batch_size``.

    Raises:
        BadInputError: an unknown statistic, or too few records for two batches.
        NonFiniteActivationError: NaN or infinite coefficients.
    """
    check_statistic(statistic)
    total = -(-len(examples) // max(batch_size, 1))
    if statistic == "mean":
        batches = iter_batches(examples, batch_size, pad_token_id)
        measured = coefficients.collect(
            model, sites, batches, total=total, desc="retain", progress=progress
        )
        means = measured.means()
        return RetainStat(
            {s.name: means[s.name].cpu() for s in sites},
            {s.name: int(measured.counts[s.name]) for s in sites},
            total,
        )
    order = list(range(len(examples)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    full = len(order) // batch_size
    if full >= 1:
        order = order[: full * batch_size]
    n_batches = -(-len(order) // batch_size)
    if n_batches < 2:
        raise BadInputError(
            f"--statistic {statistic} needs at least two retain batches of {batch_size} records; "
            f"the retain data has {len(examples)} records: use more records or a smaller --batch-size"
        )
    per_batch: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    totals: coefficients.Coefficients | None = None
    device = coefficients.model_device(model)
    batches = iter_batches(examples, batch_size, pad_token_id, order)
    # Everything stays on the device until the loop ends: no host read per batch.
    with coefficients.CoefficientHooks(model, sites) as hooks:
        for batch in tqdm(batches, total=n_batches, desc="retain", disable=not progress, leave=False):
            measured = hooks.measure(batch.to(device))
            for name, mean in measured.means().items():
                per_batch[name].append(mean)
            if totals is None:
                totals = measured
            else:
                totals.add(measured)
    assert totals is not None  # n_batches >= 2
    totals.check_finite("retain")
    counts = {name: int(count) for name, count in totals.counts.items()}
    values = {}
    for name, batch_means in per_batch.items():
        stacked = torch.stack(batch_means).cpu()  # (n_batches, n_vectors)
        if statistic == "max":
            values[name] = stacked.amax(0)  # (n_batches, n_vectors) -> (n_vectors,)
        else:
            # numpy: torch.quantile refuses inputs of more than 2**24 elements.
            q = np.quantile(stacked.numpy(), QUANTILES[statistic], axis=0)
            values[name] = torch.from_numpy(np.asarray(q, dtype=np.float32))
    return RetainStat(values, counts, n_batches)
