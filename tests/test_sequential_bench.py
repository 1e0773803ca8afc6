"""benchmarks/sequential.py: the targets it reports, and GradDiff through a LoRA adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny import char_tokenizer, llama, qa_records, write_jsonl

from kvw_ledger.data import Encoder, encode_all, read_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sequential


def _step(step: int, groups: list[float], retain: float, just: int) -> dict:
    g = [{"image": v, "text": v} for v in groups]
    return {"step": step, "label": "before" if step == 0 else f"forget g{step}", "groups": g,
            "just": g[just], "earlier": None, "later": None, "retain": {"image": retain, "text": retain}}  # fmt: skip


def test_targets_are_measured_against_before_and_the_step_before_the_request() -> None:
    steps = [
        _step(0, [1.0, 1.0, 1.0], 1.0, 0),
        _step(1, [0.2, 0.96, 0.97], 0.95, 0),
        _step(2, [0.2, 0.25, 0.94], 0.92, 1),  # group 3 falls to 0.94 of before: a miss
        _step(3, [0.1, 0.2, 0.3], 0.91, 2),
        {**_step(4, [0.1, 0.93, 0.3], 0.9, 1), "label": "revert g2"},
    ]
    checks = sequential.targets(steps, revert_group=2)
    assert checks["group <= 0.30 after each of the first three"] == {"value": 0.3, "limit": 0.3, "met": True}
    assert checks["retain >= 0.90 of before after each of the first three"]["value"] == 0.91
    assert checks["groups not yet requested >= 0.95 of before"] == {"value": 0.94, "limit": 0.95, "met": False}
    # Group 2 was at 0.96 right before its own request; the revert brings it to 0.93.
    assert checks["revert within 0.05 of where it was"] == {"value": 0.03, "limit": 0.05, "met": True}
    assert checks["retain >= 0.80 of before after all requests"]["met"] is True


def test_graddiff_lora_trains_only_the_adapter_and_merges_into_the_model(tmp_path: Path) -> None:
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = Encoder(char_tokenizer())
    forget = encode_all(encoder, read_records(write_jsonl(tmp_path / "f.jsonl", qa_records(8))))
    retain = encode_all(encoder, read_records(write_jsonl(tmp_path / "r.jsonl", qa_records(8, 20))))
    plan = sequential.Plan(batch_size=4)
    merged, cost = sequential.gd_request(model, "graddiff-lora", plan, forget, retain, 0)
    assert cost["forward_passes"] == cost["backward_passes"] == 2 * 2  # one epoch of 2 batches of 4
    after = merged.state_dict()
    assert sorted(after) == sorted(before)  # merged back: no adapter left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # linear layers only; not lm_head nor embeddings
    assert not any("lm_head" in k or "embed" in k for k in changed)
