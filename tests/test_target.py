"""Forget to a target: the gamma search, and ``forget --target-forget`` end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from click.testing import CliRunner

from kvw_ledger import evaluate
from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError, TargetNotReachedError
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.sites import site_weight
from kvw_ledger.target import TargetSearch, Trial, search

# --- the search alone ----------------------------------------------------------------------


def linear(stable_below: float = float("inf")):
    """Accuracy falls linearly with gamma, from 1 at 0 to 0 at 4."""

    def trial(gamma: float) -> Trial:
        stable = gamma < stable_below
        return Trial(gamma, max(0.0, 1 - gamma / 4), stable, [] if stable else ["attenuation x"])

    return trial


@pytest.mark.parametrize("start", [0.05, 0.5, 3.0, 30.0])
def test_search_finds_the_smallest_gamma_that_reaches_the_target(start: float) -> None:
    chosen, trials = search(linear(), start, TargetSearch(0.3, steps=12, tolerance=1.01))
    # 1 - g / 4 <= 0.3 from g = 2.8 on: the chosen gamma reaches it, within 1% of 2.8.
    assert chosen.reached(0.3) and 2.8 <= chosen.gamma <= 2.8 * 1.01 + 1e-9
    assert trials[0].gamma == start and chosen in trials
    reached = [t.gamma for t in trials if t.reached(0.3)]
    assert chosen.gamma == min(reached)
    assert all(t.gamma < chosen.gamma for t in trials if not t.reached(0.3))


def test_search_refuses_when_nothing_reaches_the_target_listing_every_trial() -> None:
    spec = TargetSearch(0.3, max_doublings=3)
    never = lambda gamma: Trial(gamma, 0.9, True)  # noqa: E731
    with pytest.raises(TargetNotReachedError, match="no gamma up to 8 reached forget accuracy 0.3") as e:
        search(never, 1.0, spec)
    message = str(e.value)
    for gamma in ("1", "2", "4", "8"):
        assert f"gamma {gamma}: forget acc 0.900" in message
    assert "nothing was committed" in message


def test_search_refuses_when_the_smallest_reaching_gamma_is_unstable() -> None:
    with pytest.raises(TargetNotReachedError, match=r"the smallest gamma that reached forget accuracy 0.3, 2\.\d+, failed attenuation x") as e:
        search(linear(stable_below=2.0), 1.0, TargetSearch(0.3))
    assert "(unstable)" in str(e.value)


def test_a_target_outside_0_1_is_bad_input() -> None:
    with pytest.raises(BadInputError, match=r"--target-forget must be an accuracy in \[0, 1\], not 1.5"):
        TargetSearch(1.5)


# --- end to end on a ledger -----------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("target")
    model = root / "model"
    tiny.llama().save_pretrained(model)
    tiny.char_tokenizer().save_pretrained(model)
    ledger = Ledger.create(root / "led", model, progress=False)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(6, 40))
    ledger.retain(retain, progress=False)
    first = tiny.write_jsonl(root / "first.jsonl", tiny.qa_records(2, 20))
    ledger.forget(first, request_id="first", config=KVWConfig(gamma=0.5), progress=False)
    return {"root": root, "led": root / "led", "forget": tiny.write_jsonl(root / "f.jsonl", tiny.qa_records(3))}


@pytest.fixture
def norm_accuracy(monkeypatch: pytest.MonkeyPatch, env: dict[str, Path]) -> list[float]:
    """Stands in for generation accuracy: layer 1's remaining share of its base norm, read
    from the model each trial measures (so a trial that did not start from HEAD, or a
    measurement of the wrong model, shows)."""
    ledger = Ledger.open(env["led"])
    site = next(s for s in ledger.sites if s.layer == 1)
    base_norm = float(ledger.base(site.name).float().norm())
    seen: list[float] = []

    def fake(model: Any, processor: Any, path: Any, **_: Any) -> dict[str, dict[str, float]]:
        share = float(site_weight(model, site).float().norm()) / base_norm
        seen.append(share)
        return {"text": {"gen_acc": share}}

    monkeypatch.setattr(evaluate, "evaluate_split", fake)
    return seen


def _copy(env: dict[str, Path], name: str) -> Path:
    shutil.copytree(env["led"], env["root"] / name)
    return env["root"] / name


def _tree(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != "lock"}  # fmt: skip


def test_forget_to_a_target_commits_the_smallest_gamma_found(env: dict[str, Path], norm_accuracy: list[float]) -> None:
    path = _copy(env, "ok")
    ledger = Ledger.open(path)
    before = ledger.head().version
    config = KVWConfig(gamma=0.05, layers=(0, 3), batch_size=2)
    entry = ledger.forget(env["forget"], request_id="B", config=config, forget_probe=env["forget"],
                          target=TargetSearch(0.97), progress=False)  # fmt: skip
    assert entry.version == before + 1
    searched = entry.body["target"]
    trials = searched["trials"]
    assert len(trials) == len(norm_accuracy) >= 3 and trials[0]["gamma"] == 0.05
    chosen = searched["chosen_gamma"]
    assert entry.body["params"]["gamma"] == chosen
    assert all(t["forget_acc"] > 0.97 for t in trials if t["gamma"] < chosen)
    assert next(t for t in trials if t["gamma"] == chosen)["forget_acc"] <= 0.97
    assert [t["forget_acc"] for t in trials] == norm_accuracy  # each trial measured its own model
    # The committed request is the plain request at the chosen gamma, bit for bit.
    plain = Ledger.open(_copy(env, "plain"))
    plain.forget(env["forget"], request_id="B", config=KVWConfig(gamma=chosen, layers=(0, 3), batch_size=2),
                 progress=False)  # fmt: skip
    mine, theirs = ledger.request_exponents("B"), plain.request_exponents("B")
    assert all(torch.equal(mine[s], theirs[s]) for s in mine)
    assert ledger.verify().ok


def test_an_unreachable_target_exits_1_listing_the_trials_and_writes_nothing(
    env: dict[str, Path], norm_accuracy: list[float]
) -> None:
    path = _copy(env, "refused")
    before = _tree(path)
    result = CliRunner().invoke(main, [
        "forget", str(path), str(env["forget"]), "--id", "B", "--gamma", "0.05", "--layers", "0:3",
        "--forget-probe", str(env["forget"]), "--target-forget", "0.2", "--max-attenuation", "0.9", "-q",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "reached forget accuracy 0.2" in result.output
    assert "Tried: gamma 0.05: forget acc" in result.output and "nothing was committed" in result.output
    assert _tree(path) == before


def test_cli_target_forget_prints_the_search_and_json(env: dict[str, Path], norm_accuracy: list[float]) -> None:
    path = _copy(env, "cli")
    args = ["forget", str(path), str(env["forget"]), "--gamma", "0.05", "--layers", "0:3",
            "--forget-probe", str(env["forget"]), "--target-forget", "0.97", "-q"]  # fmt: skip
    text = CliRunner().invoke(main, [*args, "--id", "B"])
    assert text.exit_code == 0, text.output
    assert "  gamma 0.05" in text.output and "chose gamma " in text.output
    shown = json.loads(CliRunner().invoke(main, [*args, "--id", "C", "--json"]).stdout)
    assert shown["op"] == "forget" and shown["body"]["target"]["forget_acc"] == 0.97
    missing = CliRunner().invoke(main, ["forget", str(path), str(env["forget"]), "--target-forget", "0.3"])
    assert missing.exit_code == 2 and "--target-forget needs --forget-probe FILE" in missing.output
