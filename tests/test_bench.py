"""The benchmark generator, the tokenizer and the cached instilling of a tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kvw_ledger.bench import instill, profiles
from kvw_ledger.bench.profiles import BenchConfig, BenchPaths, generate
from kvw_ledger.errors import BadInputError

N = 40  # people in the test benchmark: 5% = 2, 10% = 4, 15% = 6


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _people(path: Path) -> set[str]:
    return {r["person"] for r in _read(path)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> BenchPaths:
    return generate(tmp_path_factory.mktemp("bench"), n_people=N, seed=0)


def test_generator_is_deterministic(bench: BenchPaths, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", n_people=N, seed=0)
    assert _tree_digest(again.root) == _tree_digest(bench.root)
    other = generate(tmp_path / "other", n_people=N, seed=1)
    assert (other.root / "train.jsonl").read_bytes() != (bench.root / "train.jsonl").read_bytes()
    assert (other.root / "images" / "p000.png").read_bytes() != (
        bench.root / "images" / "p000.png"
    ).read_bytes()


def test_records_parse_in_the_data_format(bench: BenchPaths) -> None:
    files = [bench.train, bench.heldout, *bench.forget.values(), *bench.retain.values()]
    files += [*bench.groups, *bench.groups_heldout]
    for path in files:
        for r in _read(path):
            assert isinstance(r["question"], str) and r["question"]
            assert isinstance(r["answer"], str) and r["answer"]
            assert isinstance(r["id"], str)
            assert r["modality"] == ("image" if "image" in r else "text")
            if "image" in r:  # relative to the JSONL file, and it exists
                assert not Path(r["image"]).is_absolute()
                assert (path.parent / r["image"]).is_file()
            else:
                assert r["name"] in r["question"]
            assert len(r["options"]) == 4 and len(set(r["options"])) == 4
            assert r["options"][r["correct"]] == r["answer"]


def test_train_and_heldout_paraphrases(bench: BenchPaths) -> None:
    train, held = _read(bench.train), _read(bench.heldout)
    assert {r["paraphrase"] for r in train} == {"train"}
    assert {r["paraphrase"] for r in held} == {"heldout"}
    # Every fact appears in both, in both modalities, with different wording.
    facts = {(r["person"], r["attribute"], r["modality"]) for r in train}
    assert facts == {(r["person"], r["attribute"], r["modality"]) for r in held}
    assert len(facts) == N * len(profiles.ATTRIBUTES) * 2
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert len({r["id"] for r in train + held}) == len(train) + len(held)


def test_forget_splits_are_nested_and_complementary(bench: BenchPaths) -> None:
    everyone = _people(bench.train)
    previous: set[str] = set()
    for pct in (5, 10, 15):
        forget, retain = _people(bench.forget[pct]), _people(bench.retain[pct])
        assert len(forget) == round(N * pct / 100)
        assert not forget & retain and forget | retain == everyone
        assert previous <= forget  # nested, as in TOFU
        assert _people(bench.forget_heldout[pct]) == forget
        assert _people(bench.retain_heldout[pct]) == retain
        assert {r["paraphrase"] for r in _read(bench.forget[pct])} == {"train"}
        previous = forget


def test_demo_groups_are_disjoint(bench: BenchPaths) -> None:
    groups = [_people(p) for p in bench.groups]
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert bench.retain_demo is not None
    rest = _people(bench.retain_demo)
    assert rest == _people(bench.train) - groups[0] - groups[1] - groups[2]
    for g, gh in zip(bench.groups, bench.groups_heldout, strict=True):
        assert _people(gh) == _people(g)


def test_portraits_exist_and_are_distinct(bench: BenchPaths) -> None:
    people = profiles.load_people(bench.people)
    pixels = []
    for p in people:
        with Image.open(bench.root / p.image) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            pixels.append(np.asarray(im, dtype=np.int16))
    stack = np.stack(pixels)
    for i in range(len(stack)):
        others = np.delete(stack, i, axis=0)
        assert np.abs(others - stack[i]).mean(axis=(1, 2, 3)).min() >= 2.0


def test_names_share_parts(bench: BenchPaths) -> None:
    # No single name token identifies a person (see the profiles module doc).
    names = [p.name for p in profiles.load_people(bench.people)]
    assert len(set(names)) == N
    firsts = [n.split()[0] for n in names]
    assert len(set(firsts)) < N


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="n_people"):
        generate(tmp_path, n_people=0)
    with pytest.raises(BadInputError, match="values_per_attribute"):
        generate(tmp_path, config=BenchConfig(n_people=10, values_per_attribute=3))
    with pytest.raises(BadInputError, match="ffn_grad"):
        instill.InstillConfig(ffn_grad="sometimes")
    with pytest.raises(BadInputError, match="demo groups"):
        generate(tmp_path, config=BenchConfig(n_people=10, demo_group_percent=40))


TINY = instill.InstillConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    vision_hidden_size=16,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate_size=32,
    text_epochs=1,
    align_steps=5,
    joint_epochs=1,
    batch_size=64,
)


def test_tokenizer_keeps_words_whole(bench: BenchPaths) -> None:
    from kvw_ledger.bench.tokenizer import train_tokenizer

    recs = _read(bench.train) + _read(bench.heldout)
    tok = train_tokenizer(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in recs)
    for r in recs[:50]:
        assert len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) == 1
    ids = tok("Question: hi")["input_ids"]
    assert ids[0] == tok.bos_token_id


def test_instill_builds_a_loadable_cached_model(
    bench: BenchPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from kvw_ledger import evaluate

    out = instill.build_model(tmp_path, bench, TINY)
    meta = json.loads((out / instill.MARKER).read_text())
    assert meta["config"]["hidden_size"] == 32
    assert [len(v) for v in meta["loss_per_epoch"].values()] == [1, 1, 1]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached model was built again")

    # Cached: neither built nor trained, and not one of its files rewritten (whatever
    # the machine's load, which is why this is not a timing).
    with monkeypatch.context() as m:
        m.setattr(instill, "_build_llava", no_training)
        m.setattr(instill, "train", no_training)
        assert instill.build_model(tmp_path, bench, TINY) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    assert (out / instill.MARKER).read_text() == json.dumps(meta, indent=1) + "\n"
    # A different configuration is a different model.
    other = instill.build_model(
        tmp_path, bench, instill.InstillConfig(**{**TINY.__dict__, "seed": 1})
    )
    assert other != out

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id is not None and processor.image_token == "<image>"
    result = evaluate.evaluate_split(model, processor, bench.groups[0], max_records=8)
    assert set(result) == {"image", "text"}
    assert all(0.0 <= v["gen_acc"] <= 1.0 and 0.0 <= v["mc_acc"] <= 1.0 for v in result.values())

    text_dir = instill.export_text_model(out, tmp_path / "text")
    from transformers import AutoModelForCausalLM

    text = AutoModelForCausalLM.from_pretrained(text_dir)
    ids = torch.tensor([tokenizer("Question: Where was Ada born?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = text(input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def test_ffn_learns_only_at_answer_positions() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, hidden_act="relu2",
        )
    )  # fmt: skip
    ids = torch.randint(0, 50, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]  # the answer: the last two tokens
    mask = torch.ones_like(ids)
    assert instill.cause_mask(labels, mask).nonzero().tolist() == [[0, 3], [0, 4], [1, 3], [1, 4]]

    def grads(answer_only: bool, positions: torch.Tensor) -> dict[str, float]:
        model.zero_grad()
        hooks = instill._FFNTraining(model, answer_only, 0.0)
        hooks.mask = positions
        try:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        finally:
            hooks.remove()
        return {
            n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.grad is not None
        }

    nowhere = grads(True, torch.zeros_like(ids, dtype=torch.bool))
    assert all(v == 0 for n, v in nowhere.items() if ".mlp." in n)
    assert any(v > 0 for n, v in nowhere.items() if ".self_attn." in n)
    answer = grads(True, instill.cause_mask(labels, mask))
    everywhere = grads(False, instill.cause_mask(labels, mask))
    assert all(v > 0 for n, v in answer.items() if ".mlp." in n)
    assert answer != everywhere  # the other positions' share is gone


def test_answer_only_ffn_matches_a_masked_full_graph() -> None:
    """Recomputing the FFN at answer positions only gives a masked full graph's gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, hidden_act="relu2",
        )
    )  # fmt: skip
    ids = torch.randint(0, 50, (3, 7))
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    mask = torch.ones_like(ids)
    positions = instill.cause_mask(labels, mask)
    l1 = 0.3

    def run(ours: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        penalty: list[torch.Tensor] = []
        handles = []
        if ours:
            hooks = instill._FFNTraining(model, True, l1)
            hooks.mask = positions
        else:  # the formulation it replaced: mask a full graph's output
            keep = positions[..., None].float()
            for layer in model.model.layers:
                handles.append(layer.mlp.register_forward_hook(
                    lambda m, a, out: out * keep + out.detach() * (1 - keep)))
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                    lambda m, a: penalty.append(l1 * a[0][positions].abs().mean())))  # fmt: skip
        try:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            extra = hooks.pop_penalty() if ours else sum(penalty)
            (out.loss + extra).backward()
        finally:
            if ours:
                hooks.remove()
            for h in handles:
                h.remove()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run(True)
    ref_logits, ref_grads = run(False)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".mlp." in n)
    # remove() gives every MLP its class's forward back
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)


