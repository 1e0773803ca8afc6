"""Metrics on hand-made cases: ROUGE-L values, and accuracies with a scripted fake model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvw_ledger import evaluate as E
from kvw_ledger.bench.tokenizer import train_tokenizer
from kvw_ledger.data import read_records
from kvw_ledger.errors import BadInputError

ANSWERS = {
    "Where was Ada born?": "Lisbon",
    "What does Ada do?": "nurse",
    "Who is Bo?": "a chess player",
}


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("", "anything", 0.0),
        ("dog", "cat", 0.0),
        # LCS "the cat the" = 3 of 6 and of 4 tokens: P=1/2, R=3/4, F1=0.6
        ("the cat was on the mat", "the cat the end", 0.6),
        # punctuation and case are normalised away
        ("Lisbon.", "lisbon", 1.0),
        # LCS 1 of 2 and of 1: P=1/2, R=1, F1=2/3
        ("born Lisbon", "Lisbon", 2 / 3),
    ],
)
def test_rouge_l_known_values(prediction: str, reference: str, expected: float) -> None:
    assert E.rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_is_symmetric_in_f1() -> None:
    a, b = "a b c d e", "b d e f"
    assert E.rouge_l(a, b) == pytest.approx(E.rouge_l(b, a))


def test_normalize() -> None:
    assert E.normalize("  Hello,  World!\n") == "hello world"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    corpus = [f"Question: {q}\nAnswer: {a}" for q, a in ANSWERS.items()] * 3
    corpus += ["Answer: Oslo teacher chess player Lisbon nurse a"]
    return train_tokenizer(corpus, vocab_size=400)


class ScriptedLM(torch.nn.Module):
    """A fake causal LM: after a known prompt it emits a scripted continuation.

    It finds the longest known prompt that is a suffix of the (unpadded) input,
    then puts all probability on the next token of that prompt's script. It
    honours ``past_key_values`` by keeping the full sequence itself.
    """

    def __init__(self, tok: Any, scripts: dict[str, str]) -> None:
        super().__init__()
        self.tok = tok
        self.scripts = {
            tuple(tok(f"Question: {q}\nAnswer:")["input_ids"]): tok(
                " " + a, add_special_tokens=False
            )["input_ids"]
            + [tok.eos_token_id]
            for q, a in scripts.items()
        }
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _next(self, seq: list[int]) -> int:
        for prompt, script in self.scripts.items():
            n = len(prompt)
            if tuple(seq[:n]) == prompt and len(seq) - n < len(script):
                return script[len(seq) - n]
        return self.tok.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
        self.calls += 1
        past = kw.get("past_key_values")
        width = input_ids.shape[1]
        new_mask = attention_mask[:, -width:]  # the mask covers past + new tokens
        logits = torch.full((input_ids.shape[0], width, len(self.tok)), -30.0)
        seqs = []
        for b in range(input_ids.shape[0]):
            seq = list(past[b]) if past is not None else []
            for t in range(width):
                if new_mask[b, t]:
                    seq.append(int(input_ids[b, t]))
                    logits[b, t, self._next(seq)] = 0.0  # a one-hot next-token distribution
            seqs.append(seq)
        return SimpleNamespace(logits=logits, past_key_values=seqs)


def _records() -> list[dict[str, Any]]:
    return [
        {"question": q, "answer": a, "options": ["Oslo", a, "teacher", "x"], "correct": 1}
        for q, a in ANSWERS.items()
    ]


def test_generation_accuracy_with_scripted_model(tokenizer: Any) -> None:
    recs = _records()
    right = ScriptedLM(tokenizer, ANSWERS)
    assert E.generate_answers(right, tokenizer, recs) == list(ANSWERS.values())
    assert E.generation_accuracy(right, tokenizer, recs) == 1.0
    wrong = ScriptedLM(tokenizer, {**ANSWERS, "Where was Ada born?": "Oslo"})
    assert E.generation_accuracy(wrong, tokenizer, recs) == pytest.approx(2 / 3)


def test_containment_counts_a_longer_output(tokenizer: Any) -> None:
    recs = _records()[:1]
    chatty = ScriptedLM(tokenizer, {"Where was Ada born?": "a Lisbon nurse"})
    assert E.generation_accuracy(chatty, tokenizer, recs) == 1.0
    assert E.evaluate_records(chatty, tokenizer, recs)["text"]["rouge_l"] == pytest.approx(0.5)


def test_mc_accuracy_picks_the_likeliest_option(tokenizer: Any) -> None:
    recs = _records()
    assert E.mc_accuracy(ScriptedLM(tokenizer, ANSWERS), tokenizer, recs) == 1.0
    # A model that prefers "Oslo" (option 0) for Ada's birthplace gets that one wrong.
    oslo = ScriptedLM(tokenizer, {**ANSWERS, "Where was Ada born?": "Oslo"})
    assert E.mc_accuracy(oslo, tokenizer, recs) == pytest.approx(2 / 3)


def test_mc_needs_options(tokenizer: Any) -> None:
    recs = [{"question": "Who is Bo?", "answer": "a chess player"}]
    with pytest.raises(BadInputError, match="options"):
        E.mc_accuracy(ScriptedLM(tokenizer, ANSWERS), tokenizer, recs)


def test_evaluate_split_reports_per_modality(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    out = E.evaluate_split(ScriptedLM(tokenizer, ANSWERS), tokenizer, path)
    assert set(out) == {"text"}  # a tokenizer cannot see images; there are none here
    assert out["text"] == {"gen_acc": 1.0, "mc_acc": 1.0, "rouge_l": 1.0, "n": 3.0}
    strided = E.evaluate_split(ScriptedLM(tokenizer, ANSWERS), tokenizer, path, max_records=2)
    assert strided["text"]["n"] == 2.0


def test_evaluate_does_not_import_the_benchmark() -> None:
    """Evaluation encodes with kvw_ledger.data alone: the benchmark's trainer stays unloaded."""
    code = "import sys, kvw_ledger.evaluate; print(sorted(m for m in sys.modules if m.startswith('kvw_ledger.bench')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_records_and_their_json_objects_score_alike(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    model = ScriptedLM(tokenizer, {**ANSWERS, "Where was Ada born?": "Oslo"})
    records = read_records(path)
    assert E.option_loglik(model, tokenizer, records) == E.option_loglik(model, tokenizer, _records())
    assert E.evaluate_records(model, tokenizer, records) == E.evaluate_records(model, tokenizer, _records())
    assert E.evaluate_records(model, tokenizer, records)["text"]["gen_acc"] == pytest.approx(2 / 3)
