"""Coefficient collection speed, side by side in one run.

On a ~100M-parameter Llama-shaped random model, tokens per second of:
  ours       kvw_ledger's CoefficientHooks on layers 1..L-3 (early stop, on-device sums)
  forward    a plain no-grad full forward (use_cache=False, no labels)
  reference  a collector written the reference way: hooks on every layer, a full forward
             with labels (LM head and loss), masks and a host sync per batch
Each figure is the median of --repeats timed runs after one warm-up run. Prints a table
and writes JSON with --json PATH.

    python benchmarks/coefficients.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from kvw_ledger.coefficients import CoefficientHooks
from kvw_ledger.data import IGNORE_INDEX, Batch, Example, collate
from kvw_ledger.sites import discover_sites, select_layers


def build_model(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if quick:
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


def timed(collectors: dict[str, Callable[[torch.nn.Module, list[Batch]], None]], model: torch.nn.Module,
          batches: list[Batch], repeats: int) -> dict[str, float]:
    """Median seconds per collector; runs are interleaved so drift in machine load hits all alike."""
    for fn in collectors.values():
        fn(model, batches)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in collectors}
    for _ in range(repeats):
        for name, fn in collectors.items():
            start = time.perf_counter()
            fn(model, batches)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(4 if args.quick else 6, 4, 128, model.config.vocab_size)
    tokens = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
    seconds = timed({"ours": ours, "forward": plain_forward, "reference": reference}, model, batches, args.repeats)
    results = {name: tokens / s for name, s in seconds.items()}
    figures = {
        "model_parameters": n_params,
        "layers": model.config.num_hidden_layers,
        "tokens_per_run": tokens,
        "tokens_per_s": results,
        "speedup_vs_forward": results["ours"] / results["forward"],
        "speedup_vs_reference": results["ours"] / results["reference"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    print(f"model: {n_params / 1e6:.0f}M parameters, {model.config.num_hidden_layers} layers; "
          f"{tokens} tokens per run; median of {args.repeats}")
    print(f"{'collector':<12}{'tokens/s':>12}{'ours is':>12}")
    for name, rate in results.items():
        print(f"{name:<12}{rate:>12.0f}{results['ours'] / rate:>11.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
