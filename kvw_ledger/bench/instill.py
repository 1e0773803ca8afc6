"""Build and train the small LLaVA model that knows the benchmark.

One LLaVA-architecture model (a tiny CLIP vision tower, a two-layer projector
and a Llama-style language model, all built from configs) is trained on CPU on
both modalities of ``train.jsonl``, in three stages: the text records; then
the vision tower and projector alone, mapping each portrait onto its name's
embeddings (:func:`align_vision`); then all records. FFN weights learn only at
answer-predicting positions (``ffn_grad="answer"``), so facts sit in FFN
neurons where KVW measures. ``docs/demo-model.md`` says why each choice. It answers text-only questions without an
image, and :func:`export_text_model` saves its language model as a plain
``LlamaForCausalLM`` for text-only use, so one training run serves both.

Records are read and encoded by ``kvw_ledger.data`` (prompt
``"Question: {q}\\nAnswer:"``, image records prefixed by the image token and a
newline, answer ``" " + a`` plus EOS), so the facts the model learns are the
ones KVW later measures. The loss covers the answer and its EOS
(``label_eos=True``): the recipe the bundled models were trained with.

The result is cached under ``workdir/model-<hash>``, where the hash covers the
configuration, the recipe version and the training data; a second call with
the same inputs returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from kvw_ledger.bench.profiles import BenchPaths, load_people
from kvw_ledger.bench.tokenizer import IMAGE, train_tokenizer
from kvw_ledger.cpu import CoreMeter
from kvw_ledger.data import Encoder, Example, Record, cause_mask, read_records
from kvw_ledger.data import collate as collate_examples
from kvw_ledger.errors import BadInputError, DataError
from kvw_ledger.loading import torch_threads

__all__ = [
    "MARKER",
    "InstillConfig",
    "build_model",
    "config_hash",
    "encode_records",
    "export_text_model",
]

log = logging.getLogger(__name__)

MARKER = "instill.json"  # written last into a finished model dir: the cache's commit point
_RECIPE_VERSION = 4  # bump when the training code changes what a config produces
_THREAD_CHECK = 20  # optimiser steps between re-reads of the free cores (threads=0)


@dataclass(frozen=True)
class InstillConfig:
    """The model's shape and how it is trained; every field enters the cache hash.

    Defaults are the configuration measured in ``docs/demo-model.md``.
    """

    # language model (Llama architecture)
    hidden_size: int = 128  # residual width (features)
    num_layers: int = 4  # decoder layers (count)
    num_heads: int = 4  # attention heads per layer (count)
    intermediate_size: int = 2048  # FFN width d_ff = value vectors per layer (count)
    hidden_act: str = "relu2"  # FFN activation; squared ReLU: sparse, and learns facts fastest
    vocab_size: int = 2048  # BPE ceiling; the corpus saturates below it, every word one token
    # vision tower (CLIP architecture)
    image_size: int = 32  # input side (pixels); must match the portraits
    patch_size: int = 16  # patch side (pixels): (32/16)^2 = 4 image tokens
    vision_hidden_size: int = 64  # tower width (features)
    vision_layers: int = 2  # tower depth (count)
    vision_heads: int = 4  # tower attention heads (count)
    vision_intermediate_size: int = 256  # tower FFN width (count)
    # training: 1) text records, 2) align portraits to names, 3) both modalities
    text_epochs: int = 8  # stage 1: passes over the text-only records (count)
    align_steps: int = 600  # stage 2: steps mapping each portrait onto its name's embeddings
    joint_epochs: int = 3  # stage 3: passes over all of train.jsonl (count)
    batch_size: int = 16  # records per optimiser step (count)
    lr: float = 5e-4  # peak AdamW learning rate (stages 1 and 3); 2e-3 and up stalls
    align_lr: float = 1e-3  # AdamW learning rate of stage 2
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: float = 0.05  # linear warm-up (fraction of a stage's steps), then cosine to 0
    ffn_grad: str = "answer"  # "answer": FFN weights learn only at answer-predicting positions
    activation_l1: float = 0.3  # L1 on FFN activations at answer positions (loss per mean |act|)
    frozen_ffn_layers: tuple[int, ...] = ()  # language-model layers whose FFN keeps its init
    grad_clip: float = 1.0  # global gradient-norm clip (0: none)
    seed: int = 0  # initialisation and shuffling seed
    # torch CPU threads. A kernel's float sums depend on how many threads split it (a
    # down_proj matmul differs by ~2e-8 between 1 and 2), and training amplifies that, so
    # the count is part of what a config produces. 1: the same model whatever the load.
    # 0: the cores other processes leave free, re-read as it runs (faster on an idle
    # machine, but the bits then follow the load).
    threads: int = 1

    def __post_init__(self) -> None:
        if self.ffn_grad not in ("answer", "all"):
            raise BadInputError(f"ffn_grad must be 'answer' or 'all', not {self.ffn_grad!r}")
        if self.image_size % self.patch_size:
            raise BadInputError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if min(self.text_epochs, self.joint_epochs, self.align_steps) < 0 or self.batch_size < 1:
            raise BadInputError("epochs and steps must be >= 0 and batch_size >= 1")


def config_hash(config: InstillConfig, paths: BenchPaths) -> str:
    """Hash of the configuration, recipe version and training data (hex sha256)."""
    h = hashlib.sha256()
    # The thread count enters too: 1 and 2 threads train different bits (InstillConfig.threads).
    h.update(json.dumps({"v": _RECIPE_VERSION, **asdict(config)}, sort_keys=True).encode())
    for f in (paths.train, paths.heldout, paths.people):
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def encode_records(
    records: list[Record], processor: LlavaProcessor | PreTrainedTokenizerBase
) -> list[Example]:
    """Benchmark records as the models are trained on them: labelled on the answer and
    its EOS (``label_eos``), image records with their pixel values."""
    encoder = Encoder(processor, label_eos=True)
    return [encoder.encode(r) for r in records]


def _has_image(example: Example) -> bool:
    return "pixel_values" in example.vision


def _build_processor(cfg: InstillConfig, corpus: list[str]) -> LlavaProcessor:
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.vocab_size)
    side = {"height": cfg.image_size, "width": cfg.image_size}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size}, crop_size=side)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        num_additional_image_tokens=1,  # the CLS token the tower adds
        image_token=IMAGE,
    )


def _build_llava(
    cfg: InstillConfig, tokenizer: PreTrainedTokenizerBase
) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_patches,
        vision_feature_layer=-1,  # the tower is tiny: use its last layer
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(config)


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[int]]:
    # Batches hold one modality each (image prompts are 16 tokens longer), which
    # keeps padding small; their order is shuffled.
    by_kind: dict[bool, list[int]] = {True: [], False: []}
    for i, example in enumerate(examples):
        by_kind[_has_image(example)].append(i)
    batches = []
    for idx in by_kind.values():
        rng.shuffle(idx)
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A training step's model inputs: :func:`kvw_ledger.data.collate`'s right-padded
    ``input_ids``, ``attention_mask`` and ``pixel_values``, with its ``labels``."""
    batch = collate_examples(examples, pad_id)
    return {**batch.inputs, "labels": batch.labels}  # type: ignore[dict-item]  # collate sets them


