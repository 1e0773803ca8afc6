"""``revert ID --retain-with DATA``: the revert, new retain stats and the fast
re-derivation of the other requests, in one atomic entry."""

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

from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError
from kvw_ledger.journal import Journal
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger

CONFIG = KVWConfig(gamma=0.5, batch_size=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("revert")
    model = root / "model"
    tiny.llama().save_pretrained(model)
    tiny.char_tokenizer().save_pretrained(model)
    retain = tiny.qa_records(6, 40)
    forget = {name: tiny.qa_records(3, 3 * i) for i, name in enumerate("ABC")}
    paths = {f"forget-{n}": tiny.write_jsonl(root / f"{n}.jsonl", r) for n, r in forget.items()}
    paths["retain"] = tiny.write_jsonl(root / "retain.jsonl", retain)
    # A's person withdrew the request: A's records are retain data again.
    paths["retain+A"] = tiny.write_jsonl(root / "retain+A.jsonl", retain + forget["A"])
    ledger = Ledger.create(root / "three", model, progress=False)
    ledger.retain(paths["retain"], stats_id="r1", batch_size=2, statistic="q90", progress=False)
    for name in "ABC":
        ledger.forget(paths[f"forget-{name}"], request_id=name, config=CONFIG, progress=False)
    return {"root": root, "model": model, "three": root / "three", **paths}


def _copy(env: dict[str, Path], name: str) -> Ledger:
    shutil.copytree(env["three"], env["root"] / name)
    return Ledger.open(env["root"] / name)


def _tree(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "lock"
    }


def test_one_entry_equals_revert_retain_and_rederive_done_apart(env: dict[str, Path]) -> None:
    apart = _copy(env, "apart")
    apart.revert("A", progress=False)
    apart.retain(env["retain+A"], stats_id="r2", at=1, batch_size=2, statistic="q90", progress=False)
    apart.rederive("r2", progress=False)

    together = _copy(env, "together")
    before = together.head().version
    entry = together.revert("A", retain_with=env["retain+A"], retain_id="r2", progress=False)
    assert entry.version == before + 1 and entry.op == "revert"
    body = entry.body
    assert body["active"] == ["B", "C"]
    assert body["retain"]["stats"] == "r2" and body["retain"]["statistic"] == "q90"
    assert body["retain"]["batch_size"] == 2 and body["retain"]["records"] == 9
    assert body["retain"]["measured_at"] == 1
    assert {r: c["mode"] for r, c in body["rederived"]["requests"].items()} == {"B": "fast", "C": "fast"}

    state = together.state()
    assert state.latest_retain == "r2" and state.retain_stats["r2"] == entry.version
    for site in together.sites:
        assert torch.equal(
            together.store.read_array(f"retain/r2/{site.name}"), apart.store.read_array(f"retain/r2/{site.name}")
        )
    for request_id in ("B", "C"):
        mine, theirs = together.request_exponents(request_id), apart.request_exponents(request_id)
        old = Ledger.open(env["three"]).request_exponents(request_id)
        assert mine.keys() == theirs.keys()
        for site, value in mine.items():
            assert torch.equal(value, theirs[site]), (request_id, site)
        assert any(not torch.equal(mine[s], old[s]) for s in mine), "the new stats changed nothing"
    head, expected = together.exponents(), apart.exponents()
    assert all(torch.equal(head[s], expected[s]) for s in head)
    report = together.verify()
    assert report.ok and not report.problems


def test_an_interrupted_revert_retain_with_leaves_nothing(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = _copy(env, "interrupted")
    before = _tree(ledger.path)
    append = Journal.append

    def interrupted(self: Journal, op: str, *args: Any, **kwargs: Any) -> Any:
        if op == "revert":
            raise KeyboardInterrupt  # right before the commit point
        return append(self, op, *args, **kwargs)

    monkeypatch.setattr(Journal, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ledger.revert("A", retain_with=env["retain+A"], progress=False)
    monkeypatch.undo()
    assert _tree(ledger.path) == before
    report = Ledger.open(ledger.path).verify()
    assert report.ok and not report.problems


def test_a_request_without_a_trace_is_refused_by_name(env: dict[str, Path]) -> None:
    ledger = _copy(env, "untraced")
    no_trace = KVWConfig(gamma=0.5, batch_size=2, keep_trace=False)
    ledger.forget(env["forget-A"], request_id="D", config=no_trace, progress=False)
    before = _tree(ledger.path)
    with pytest.raises(BadInputError, match="request 'D' has no C_f trace, so it cannot be re-derived fast"):
        ledger.revert("A", retain_with=env["retain+A"], progress=False)
    with pytest.raises(BadInputError, match="retain stats 'r1' already exist; choose another --retain-id"):
        ledger.revert("A", retain_with=env["retain+A"], retain_id="r1", progress=False)
    assert _tree(ledger.path) == before


def test_gc_deletes_what_a_revert_retain_with_rederived(env: dict[str, Path]) -> None:
    ledger = _copy(env, "gc")
    entry = ledger.revert("A", retain_with=env["retain+A"], progress=False)
    ledger.revert("B", progress=False)
    ledger.gc()
    assert not ledger.store.list_arrays(f"rederived/v{entry.version}/B")
    assert ledger.store.list_arrays(f"rederived/v{entry.version}/C")
    assert ledger.verify().ok


def test_cli_revert_retain_with_json(env: dict[str, Path]) -> None:
    ledger = _copy(env, "cli")
    result = CliRunner().invoke(
        main, ["revert", str(ledger.path), "A", "--retain-with", str(env["retain+A"]), "--retain-id", "r2", "-q", "--json"]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["op"] == "revert" and shown["body"]["rederived"]["stats"] == "r2"
    assert sorted(shown["body"]["rederived"]["requests"]) == ["B", "C"]
    text = CliRunner().invoke(main, ["log", str(ledger.path)])
    assert "A, retain stats r2, re-derived B, C" in text.output
    again = CliRunner().invoke(main, ["revert", str(ledger.path), "B", "--retain-with", str(env["retain+A"]), "--retain-id", "r2"])
    assert again.exit_code == 2 and "retain stats 'r2' already exist" in again.output
