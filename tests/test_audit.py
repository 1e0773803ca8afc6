"""Operators on entries, audits (efficacy, quantized, relearned), and old ledgers without operators."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from click.testing import CliRunner, Result

from kvw_ledger import data
from kvw_ledger.audit import audits_of
from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError
from kvw_ledger.evaluate import evaluate_records
from kvw_ledger.journal import canonical_json
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.quantize import parse_schemes, quantized_copy
from kvw_ledger.relearn import held_out, relearn


def with_choices(records: list[dict[str, Any]], people: int = 3) -> list[dict[str, Any]]:
    """Multiple-choice options (the answer first, then three others) and a person per record."""
    for i, r in enumerate(records):
        r["options"] = [r["answer"], "City 99", "Town 5", "Nowhere at all"]
        r["correct"] = 0
        r["person"] = f"p{i % people}"
    return records


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    paths = {
        "root": root,
        "retain": tiny.write_jsonl(root / "retain.jsonl", with_choices(tiny.qa_records(6, 30))),
        "forget": tiny.write_jsonl(root / "forget.jsonl", with_choices(tiny.qa_records(6))),
        "relearn": tiny.write_jsonl(root / "relearn.jsonl", with_choices(tiny.qa_records(6))[:2]),
        "other": tiny.write_jsonl(root / "other.jsonl", tiny.qa_records(2, 20)),
        "ledger": root / "led",
    }
    ledger = Ledger.create(paths["ledger"], root / "model", progress=False)
    ledger.retain(paths["retain"], progress=False)
    strong = KVWConfig(gamma=2.0, layers=(0, 3))
    ledger.forget(paths["forget"], request_id="a", config=strong, limits=ledger.limits(on_fail="warn"), progress=False)
    ledger.forget(paths["other"], request_id="b", config=KVWConfig(gamma=0.2, layers=(0, 3)),
                  limits=ledger.limits(on_fail="warn"), progress=False)
    return paths


def test_audit_produces_every_figure_and_changes_no_weight(env: dict[str, Path]) -> None:
    led = env["ledger"]
    ledger = Ledger.open(led)
    before_files = tree(led)
    head_before = ledger.exponents("HEAD")
    result = run(
        "audit", led, "a", "--forget-probe", env["forget"], "--retain-probe", env["retain"],
        "--quantize", "8,4", "--relearn-data", env["relearn"], "--relearn-steps", "3",
        "--relearn-lr", "1e-3", "--operator", "auditor@lab", "-q", "--json",
    )
    shown = json.loads(result.output)
    assert shown["op"] == "audit" and shown["operator"] == "auditor@lab"
    body = shown["body"]
    assert body["request"] == "a" and body["version"] == 4 and body["before"] == 2
    res = body["results"]
    for label in ("after", "before"):
        for kind in ("forget", "retain"):
            figures = res["efficacy"][label][kind]
            assert {"gen_acc", "rouge_l", "mc_acc", "n"} <= set(figures)
            assert 0 <= figures["gen_acc"] <= 1 and 0 <= figures["mc_acc"] <= 1
    assert list(res["quantized"]) == ["int4", "int8", "nf4"]  # canonical JSON sorts keys
    assert body["quantization"]["schemes"] == ["int8", "int4", "nf4"]
    for row in res["quantized"].values():
        assert set(row) == {"after", "before", "resurfacing"}
        for metric in ("gen_acc", "mc_acc"):
            r = row["resurfacing"][metric]
            assert r["resurfaced"] == pytest.approx(row["after"]["forget"][metric] - res["efficacy"]["after"]["forget"][metric])
    relearned = res["relearned"]
    assert relearned["after"]["pre"]["n"] == 2 == body["relearn"]["held_out"]  # p2, the person not taught
    assert set(relearned["recovery"]) == {"gen_acc", "mc_acc"}
    assert relearned["after"]["loss_last"] < relearned["after"]["loss_first"]

    # Each figure is what evaluate.py measures on that model: recompute two independently.
    model, processor = ledger.load(at=4, progress=False)
    records = [json.loads(line) for line in env["forget"].read_text().splitlines()]
    direct = evaluate_records(quantized_copy(model, "int4"), processor, records)["text"]
    assert res["quantized"]["int4"]["after"]["forget"]["mc_acc"] == pytest.approx(direct["mc_acc"])
    ledger.materialize(model, 2)
    direct = evaluate_records(model, processor, records)["text"]
    assert res["efficacy"]["before"]["forget"]["mc_acc"] == pytest.approx(direct["mc_acc"])

    # An audit adds one entry and changes no weight: every other file is byte-identical,
    # and the head's sums are bit-exact.
    after_files = tree(led)
    added = set(after_files) - set(before_files)
    assert added == {"journal/00000005.json"}
    changed = {k for k in before_files if before_files[k] != after_files[k]}
    assert all(k.startswith("head/") for k in changed)
    reopened = Ledger.open(led)
    for site, value in reopened.exponents("HEAD").items():
        assert tiny.same_bits(value, head_before[site])
    assert reopened.state().active == ["a", "b"]
    assert reopened.verify().ok

    # The entry holds fingerprints, never records.
    raw = (led / "journal" / "00000005.json").read_text()
    for r in records:
        assert r["question"] not in raw
    assert body["probes"]["forget"]["data_fingerprint"] == data.fingerprint(data.read_records(env["forget"]))
    assert body["relearn"]["data_fingerprint"] == data.fingerprint(data.read_records(env["relearn"]))

    # show and history read it.
    assert [e.version for e in audits_of(reopened, "a")] == [5]
    show = json.loads(run("show", led, "a", "--json").output)
    assert [a["version"] for a in show["audits"]] == [5]
    text = run("show", led, "5").output
    assert "operator auditor@lab" in text and "int4: forget after" in text
    assert "audits   version 5 (of 4)" in run("show", led, "a").output
    rows = json.loads(run("history", led, "--json").output)
    assert rows[-1]["op"] == "audit" and rows[-1]["audit"] == res
    assert "auditor@lab  a at version 4 against 2  active: a, b" in run("log", led).output


def test_quantized_copy_rounds_every_linear_weight_onto_its_grid() -> None:
    model = tiny.llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for scheme, levels in (("int8", 256), ("int4", 16), ("nf4", 16)):
        copy = quantized_copy(model, scheme, group_size=16)
        w0 = model.model.layers[1].mlp.down_proj.weight  # [16, 32]: two groups per row
        w = copy.model.layers[1].mlp.down_proj.weight
        assert not torch.equal(w, w0)
        for group in w.detach().reshape(-1, 16):
            assert len(group.unique()) <= levels
        if scheme != "nf4":  # round to nearest: within half a step of the original
            g0 = w0.detach().reshape(-1, 16)
            step = (g0.amax(1) - g0.amin(1)) / (levels - 1)
            if scheme == "int8":
                step = 2 * g0.abs().amax(1) / 255
            err = (w.detach().reshape(-1, 16) - g0).abs().amax(1)
            assert bool((err <= step * 0.5 + 1e-6).all())
        assert torch.equal(copy.lm_head.weight, model.lm_head.weight)  # the head is kept
        assert not torch.equal(copy.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    for k, v in model.state_dict().items():  # the source model is untouched
        assert torch.equal(v, original[k])
    gpt2 = tiny.gpt2()  # Conv1D holds [in, out]: groups run along the input
    q = quantized_copy(gpt2, "int4", group_size=16).transformer.h[0].mlp.c_proj.weight
    for column in q.detach().t().reshape(-1, 16):
        assert len(column.unique()) <= 16


def test_parse_schemes() -> None:
    assert parse_schemes("8,4") == ("int8", "int4", "nf4")
    assert parse_schemes("4, int8") == ("int4", "nf4", "int8")
    assert parse_schemes("none") == ()
    with pytest.raises(BadInputError, match="not '3'"):
        parse_schemes("3")


def test_held_out_by_question_and_by_person() -> None:
    probe = [{"question": "Q1?", "person": "p1"}, {"question": "q1", "person": "p9"},
             {"question": "Q2?", "person": "p2"}, {"question": "Q3?"}]
    taught = [{"question": "Q1?", "person": "p1"}, {"question": "other", "person": "p2"}]
    assert held_out(probe, taught) == [{"question": "Q3?"}]  # q1 matches Q1? once normalised
    with pytest.raises(BadInputError, match="covered by --relearn-data"):
        held_out(probe[:3], taught)


def test_relearn_fits_the_data_and_refuses_bad_settings(tmp_path: Path) -> None:
    model = tiny.llama()
    records = data.read_records(tiny.write_jsonl(tmp_path / "r.jsonl", tiny.qa_records(3)))
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    losses = relearn(model, tiny.char_tokenizer(), records, steps=8, lr=1e-2, batch_size=2)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert not model.training
    for kwargs, message in (({"steps": 0, "lr": 1e-5}, "--relearn-steps"),
                            ({"steps": 1, "lr": 0.0}, "--relearn-lr"),
                            ({"steps": 1, "lr": 1e-5, "batch_size": 0}, "--relearn-batch-size")):
        with pytest.raises(BadInputError, match=message):
            relearn(model, tiny.char_tokenizer(), records, **kwargs)


def test_audit_refusals_exit_2_and_write_nothing(env: dict[str, Path], tmp_path: Path) -> None:
    led = shutil.copytree(env["ledger"], tmp_path / "led")
    before = tree(led)
    probe = ("--forget-probe", env["forget"], "-q")
    cases = [
        (("audit", led, "nobody", *probe), "no request 'nobody' at version"),
        (("audit", led, "a", "--at", "2", *probe), "no request 'a' at version 2"),
        (("audit", led, "a", "--quantize", "3", *probe), "--quantize takes bit widths"),
        (("audit", led, "a", "--relearn-data", env["forget"], *probe), "covered by --relearn-data"),
        (("audit", led, "a", "--forget-probe", tmp_path / "none.jsonl"), "none.jsonl: no such data file"),
        (("audit", led, "a", "--operator", "", *probe), "--operator must name who acts"),
    ]
    for args, message in cases:
        result = run(*args, code=2)
        assert message in result.output, (args, result.output)
    Ledger.open(led).revert("a", progress=False)
    result = run("audit", led, "a", *probe, code=2)
    assert "request 'a' is not active at version 6; pass --at a version where it is, e.g. --at 3" in result.output
    assert set(tree(led)) - set(before) == {"journal/00000006.json"}  # the revert, no audit


def test_operator_defaults_to_environment_then_user_at_host(env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    led = shutil.copytree(env["ledger"], tmp_path / "led")
    monkeypatch.setenv("KVW_LEDGER_OPERATOR", "dpo@example.org")
    run("revert", led, "b")
    monkeypatch.delenv("KVW_LEDGER_OPERATOR")
    run("revert", led, "a", "--operator", "named")
    entries = Ledger.open(led).entries()
    assert [e.operator for e in entries[-2:]] == ["dpo@example.org", "named"]
    assert "@" in (entries[0].operator or "")  # user@host when nobody says
    monkeypatch.setenv("KVW_LEDGER_OPERATOR", "bad\nname")
    with pytest.raises(BadInputError, match="KVW_LEDGER_OPERATOR"):
        Ledger.open(led).gc()


def _strip_operators(led: Path) -> None:
    """Rewrites a ledger's journal as code before operators wrote it: no operator key,
    every digest and parent hash recomputed, the head cache gone (it names entry hashes)."""
    parent = None
    for path in sorted((led / "journal").glob("*.json")):
        content = json.loads(path.read_bytes())
        content.pop("operator")
        content.pop("digest")
        content["parent"] = parent
        content["digest"] = hashlib.sha256(canonical_json(content)).hexdigest()
        raw = canonical_json(content)
        path.write_bytes(raw)
        parent = hashlib.sha256(raw).hexdigest()
    shutil.rmtree(led / "head")


def test_old_ledgers_without_operators_still_open_and_verify(env: dict[str, Path], tmp_path: Path) -> None:
    led = shutil.copytree(env["ledger"], tmp_path / "old")
    _strip_operators(led)
    old = Ledger.open(led)
    assert all(e.operator is None for e in old.entries())
    report = old.verify()
    assert report.ok, report.to_json()
    assert run("verify", led).exit_code == 0
    assert "  -  " in run("log", led).output.splitlines()[0]
    assert "operator - (not recorded)" in run("show", led, "1").output
    # A new write appends an entry that names its operator; the mixed chain verifies.
    run("revert", led, "a", "--operator", "new-code")
    entries = Ledger.open(led).entries()
    assert entries[-1].operator == "new-code" and entries[-2].operator is None
    assert run("verify", led).exit_code == 0
    # ...and an old entry altered after the fact still fails.
    first = led / "journal" / "00000001.json"
    first.write_bytes(first.read_bytes().replace(b'"op":"init"', b'"op":"init","operator":"x"'))
    assert run("verify", led, code=1).exit_code == 1
