"""Relearning: a few fine-tuning steps on related facts, to see whether forgetting holds.

Deeb and Roger showed that fine-tuning an "unlearned" model on some of the
forgotten facts brings back others it was never shown again: the knowledge was
hidden, not removed. :func:`relearn` fine-tunes a model (AdamW, answer-only loss,
the same encoding as every other verb); :func:`held_out` picks the probe records
that the fine-tuning data does not cover, so what comes back was never retaught.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from kvw_ledger import data
from kvw_ledger.coefficients import model_device
from kvw_ledger.errors import BadInputError
from kvw_ledger.evaluate import normalize
from kvw_ledger.loading import max_length

__all__ = ["held_out", "relearn"]


_R = TypeVar("_R", data.Record, Mapping[str, Any])


def held_out(probe: Sequence[_R], taught: Sequence[_R]) -> list[_R]:
    """The probe records the fine-tuning data does not cover.

    A probe record is covered when its normalised question is one the data asks, or
    when both name a ``person`` and the data teaches facts about that person. Records
    are :class:`~kvw_ledger.data.Record` or their JSON objects.

    Raises:
        BadInputError: every probe record is covered, so nothing is left to measure.
    """
    questions = {normalize(str(_field(r, "question") or "")) for r in taught}
    people = {_field(r, "person") for r in taught} - {None}
    kept = [
        r
        for r in probe
        if normalize(str(_field(r, "question") or "")) not in questions
        and (_field(r, "person") is None or _field(r, "person") not in people)
    ]
    if not kept:
        raise BadInputError(
            "every --forget-probe record is covered by --relearn-data (same question or person); "
            "relearn on part of the forgotten people, e.g. a third, and probe the rest"
        )
    return kept


def _field(record: data.Record | Mapping[str, Any], name: str) -> Any:
    if isinstance(record, data.Record):
        return record.question if name == "question" else record.extra.get(name)
    return record.get(name)


def relearn(
    model: nn.Module,
    processor: Any,
    records: Sequence[data.Record],
    *,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """Fine-tunes ``model`` in place for ``steps`` AdamW steps on ``records``.

    Batches cycle through the records in a seeded shuffled order; the loss is the
    cross-entropy of the answer tokens only (the positions :func:`data.collate`
    selects predict exactly those). Every parameter learns, as in the attacks.

    Returns:
        The loss of each step.

    Raises:
        BadInputError: ``steps`` < 1, ``lr`` not a positive number, or ``batch_size`` < 1.
    """
    if steps < 1:
        raise BadInputError(f"--relearn-steps must be at least 1, not {steps}")
    if not (lr > 0 and lr < float("inf")):
        raise BadInputError(f"--relearn-lr must be a finite number > 0, not {lr}")
    if batch_size < 1:
        raise BadInputError(f"--relearn-batch-size must be at least 1, not {batch_size}")
    encoder = data.Encoder(processor, max_length(model))
    examples = data.encode_all(encoder, records)
    order = list(range(len(examples)))
    rng = random.Random(seed)
    device = model_device(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    model.train()
    try:
        position = len(order)
        for _ in range(steps):
            chosen: list[int] = []
            while len(chosen) < min(batch_size, len(order)):
                if position == len(order):
                    rng.shuffle(order)
                    position = 0
                chosen.append(order[position])
                position += 1
            batch = data.collate([examples[i] for i in chosen], encoder.pad_token_id).to(device)
            out = model(**batch.inputs, use_cache=False)
            logits = out.logits.flatten(0, 1)[batch.positions].float()  # (N, V)
            targets = batch.inputs["input_ids"].flatten()[batch.positions + 1]  # the answer tokens
            loss = nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    return losses
