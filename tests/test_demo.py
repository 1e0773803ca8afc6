"""The main job runs end to end on a very small configuration and writes its report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from kvw_ledger.bench.instill import InstillConfig
from kvw_ledger.certify import check_certificate
from kvw_ledger.demo import DemoConfig, run_demo
from kvw_ledger.ledger import Ledger

# A model small enough to train in seconds: the test checks the job's plumbing,
# not what the model learns (docs/demo-model.md measures that).
TINY = InstillConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vision_hidden_size=16,
    vision_layers=1, vision_heads=2, vision_intermediate_size=32, text_epochs=1, align_steps=5,
    joint_epochs=1, batch_size=64,
)  # fmt: skip


def test_demo_runs_the_whole_life_of_a_ledger(tmp_path: Path) -> None:
    lines: list[str] = []
    threads = torch.get_num_threads()
    config = DemoConfig(
        n_people=20, instill=TINY, layers=(0, 1), batch_size=4, retain_records=40, eval_records=20,
        threads=threads + 1,
        quantize=("int4",),  # the audit tests cover every scheme; here the demo's plumbing
    )  # fmt: skip
    report = run_demo(tmp_path, echo=lines.append, config=config)
    # It ran with config.threads but gave the caller's count back: a process
    # that forks later (the crash tests do) must not inherit a bigger OpenMP pool.
    assert torch.get_num_threads() == threads
    assert [r["step"] for r in report["rows"]] == [
        "before", "forget group-1", "forget group-2", "forget group-3", "revert group-2",
    ]
    assert [r["active"] for r in report["rows"]] == [
        [], ["group-1"], ["group-1", "group-2"], ["group-1", "group-2", "group-3"], ["group-1", "group-3"],
    ]
    assert report["verify"]["ok"] is True
    # The revert re-derived the other two requests with retain stats holding group 2's data.
    assert any(line.strip() == "re-derived with the withdrawn data as retain data: group-1, group-3" for line in lines)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["rows"] == report["rows"]
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "export" / "kvw_provenance.json").is_file()
    assert "| version | step | active |" in (tmp_path / "report.md").read_text()
    assert any(line.startswith("verify: ok") for line in lines)
    # group-1's audit, quantized figures included, and its certificate beside report.md
    audit = report["audit"]["body"]
    assert audit["request"] == "group-1" and set(audit["results"]["quantized"]) == {"int4"}
    assert "## Audit of group-1" in (tmp_path / "report.md").read_text()
    certificate = tmp_path / "certificate.json"
    assert certificate.read_text().startswith('{"statement": "ERASURE IN EFFECT: request group-1')
    checked = check_certificate(certificate, public_key=tmp_path / "demo-issuer.pub",
                                ledger=Ledger.open(tmp_path / "ledger"))
    assert checked.ok and checked.signed and checked.model_checked, checked.to_json()
    # A second run reuses the trained model (cached by its configuration's hash), and
    # replays the same weights, so every evaluation is a hit: no new figures measured.
    models = sorted((tmp_path / "models").iterdir())
    measured = sorted((tmp_path / "eval-cache").iterdir())
    assert len(measured) >= 5  # the versions' splits and the audit's probes
    again = run_demo(tmp_path, echo=None, config=config)
    assert sorted((tmp_path / "models").iterdir()) == models
    assert sorted((tmp_path / "eval-cache").iterdir()) == measured
    assert again["rows"] == report["rows"]
    # ... also when it picks its thread count from the free cores (threads=0), and
    # without the audit (covered above; its model copies are the slow part).
    run_demo(tmp_path, echo=None, config=replace(config, threads=0, audit=False))
    assert sorted((tmp_path / "models").iterdir()) == models
    assert torch.get_num_threads() == threads


def test_the_evaluation_cache_misses_when_a_weight_changes(tmp_path: Path) -> None:
    from kvw_ledger.bench.instill import build_model
    from kvw_ledger.bench.profiles import BenchConfig, generate
    from kvw_ledger.data import read_records
    from kvw_ledger.demo import _EvalCache
    from kvw_ledger.loading import load_model, load_processor

    paths = generate(tmp_path / "data", config=BenchConfig(n_people=20, seed=0))
    model_dir = build_model(tmp_path / "models", paths, TINY)
    model, processor = load_model(model_dir), load_processor(model_dir)
    records = read_records(paths.groups[0])[:4]
    cache = _EvalCache(tmp_path / "cache", model_dir)
    first = cache(model, processor, records)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert cache(model, processor, records) == first  # a hit
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    cache(model, processor, records)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # measured afresh
    cache(model, processor, records[:3])
    assert len(list((tmp_path / "cache").iterdir())) == 3  # other records: another entry


def test_targets_include_the_groups_not_yet_requested() -> None:
    from kvw_ledger.demo import _passes, _targets

    def row(step: str, **acc: tuple[float, float]) -> dict:
        return {"step": step, "metrics": {s: {"image": {"gen_acc": a[0]}, "text": {"gen_acc": a[1]}}
                                          for s, a in acc.items()}}  # fmt: skip

    full = (1.0, 1.0)
    rows = [
        row("before", **{"group-1": full, "group-2": full, "group-3": full, "retain": full}),
        row("forget group-1", **{"group-1": (0.2, 0.1), "group-2": (0.96, 0.9), "group-3": (1.0, 0.99), "retain": full}),
        row("forget group-2", **{"group-1": (0.2, 0.1), "group-2": (0.2, 0.2), "group-3": (0.97, 0.94), "retain": full}),
        row("forget group-3", **{"group-1": (0.2, 0.1), "group-2": (0.2, 0.2), "group-3": (0.2, 0.2), "retain": full}),
        row("revert group-2", **{"group-1": (0.2, 0.1), "group-2": (0.93, 0.9), "group-3": (0.2, 0.2), "retain": full}),
    ]  # fmt: skip
    checks = _targets(rows)
    spared = {k: v for k, v in checks.items() if k.startswith("groups not yet requested")}
    assert spared == {
        "groups not yet requested, image, after group-1 (>= 0.95 of before)": 0.96,
        "groups not yet requested, text, after group-1 (>= 0.95 of before)": 0.9,
        "groups not yet requested, image, after group-2 (>= 0.95 of before)": 0.97,
        "groups not yet requested, text, after group-2 (>= 0.95 of before)": 0.94,
    }
    assert [_passes(k, v) for k, v in spared.items()] == [True, False, True, False]
    assert len(checks) == 20