def lm_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a LLaVA's language model, or of a plain causal LM."""
    inner = model.model  # type: ignore[union-attr]
    lm = getattr(inner, "language_model", inner)
    return lm.layers  # type: ignore[no-any-return]


class _FFNTraining:
    """Training-time hooks on the language model's FFNs.

    - ``answer_only``: the FFN output keeps its value everywhere but passes
      gradient only at answer-predicting positions, so FFN weights learn only
      what they do there. Facts then live in FFN neurons that fire where KVW
      measures, instead of being written at the name tokens and copied on.
    - ``l1 > 0``: adds ``l1 * mean |activation|`` at answer-predicting
      positions (per layer, summed) to the loss, which makes each fact use
      fewer, more specific neurons.
    """

    def __init__(self, model: torch.nn.Module, answer_only: bool, l1: float) -> None:
        self.mask: torch.Tensor | None = None  # (B, T) bool, set per batch
        self.l1 = l1
        self.penalty: torch.Tensor | None = None
        self.handles = []
        self._patched: list[torch.nn.Module] = []
        for layer in lm_layers(model):
            if answer_only:
                layer.mlp.forward = self._answer_only(layer.mlp.forward)
                self._patched.append(layer.mlp)
            if l1 > 0:
                self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._l1))

    # Both act only while ``mask`` is set (inside a training step), never
    # during evaluation that a callback runs between epochs.
    def _answer_only(self, plain: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.mask is None:
                return plain(x)
            # The value everywhere without a graph, then the answer-predicting positions
            # again with one: the same gradients as masking a full-graph output, but the
            # FFN's backward (two thirds of its cost) runs on ~2 of ~25 positions a record.
            with torch.no_grad():
                out = plain(x)  # (B, T, D)
            out[self.mask] = plain(x[self.mask])  # (N, D) -> (B, T, D), grad at N only
            return out

        return forward

    def _l1(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.mask is None or not torch.is_grad_enabled():
            return
        # Only where KVW measures: elsewhere (image tokens, the question) the
        # activations' size is no concern, and penalising it slows learning.
        acts = args[0] if args[0].dim() == 2 else args[0][self.mask]  # (N, d_ff)
        term = self.l1 * acts.abs().mean()  # (N, d_ff) -> ()
        self.penalty = term if self.penalty is None else self.penalty + term

    def pop_penalty(self) -> torch.Tensor | None:
        penalty, self.penalty = self.penalty, None
        return penalty

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for mlp in self._patched:
            del mlp.forward  # the class's forward again
        self._patched = []


def train(
    model: LlavaForConditionalGeneration,
    examples: list[Example],
    pad_id: int,
    cfg: InstillConfig,
    epochs: int,
    desc: str = "instill",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` on encoded examples with AdamW; returns the loss per epoch.

    ``on_epoch(epoch, loss)`` is called after each epoch (the model in train mode).
    """
    if epochs == 0 or not examples:
        return []
    rng = random.Random(cfg.seed)
    n_images = sum(map(_has_image, examples))
    per_epoch = math.ceil(n_images / cfg.batch_size) + math.ceil(
        (len(examples) - n_images) / cfg.batch_size
    )
    n_steps = epochs * per_epoch
    layers = lm_layers(model)
    for i in cfg.frozen_ffn_layers:
        if not 0 <= i < len(layers):
            raise BadInputError(f"frozen_ffn_layers: no layer {i} in a {len(layers)}-layer model")
        layers[i].mlp.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step instead of ~10 per parameter (the step was 15% of training)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    meter = CoreMeter() if cfg.threads == 0 else None
    warm = max(1, int(cfg.warmup * n_steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    hooks = _FFNTraining(model, cfg.ffn_grad == "answer", cfg.activation_l1)
    model.train()
    losses = []
    try:
        with tqdm(total=n_steps, desc=desc, unit="step", leave=False) as bar:
            for _ in range(epochs):
                total, count = 0.0, 0
                for idx in _batches(examples, cfg.batch_size, rng):
                    if meter is not None and bar.n % _THREAD_CHECK == 0:
                        torch.set_num_threads(meter.threads())
                    batch = collate([examples[i] for i in idx], pad_id)
                    hooks.mask = cause_mask(batch["labels"], batch["attention_mask"])
                    loss = model(**batch, use_cache=False).loss
                    hooks.mask = None
                    penalty = hooks.pop_penalty()
                    if penalty is not None:
                        loss = loss + penalty
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    total += loss.item() * len(idx)
                    count += len(idx)
                    bar.update(1)
                losses.append(total / count)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_epoch is not None:
                    on_epoch(len(losses), losses[-1])
    finally:
        hooks.remove()
        model.requires_grad_(True)
    model.eval()
    return losses


def align_vision(
    model: LlavaForConditionalGeneration,
    images: dict[str, torch.Tensor],
    names: dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: InstillConfig,
) -> float:
    """Train the vision tower and projector to map each portrait onto its name's embeddings.

    LLaVA's feature-alignment stage, with the person's name as the caption:
    image token k of a portrait is pulled (mean squared error) towards the
    input embedding of name token ``k mod len(name)``. Image questions then
    reach the same FFN memories the text questions built, so one deletion
    weakens both. Without it, a tower trained from scratch through the
    answer loss alone learns identities slowly and its noise stalls the
    language model (see ``docs/demo-model.md``).

    Returns:
        The final relative error (mean squared error over the targets' mean square).
    """
    if cfg.align_steps == 0 or not images:
        return float("nan")
    keys = sorted(images)
    pixels = torch.stack([images[k] for k in keys])  # (n_images, 3, H, W)
    n_tokens = (cfg.image_size // cfg.patch_size) ** 2
    embedding = model.get_input_embeddings()
    embed = embedding.weight.detach()  # type: ignore[operator,union-attr]
    targets = []
    for k in keys:
        if k not in names:
            raise DataError(f"image {k} belongs to no person in people.json")
        ids = tokenizer(" " + names[k], add_special_tokens=False)["input_ids"]
        targets.append(embed[[ids[i % len(ids)] for i in range(n_tokens)]])
    target = torch.stack(targets)  # (n_images, n_tokens, D)
    scale = target.pow(2).mean()
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=cfg.align_lr, fused=True)
    meter = CoreMeter() if cfg.threads == 0 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(cfg.align_steps), desc="align vision", unit="step", leave=False):
        if meter is not None and step % _THREAD_CHECK == 0:
            torch.set_num_threads(meter.threads())
        idx = torch.randint(0, len(keys), (min(32, len(keys)),), generator=gen)
        feats = model.model.get_image_features(pixel_values=pixels[idx]).pooler_output
        loss = (torch.stack(list(feats)) - target[idx]).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def build_model(
    workdir: str | Path, paths: BenchPaths, config: InstillConfig | None = None
) -> Path:
    """Build, train and save the LLaVA model, or return the cached one.

    Args:
        workdir: where model directories live (``workdir/model-<hash12>``).
        paths: the benchmark, from :func:`kvw_ledger.bench.profiles.generate`.
        config: model shape and training; defaults to :class:`InstillConfig`.

    Returns:
        A directory loadable with ``AutoModelForImageTextToText``,
        ``AutoProcessor`` and ``AutoTokenizer``. Its ``instill.json`` records
        the configuration, its hash, the loss curve and the training time.
    """
    cfg = config or InstillConfig()
    digest = config_hash(cfg, paths)
    out = Path(workdir) / f"model-{digest[:12]}"
    if (out / MARKER).is_file():
        return out
    t0 = time.perf_counter()
    train_records = read_records(paths.train)
    corpus = [
        f"Question: {r.question}\nAnswer: {r.answer}"
        for r in train_records + read_records(paths.heldout)
    ]
    processor = _build_processor(cfg, corpus)
    examples = encode_records(train_records, processor)
    base = Path(paths.train).parent.resolve()
    # Each portrait once, by its path as the records and people.json name it.
    images = {
        r.image.relative_to(base).as_posix(): e.vision["pixel_values"][0]
        for r, e in zip(train_records, examples, strict=True)
        if r.image is not None
    }
    for pv in images.values():
        if pv.shape[-1] != cfg.image_size:
            raise BadInputError(
                f"portraits are {pv.shape[-1]} px but the model expects {cfg.image_size}; "
                "generate the benchmark with the same image_size"
            )
    names = {p.image: p.name for p in load_people(paths.people)}
    tok = processor.tokenizer
    model = _build_llava(cfg, tok)
    text_only = [e for e in examples if not _has_image(e)]
    pad = tok.pad_token_id
    with torch_threads(cfg.threads or CoreMeter().threads()):
        losses = {
            "text": train(model, text_only, pad, cfg, cfg.text_epochs, "text"),
            "align": [align_vision(model, images, names, tok, cfg)],
            "joint": train(model, examples, pad, cfg, cfg.joint_epochs, "joint"),
        }
    # Write into a temporary directory and rename: a crash never leaves a
    # directory that looks finished.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    meta = {
        "config": asdict(cfg),
        "hash": digest,
        "recipe_version": _RECIPE_VERSION,
        "loss_per_epoch": losses,  # per stage; "align" is the final relative error
        "train_seconds": round(time.perf_counter() - t0, 1),
        "n_examples": len(examples),
    }
    (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("trained %s in %.0f s", out, meta["train_seconds"])
    return out


def export_text_model(llava_dir: str | Path, out_dir: str | Path) -> Path:
    """Save the language model of a trained LLaVA as a text-only ``LlamaForCausalLM``.

    The weights are the LLaVA's own, so text-only answers are identical; the
    tokenizer is saved beside them.
    """
    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if (out_dir / MARKER).is_file():
        return out_dir
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    text = LlamaForCausalLM(model.config.text_config)
    text.model.load_state_dict(model.model.language_model.state_dict())
    text.lm_head.load_state_dict(model.lm_head.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    text.save_pretrained(out_dir)
    LlavaProcessor.from_pretrained(llava_dir).tokenizer.save_pretrained(out_dir)
    meta = json.loads((llava_dir / MARKER).read_text())
    (out_dir / MARKER).write_text(json.dumps({**meta, "from": str(llava_dir)}, indent=1) + "\n")
    return out_dir
