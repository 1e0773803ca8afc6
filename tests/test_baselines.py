"""The GradDiff baseline and the benchmark figures built on it (benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, llama, llava, llava_processor, qa_records, save_image, write_jsonl

from kvw_ledger.data import Encoder, encode_all, read_records
from kvw_ledger.kvw import KVWConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines
import frontier
import graddiff


def _examples(tmp_path: Path, name: str, n: int, offset: int, image: str | None = None, processor=None):
    processor = processor or char_tokenizer()
    path = write_jsonl(tmp_path / f"{name}.jsonl", qa_records(n, offset, image))
    encoder = Encoder(processor)
    return encode_all(encoder, read_records(path)), encoder.pad_token_id


def _text_batches(tmp_path: Path):
    forget, pad = _examples(tmp_path, "forget", 6, 0)
    retain, _ = _examples(tmp_path, "retain", 6, 20)
    config = KVWConfig(batch_size=2)
    fb = baselines.kvw_batches(forget, config, pad)
    rb = baselines.retain_batches(retain, len(fb), 2, pad)
    return fb, rb


def test_graddiff_raises_the_forget_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama()
    fb, rb = _text_batches(tmp_path)
    before = baselines.mean_answer_loss(model, fb)
    result = baselines.graddiff(model, fb, rb, baselines.GradDiffConfig(lr=1e-2, steps=12))
    after = baselines.mean_answer_loss(model, fb)
    assert after > before + 0.5  # ascent on the forget loss really moved it up
    assert result.steps == 12 and result.forward_passes == 24 and result.backward_passes == 24
    assert result.forget_losses[-1] > result.forget_losses[0]
    assert not model.training  # left in eval, as it came


def test_graddiff_descends_the_retain_loss_alone(tmp_path: Path) -> None:
    # With the forget term off, GradDiff is plain fine-tuning on the retain set.
    model = llama()
    fb, rb = _text_batches(tmp_path)
    before = baselines.mean_answer_loss(model, rb)
    config = baselines.GradDiffConfig(lr=1e-2, steps=6, forget_weight=0.0)
    baselines.graddiff(model, fb, rb, config)
    assert baselines.mean_answer_loss(model, rb) < before - 0.5


def test_graddiff_with_lr_zero_changes_nothing(tmp_path: Path) -> None:
    model = llama()
    fb, rb = _text_batches(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = baselines.graddiff(model, fb, rb, baselines.GradDiffConfig(lr=0.0))
    assert result.steps == len(fb) == 3  # one epoch over KVW's batches of 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())  # gradients freed


def test_graddiff_trains_a_llava_model_on_image_records(tmp_path: Path) -> None:
    processor = llava_processor()
    save_image(tmp_path / "face.png")
    forget, pad = _examples(tmp_path, "forget", 4, 0, "face.png", processor)
    retain, _ = _examples(tmp_path, "retain", 4, 20, "face.png", processor)
    fb = baselines.kvw_batches(forget, KVWConfig(batch_size=2), pad)
    rb = baselines.retain_batches(retain, len(fb), 2, pad)
    assert fb[0].has_images
    model = llava()
    vision = {k: v.clone() for k, v in model.state_dict().items() if "vision" in k}
    before = baselines.mean_answer_loss(model, fb)
    baselines.graddiff(model, fb, rb, baselines.GradDiffConfig(lr=1e-2, steps=4))
    assert baselines.mean_answer_loss(model, fb) > before
    changed = [k for k, v in model.state_dict().items() if k in vision and not torch.equal(v, vision[k])]
    assert changed  # full fine-tuning reaches the vision tower too


def test_answer_loss_counts_only_answer_tokens(tmp_path: Path) -> None:
    model = llama()
    fb, _ = _text_batches(tmp_path)
    batch = fb[0]
    ids = batch.inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    labels.view(-1)[batch.positions + 1] = ids.view(-1)[batch.positions + 1]
    with torch.no_grad():
        expected = model(**batch.inputs, labels=labels).loss  # HF shifts labels itself
        assert torch.allclose(baselines.answer_loss(model, batch), expected, atol=1e-5)


def test_retain_batches_use_every_example_before_repeating(tmp_path: Path) -> None:
    retain, pad = _examples(tmp_path, "retain", 5, 0)
    batches = baselines.retain_batches(retain, 3, 2, pad)
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [2, 2, 2]
    first_five = [row for b in batches for row in b.inputs["input_ids"]][:5]
    firsts = {tuple(r[r != pad].tolist()) for r in first_five}
    assert len(firsts) == 5


def test_graddiff_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        baselines.GradDiffConfig(lr=-1.0)
    with pytest.raises(ValueError):
        baselines.GradDiffConfig(steps=0)


def test_speed_and_memory_figures_are_baseline_over_kvw() -> None:
    figures = graddiff.figures(
        kvw={"seconds": 2.0, "compute_seconds": 1.0, "memory": 100 * 2**20},
        graddiff={"seconds": 20.0, "compute_seconds": 19.0, "memory": 400 * 2**20},
        retain_seconds=3.0,
        setting="test",
    )
    by_name = {f.name: f for f in figures}
    speed = next(f for f in figures if "time" in f.name and "end to end" in f.name)
    assert speed.ratio == pytest.approx(10.0) and speed.met is True
    memory = next(f for f in figures if "memory" in f.name)
    assert memory.ratio == pytest.approx(4.0) and memory.met is True
    retain = next(f for f in figures if "retain" in f.name)
    assert retain.ratio == pytest.approx(20.0 / 5.0) and retain.target is None
    assert len(by_name) == len(figures)  # names are distinct
    slower = graddiff.figures(
        kvw={"seconds": 20.0, "compute_seconds": 19.0, "memory": 400 * 2**20},
        graddiff={"seconds": 2.0, "compute_seconds": 1.0, "memory": 100 * 2**20},
        retain_seconds=3.0,
        setting="test",
    )
    assert all(f.ratio < 1 for f in slower)  # KVW slower and bigger: every ratio below 1


def _point(method: str, image_f: float, text_f: float, image_r: float, text_r: float) -> dict:
    knobs = {"gamma": 0.6, "layers": [0, 3]} if method == "kvw" else {"lr": 1e-4, "steps": 10}
    return {
        "method": method,
        **knobs,
        "forget": {"image": image_f, "text": text_f},
        "retain": {"image": image_r, "text": text_r},
    }


def test_frontier_figure_compares_retain_at_forgetting_points() -> None:
    points = [
        _point("kvw", 0.9, 0.9, 1.0, 1.0),  # forgets nothing: not eligible
        _point("kvw", 0.2, 0.25, 0.9, 0.8),
        _point("kvw", 0.1, 0.1, 0.6, 0.6),
        _point("graddiff", 0.2, 0.2, 0.45, 0.4),
        _point("graddiff", 0.5, 0.2, 0.95, 0.95),  # image forget above the line: not eligible
    ]
    figure = frontier.headline(points, threshold=0.30)
    assert figure.target is None
    assert figure.ratio == pytest.approx(0.85 / 0.425)  # best mean retain: KVW over GradDiff
    swap = {"kvw": "graddiff", "graddiff": "kvw"}
    flipped = [{**p, **_point(swap[p["method"]], 0, 0, 0, 0), "forget": p["forget"], "retain": p["retain"]} for p in points]
    assert frontier.headline(flipped, threshold=0.30).ratio < 1


def test_frontier_figure_when_a_method_never_forgets() -> None:
    points = [_point("kvw", 0.2, 0.2, 0.9, 0.9), _point("graddiff", 0.8, 0.8, 1.0, 1.0)]
    figure = frontier.headline(points, threshold=0.30)
    assert figure.ratio == float("inf") and "GradDiff reached no point" in figure.detail
    none = [_point("kvw", 0.8, 0.8, 0.9, 0.9), _point("graddiff", 0.8, 0.8, 1.0, 1.0)]
    assert frontier.headline(none, threshold=0.30).ratio == 0.0
