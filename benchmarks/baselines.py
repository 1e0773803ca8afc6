"""Gradient-based unlearning baselines that KVW is measured against.

GradDiff (gradient difference): full fine-tuning with AdamW on

    loss = -forget_weight * L_forget + retain_weight * L_retain

one step per forget batch, each paired with one retain batch, where L is the mean
next-token cross-entropy over the answer tokens: the same positions KVW measures
(``Batch.positions`` are the inputs that predict an answer token, so the target
of position t is ``input_ids[t + 1]``). It runs on :class:`kvw_ledger.data.Batch`
objects, so text Llama and LLaVA models (pixel values in ``Batch.inputs``) take
the same path, and on the very batches a KVW request uses (:func:`kvw_batches`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kvw_ledger.coefficients import model_device
from kvw_ledger.data import Batch, Example, collate
from kvw_ledger.kvw import KVWConfig, batch_order


@dataclass(frozen=True)
class GradDiffConfig:
    """Parameters of one GradDiff run."""

    lr: float = 1e-5  # AdamW learning rate (constant: no schedule within one request)
    steps: int | None = None  # optimiser steps; None: one epoch, one step per forget batch
    forget_weight: float = 1.0  # weight of the ascended forget loss
    retain_weight: float = 1.0  # weight of the descended retain loss
    weight_decay: float = 0.01  # AdamW decoupled weight decay (torch's default)
    max_grad_norm: float | None = 1.0  # global gradient-norm clip; None: no clip
    # AdamW's fused kernel, as transformers' Trainer uses by default with torch >= 2.8
    # (optim "adamw_torch_fused"); off: torch's per-parameter loop on the CPU.
    fused: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, not {self.lr}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")


@dataclass
class GradDiffResult:
    """What one run did: per step the two losses (before the step's update) and its passes."""

    forget_losses: list[float] = field(default_factory=list)
    retain_losses: list[float] = field(default_factory=list)
    forward_passes: int = 0  # full forward passes (one per batch seen)
    backward_passes: int = 0  # backward passes (one per loss term, see graddiff)

    @property
    def steps(self) -> int:
        return len(self.forget_losses)


def answer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of ``batch`` (one forward)."""
    logits = model(**batch.inputs, use_cache=False).logits
    picked = logits.flatten(0, 1)[batch.positions]  # (N, vocab): only the answer-predicting rows
    targets = batch.inputs["input_ids"].flatten()[batch.positions + 1]
    return F.cross_entropy(picked.float(), targets)


def graddiff(
    model: nn.Module,
    forget: Sequence[Batch],
    retain: Sequence[Batch],
    config: GradDiffConfig | None = None,
    on_step: Callable[[GradDiffResult], None] | None = None,
) -> GradDiffResult:
    """Runs GradDiff on ``model`` in place: step i ascends on forget batch i and descends
    on retain batch i (both cycled when ``config.steps`` asks for more than one epoch).

    Every parameter that requires a gradient is trained (full fine-tuning) with AdamW,
    fused by default as in transformers' Trainer (one kernel per step rather than a
    loop over the parameters: 3x less optimiser time on the CPU). The two
    terms are back-propagated one after the other into the same gradients: the same
    update as one backward of their sum, with only one batch's activations alive at a
    time (the cheaper way, so the baseline's memory is not overstated). The model is
    left in the mode it came in. ``on_step`` is called after every step (e.g. to evaluate
    the model part way: with a constant learning rate, step k of a long run is the same
    model as the last step of a k-step run).
    """
    config = config or GradDiffConfig()
    if not forget or not retain:
        raise ValueError("GradDiff needs at least one forget batch and one retain batch")
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=config.fused
    )
    result = GradDiffResult()
    was_training = model.training
    model.train()
    try:
        for step in range(config.steps or len(forget)):
            optimiser.zero_grad(set_to_none=True)
            f_loss = answer_loss(model, forget[step % len(forget)].to(device))
            (-config.forget_weight * f_loss).backward()
            r_loss = answer_loss(model, retain[step % len(retain)].to(device))
            (config.retain_weight * r_loss).backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimiser.step()
            result.forget_losses.append(float(f_loss.detach()))
            result.retain_losses.append(float(r_loss.detach()))
            result.forward_passes += 2
            result.backward_passes += 2
            if on_step is not None:
                on_step(result)
                model.train()  # the callback may have evaluated in eval mode
    finally:
        optimiser.zero_grad(set_to_none=True)  # free the gradients before returning
        model.train(was_training)
    return result


def kvw_batches(examples: Sequence[Example], config: KVWConfig, pad_token_id: int) -> list[Batch]:
    """The forget batches a KVW request with ``config`` runs over, in its order."""
    return [
        collate([examples[i] for i in indices], pad_token_id)
        for indices in batch_order(len(examples), config)
    ]


def retain_batches(
    examples: Sequence[Example], n_batches: int, batch_size: int, pad_token_id: int, seed: int = 0
) -> list[Batch]:
    """``n_batches`` batches of ``batch_size`` retain examples: a seeded shuffle, reshuffled
    whenever it runs out, so every example is used before any repeats."""
    if not examples:
        raise ValueError("the retain set is empty")
    rng = random.Random(seed)
    pool: list[int] = []
    batches = []
    for _ in range(n_batches):
        indices = []
        while len(indices) < batch_size:
            if not pool:
                pool = list(range(len(examples)))
                rng.shuffle(pool)
            indices.append(pool.pop())
        batches.append(collate([examples[i] for i in indices], pad_token_id))
    return batches


def mean_answer_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Token-weighted mean answer loss over ``batches`` without gradients (model in eval)."""
    device = model_device(model)
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                total += float(answer_loss(model, batch.to(device))) * batch.n_tokens
                tokens += batch.n_tokens
    finally:
        model.train(was_training)
    return total / tokens
