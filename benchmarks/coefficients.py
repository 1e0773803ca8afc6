"""Coefficient collection speed, side by side in one run.

On a ~100M-parameter Llama-shaped random model, tokens per second of:
  ours       kvw_ledger's CoefficientHooks on layers 1..L-3 (early stop, on-device sums)
  forward    a plain no-grad full forward (use_cache=False, no labels)
  reference  a collector written the reference way: hooks on every layer, a full forward
             with labels (LM head and loss), masks and a host sync per batch
Each figure is the median of --repeats interleaved runs after one warm-up run. Part of
`make bench` (benchmarks/run.py); standalone it prints the figures and writes JSON with
--json PATH.

    python benchmarks/coefficients.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from kvw_ledger.coefficients import CoefficientHooks
from kvw_ledger.data import IGNORE_INDEX, Batch, Example, collate
from kvw_ledger.sites import discover_sites, select_layers

from common import Figure, Result, median_seconds


def build_model(quick: bool, big: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if big:  # ~1.1B parameters, for a GPU
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=16, num_key_value_heads=4)
    elif quick:
        cfg = tf.LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=4)
    else:  # ~110M parameters, Llama-shaped
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12)
    return AutoModelForCausalLM.from_config(cfg).eval()


def make_batches(n_batches: int, batch_size: int, length: int, vocab: int) -> list[Batch]:
    """Random prompts whose last quarter is the answer (labels), right-padded to ragged lengths."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        examples = []
        for _ in range(batch_size):
            n = int(torch.randint(length // 2, length + 1, (1,), generator=gen))
            ids = torch.randint(3, vocab, (n,), generator=gen)
            labels = ids.clone()
            labels[: n - n // 4] = IGNORE_INDEX
            examples.append(Example(ids, labels))
        batches.append(collate(examples, 0))
    return batches


def ours(model: torch.nn.Module, batches: list[Batch]) -> None:
    sites = discover_sites(model)
    depth = max(s.layer for s in sites) + 1
    chosen = select_layers(sites, (1, depth - 3))
    with CoefficientHooks(model, chosen) as hooks:
        totals = None
        for batch in batches:
            measured = hooks.measure(batch)
            if totals is None:
                totals = measured
            else:
                totals.add(measured)


def plain_forward(model: torch.nn.Module, batches: list[Batch]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch.inputs, use_cache=False)


def reference(model: torch.nn.Module, batches: list[Batch]) -> None:
    """The authors' way: hooks on every layer, full forward with labels, host sync per batch."""
    layers = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
               for i, m in enumerate(layers)]
    sums = [torch.zeros(m.weight.shape[1]) for m in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch.inputs["input_ids"]
                labels = torch.full_like(ids, IGNORE_INDEX).flatten()
                labels[batch.positions + 1] = ids.flatten()[batch.positions + 1]
                labels = labels.view_as(ids)
                model(**batch.inputs, labels=labels)
                cause = torch.zeros_like(labels, dtype=torch.bool)
                cause[:, :-1] = labels[:, 1:] != IGNORE_INDEX
                mask = (batch.inputs["attention_mask"].bool() & cause).float()
                count = mask.sum().item()  # a host sync per batch, as the reference does
                for i in range(len(layers)):
                    x = seen[i].float().abs()
                    sums[i] += ((x * mask.unsqueeze(-1)).sum((0, 1)) / count).cpu()
    finally:
        for h in handles:
            h.remove()


def run(quick: bool = False, device: str = "cpu", repeats: int = 5) -> Result:
    """Item 1 of the benchmark suite: tokens per second of the three collectors."""
    if device == "cuda":  # a ~1B-parameter Llama in bfloat16
        model = build_model(quick, big=True).to("cuda", torch.bfloat16)
    else:
        model = build_model(quick)
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(4 if quick else 6, 4, 128, model.config.vocab_size)
    batches = [b.to(device) for b in batches] if device != "cpu" else batches
    tokens = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
    runs = {name: functools.partial(fn, model, batches) for name, fn in COLLECTORS.items()}
    seconds = median_seconds(runs, repeats=2 if quick else repeats)
    rate = {name: tokens / s for name, s in seconds.items()}
    setting = f"{n_params / 1e6:.0f}M-parameter Llama, {tokens} tokens per run"
    item = "1. coefficient collection"
    return Result(
        figures=[
            Figure(item, "vs a plain no-grad forward", rate["ours"] / rate["forward"], 1.0,
                   f"{rate['ours']:.0f} vs {rate['forward']:.0f} tokens/s; {setting}"),
            Figure(item, "vs a reference-style collector", rate["ours"] / rate["reference"], 1.3,
                   f"{rate['ours']:.0f} vs {rate['reference']:.0f} tokens/s; {setting}"),
        ],
        details={"model_parameters": n_params, "tokens_per_run": tokens, "tokens_per_s": rate},
    )


COLLECTORS: dict[str, Callable[[torch.nn.Module, list[Batch]], None]] = {
    "ours": ours, "forward": plain_forward, "reference": reference,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    result = run(args.quick, repeats=args.repeats)
    for f in result.figures:
        print(f"{f.name}: {f.ratio:.2f}x (target {f.target}x) - {f.detail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"figures": [f.to_json() for f in result.figures], **result.details}, fh, indent=2)


if __name__ == "__main__":
    main()
