"""history and tune: figures computed from the ledger, warnings near limits, nothing committed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from click.testing import CliRunner

from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError
from kvw_ledger.history import build_history, plot_history
from kvw_ledger.kvw import KVWConfig, weakened
from kvw_ledger.ledger import Ledger
from kvw_ledger.tune import TuneRow, parse_buckets, parse_gammas, recommend
from kvw_ledger.weakening import Weakening


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hist")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(6, 30))
    tiny.write_jsonl(root / "f1.jsonl", tiny.qa_records(2))
    tiny.write_jsonl(root / "f2.jsonl", tiny.qa_records(2, 4))
    ledger = Ledger.create(root / "led", root / "model", progress=False)
    ledger.retain(root / "retain.jsonl", progress=False)
    ledger.probe(retain=root / "retain.jsonl", limits=ledger.limits(max_attenuation=0.15), progress=False)
    strong = KVWConfig(gamma=4.0, layers=(0, 3))
    ledger.forget(root / "f1.jsonl", request_id="a", config=strong, limits=ledger.limits(on_fail="warn"), progress=False)
    ledger.forget(root / "f2.jsonl", request_id="b", config=KVWConfig(gamma=0.2, layers=(0, 3)),
                  limits=ledger.limits(on_fail="warn"), progress=False)
    ledger.revert("a", progress=False)
    return root


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + oct(os.stat(path).st_mode).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_history_attenuation_is_the_norm_share_removed_at_each_version(ledger_dir: Path) -> None:
    result = CliRunner().invoke(main, ["history", str(ledger_dir / "led"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    ledger = Ledger.open(ledger_dir / "led")
    assert [r["op"] for r in rows] == ["init", "retain", "probe", "forget", "forget", "revert"]
    assert [r["active"] for r in rows] == [[], [], [], ["a"], ["a", "b"], ["b"]]
    for row in rows:
        exponents = ledger.exponents(row["version"])
        for site in ledger.sites:
            base = ledger.base(site.name).float()
            share = 1 - float(weakened(base, Weakening(exponents), site.name, site.axis).norm() / base.norm())
            assert row["attenuation"][str(site.layer)] == pytest.approx(share, abs=1e-6)
    assert rows[0]["attenuation"] == {str(layer): 0.0 for layer in range(4)}
    version_a = rows[3]
    assert max(version_a["attenuation"].values()) > 0.15
    assert any("of its budget 0.15" in w for w in version_a["warnings"])
    assert any("committed despite failed check attenuation" in w for w in version_a["warnings"])
    assert set(rows[3]["probes"]) == {"retain"}


def test_history_text_and_plot(ledger_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "h.png"
    result = CliRunner().invoke(main, ["history", str(ledger_dir / "led"), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.output.splitlines()
    assert lines[0].startswith("   1  init")
    assert "warning: " in result.output and lines[-1] == f"wrote {plot}"


def test_tune_commits_nothing_and_prints_the_sweep(ledger_dir: Path) -> None:
    led = ledger_dir / "led"
    before = tree_digest(led)
    result = CliRunner().invoke(main, ["tune", str(led), str(ledger_dir / "f1.jsonl"), str(ledger_dir / "retain.jsonl"),
                                       "--gammas", "0.1,1", "--layer-buckets", "0:1,2:9", "-q", "--json"])
    out = json.loads(result.stdout)
    assert [(r["gamma"], r["layers"]) for r in out["rows"]] == [(0.1, [0, 1]), (0.1, [2, 3]), (1.0, [0, 1]), (1.0, [2, 3])]
    assert out["limit"] == 0.05
    # The untrained tiny model answers nothing, so nothing can be forgotten: no recommendation.
    assert all(r["forget_drop"] <= 0 for r in out["rows"]) and out["recommended"] is None
    assert result.exit_code == 1, result.output
    assert tree_digest(led) == before
    assert torch.equal(Ledger.open(led).exponents()["model.layers.1.mlp.down_proj"],
                       Ledger.open(led).exponents(6)["model.layers.1.mlp.down_proj"])


def test_tune_with_nothing_that_forgets_prints_the_table_says_so_and_exits_1(ledger_dir: Path) -> None:
    led = ledger_dir / "led"
    args = ["tune", str(led), str(ledger_dir / "f1.jsonl"), str(ledger_dir / "retain.jsonl"),
            "--gammas", "1e-9", "--layer-buckets", "0:1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["gamma", "layers", "forget", "acc", "retain", "acc", "forget", "drop", "retain", "drop"]
    assert lines[2].split()[4] in ("0.000", "-0.000")
    assert lines[-1].startswith("Error: nothing to recommend: no setting forgets")
    assert "recommended:" not in result.output
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["recommended"] is None


def test_history_plot_labels_versions_with_whole_numbers(
    ledger_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    ticks: list[float] = []
    real = Figure.savefig

    def savefig(self: Figure, *args: Any, **kwargs: Any) -> None:
        self.canvas.draw()
        for axes in self.axes:
            ticks.extend(float(t.get_text().replace("\u2212", "-")) for t in axes.get_xticklabels() if t.get_text())
        real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot_history(build_history(Ledger.open(ledger_dir / "led")), tmp_path / "h.png")
    assert ticks and all(t == int(t) for t in ticks), ticks


def test_recommend_takes_the_largest_forget_drop_within_the_limit() -> None:
    rows = [
        TuneRow(0.1, (1, 2), 0.8, 0.99, 0.2, 0.01, True),
        TuneRow(0.5, (1, 2), 0.2, 0.80, 0.8, 0.20, False),
        TuneRow(0.2, (3, 4), 0.5, 0.97, 0.5, 0.03, True),
        TuneRow(0.3, (3, 4), 0.5, 0.97, 0.5, 0.03, True),
    ]
    best = recommend(rows)
    assert best is not None and (best.gamma, best.layers) == (0.2, (3, 4))
    assert recommend([rows[1]]) is None
    assert recommend([TuneRow(0.1, (1, 2), 0.8, 0.99, 0.0, 0.0, True)]) is None  # forgets nothing


def test_tune_option_parsing() -> None:
    assert parse_gammas("0.01, 0.1") == [0.01, 0.1]
    assert parse_buckets("1:8,9:16") == [(1, 8), (9, 16)]
    with pytest.raises(BadInputError, match="--gammas must be numbers"):
        parse_gammas("a,b")
    with pytest.raises(BadInputError, match="--layers must look like START:END"):
        parse_buckets("1-8")