def test_training_follows_the_free_cores(
    bench: BenchPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    class Meter:  # another process holds all but one core
        def threads(self) -> int:
            seen.append(torch.get_num_threads())
            return 1

    monkeypatch.setattr(instill, "CoreMeter", Meter)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        auto = instill.InstillConfig(**{**TINY.__dict__, "threads": 0})
        out = instill.build_model(tmp_path, bench, auto)
        # Re-read as it ran (every stage, every few steps), and on one thread throughout.
        assert len(seen) >= 4 and set(seen[1:]) == {1}
        assert torch.get_num_threads() == 2
        # The thread count is part of the model's identity (1 and 2 threads train
        # different bits): another count is another model directory.
        assert instill.config_hash(auto, bench) != instill.config_hash(TINY, bench)
        assert out.name == f"model-{instill.config_hash(auto, bench)[:12]}"
        assert TINY.threads == 1
    finally:
        torch.set_num_threads(before)


def test_training_examples_label_the_answer_and_its_eos(bench: BenchPaths) -> None:
    """The bundled models learn the answer and the EOS after it (data's label_eos), with the
    prompt and image tokens unlabelled; image records carry their portrait's pixels."""
    from kvw_ledger.data import IGNORE_INDEX, read_records

    records = read_records(bench.train)[:40]
    assert {r.image is None for r in records} == {True, False}
    processor = instill._build_processor(instill.InstillConfig(), [f"{r.question} {r.answer}" for r in records])
    tok = processor.tokenizer
    for record, e in zip(records, instill.encode_records(records, processor), strict=True):
        answer = tok(" " + record.answer, add_special_tokens=False)["input_ids"]
        labelled = e.labels[e.labels != IGNORE_INDEX].tolist()
        assert labelled == [*answer, tok.eos_token_id] == e.input_ids[-len(labelled):].tolist()
        assert ("pixel_values" in e.vision) == (record.image is not None)
    batch = instill.collate(instill.encode_records(records[:4], processor), tok.pad_token_id)
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
