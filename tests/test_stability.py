"""Tests for stability checks, probes, re-derivation and gc (kvw_ledger.stability, the
ledger's checked verbs and their CLI faces).

Expected values are computed here from the model file and the stored arrays, never
through the ledger's own weight or check code.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from torch import nn

from kvw_ledger import data
from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError, RefNotFoundError
from kvw_ledger.fingerprint_cache import CACHE_NAME
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model
from kvw_ledger.sites import site_weight
from kvw_ledger.stability import (
    StabilityLimits,
    attenuation,
    check_exponents,
    check_zeroed,
    compare_probes,
    overflowing,
)
from kvw_ledger.store import tensor_hash
from kvw_ledger.weakening import Weakening

# gamma 0.5 is a power of two: gamma * A is exact, so a recomputation that multiplies
# and adds separately must agree bit for bit with one that fuses them.
GAMMA = 0.5
CONFIG = KVWConfig(gamma=GAMMA)
EPS = 1e-12
SITE_RE = r"model\.layers\.\d\.mlp\.down_proj"


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(
            f"{args}: exit {result.exit_code}, wanted {code}\n{result.output}", result.exception
        )
    return result


@dataclass(frozen=True)
class Env:
    root: Path
    model_dir: Path
    retained: Path  # init + retain (retain-2): no requests yet
    ledger: Path  # retained + A (trace), B (--no-trace), C (trace) + retain r2 at HEAD
    files: dict[str, Path]  # data files by name


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("stability")
    model_dir = root / "model"
    model: Any = tiny.llama()
    model.save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    files = {
        "retain": tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40)),
        "retain2": tiny.write_jsonl(root / "retain2.jsonl", tiny.qa_records(4, 60)),
        "a": tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(2, 0)),
        "b": tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 10)),
        "c": tiny.write_jsonl(root / "c.jsonl", tiny.qa_records(2, 20)),
        "d": tiny.write_jsonl(root / "d.jsonl", tiny.qa_records(1, 30)),
    }
    retained = root / "retained"
    Ledger.create(retained, model_dir, progress=False).retain(files["retain"], progress=False)
    shutil.copytree(retained, root / "led")
    ledger = Ledger.open(root / "led")
    ledger.forget(files["a"], request_id="A", config=CONFIG, progress=False)
    ledger.forget(
        files["b"], request_id="B", config=KVWConfig(gamma=GAMMA, keep_trace=False), progress=False
    )
    ledger.forget(files["c"], request_id="C", config=CONFIG, progress=False)
    ledger.retain(files["retain2"], stats_id="r2", at="HEAD", progress=False)
    return Env(root, model_dir, retained, root / "led", files)


@pytest.fixture(scope="module")
def live(env: Env) -> nn.Module:
    """One loaded model that tests materialise versions into."""
    return load_model(env.model_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root`` -> (mode, bytes): what 'nothing was written' means.

    Leaves out the model-fingerprint cache: no entry names it, and whether a command
    may record a file in it depends on the clock (a file changed within the cache's
    timestamp tick is "racy" and left out until a later command), so a refused write
    can fill it in legitimately; this made the check fail about once in a few runs.
    """
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
        if p.name != CACHE_NAME
    }


def _originals(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _arrays(ledger: Ledger, prefix: str) -> dict[str, torch.Tensor]:
    """The arrays directly under ``prefix``, by site."""
    return {
        n.rsplit("/", 1)[1]: ledger.store.read_array(n) for n in ledger.store.list_arrays(prefix)
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _chain_sum(ledger: Ledger, prefixes: list[str], site: str, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=torch.float32)
    for prefix in prefixes:  # chain order
        name = f"{prefix}/{site}"
        if ledger.store.has_array(name):
            total = total + ledger.store.read_array(name)
    return total


def _from_trace(trace: torch.Tensor, c_retain: torch.Tensor, gamma: float) -> torch.Tensor:
    """w = gamma * sum_b max(0, log(Cf_b + eps) - log(Cr + eps)), accumulated per batch in float32."""
    log_retain = torch.log(c_retain.float() + EPS)
    w = torch.zeros_like(log_retain)
    for c_forget in trace.float():  # (n_batches, d_ff) -> (d_ff,) per batch
        w = w + gamma * torch.clamp(torch.log(c_forget + EPS) - log_retain, min=0.0)
    return w


def _failed_figure(message: str, check: str, limit: str) -> float:
    """The figure a failed check reports, which must exceed its limit."""
    match = re.search(rf"{check}: (\S+) \(limit {re.escape(limit)}\) FAILED", message)
    assert match, f"no failed {check!r} with limit {limit} in: {message}"
    return float(match.group(1))


# --- stability.py on its own -------------------------------------------------------------


def test_limits_are_validated_with_a_message_naming_the_option() -> None:
    assert StabilityLimits().to_dict() == {
        "max_attenuation": 0.5,
        "max_retain_drop": 0.05,
        "max_nll_increase": 1.0,
        "max_zeroed": 0.25,
        "zero_floor": 0.001,
        "on_fail": "abort",
    }
    for bad, message in [
        ({"max_zeroed": 1.5}, r"--max-zeroed must be in \[0, 1\], not 1.5"),
        ({"max_zeroed": math.nan}, "--max-zeroed"),
        ({"zero_floor": 0.0}, r"--zero-floor must be in \(0, 1\), not 0.0"),
        ({"max_attenuation": 0.0}, r"--max-attenuation must be in \(0, 1\], not 0.0"),
        ({"max_attenuation": 2.0}, r"--max-attenuation must be in \(0, 1\], not 2.0"),
        ({"max_attenuation": math.nan}, "--max-attenuation"),
        ({"max_retain_drop": -0.1}, r"--max-retain-drop must be in \[0, 1\]"),
        ({"max_nll_increase": -1.0}, "--max-nll-increase must be >= 0"),
        ({"max_nll_increase": math.inf}, "--max-nll-increase must be >= 0"),
        ({"on_fail": "ignore"}, "--on-fail must be abort or warn"),
    ]:
        with pytest.raises(BadInputError, match=message):
            StabilityLimits(**bad)  # type: ignore[arg-type]


def test_check_exponents_counts_non_finite_and_negative_entries() -> None:
    good = torch.tensor([0.0, 1.5, 3.0])
    bad = torch.tensor([0.0, -1e-9, math.nan, math.inf, -math.inf, 2.0])
    checks = {c.name: c for c in check_exponents({"good": good, "bad": bad})}
    assert checks["numbers good"].passed and checks["numbers good"].value == 0
    assert not checks["numbers bad"].passed and checks["numbers bad"].value == 4


def test_attenuation_is_the_share_of_the_frobenius_norm_removed() -> None:
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w = torch.linspace(0, 2, 10)
    expected = 1 - float((base.double() * torch.exp(-w.double())).norm() / base.double().norm())
    assert attenuation(base, Weakening({"s": w}), "s", 1) == pytest.approx(expected, abs=1e-6)
    assert attenuation(base.T.contiguous(), Weakening({"s": w}), "s", 0) == pytest.approx(
        expected, abs=1e-6
    )  # Conv1D axis
    assert attenuation(base, Weakening({"s": torch.zeros(10)}), "s", 1) == 0.0
    assert attenuation(torch.zeros(6, 10), Weakening({"s": w}), "s", 1) == 0.0


def test_compare_probes_limits_retain_figures_and_records_forget_as_efficacy() -> None:
    limits = StabilityLimits(max_retain_drop=0.05, max_nll_increase=0.5)
    base = {"retain": {"acc": 0.9, "nll": 1.0}}
    previous = {"retain": {"acc": 0.86, "nll": 1.2}, "forget": {"acc": 0.9, "nll": 1.0}}
    staged = {"retain": {"acc": 0.85, "nll": 1.6}, "forget": {"acc": 0.0, "nll": 9.0}}
    checks = {c.name: c for c in compare_probes(staged, base, previous, limits)}
    assert set(checks) == {
        "retain accuracy drop vs base",
        "retain accuracy drop vs previous",
        "retain NLL increase vs base",
    }
    assert checks["retain accuracy drop vs base"].passed  # 0.05 drop: exactly at the limit
    assert checks["retain accuracy drop vs base"].value == pytest.approx(0.05)
    assert checks["retain accuracy drop vs previous"].passed
    assert not checks["retain NLL increase vs base"].passed
    assert checks["retain NLL increase vs base"].value == pytest.approx(0.6)
    worse = compare_probes({"retain": {"acc": 0.8, "nll": 1.0}}, base, previous, limits)
    assert [c.name for c in worse if not c.passed] == [
        "retain accuracy drop vs base",
        "retain accuracy drop vs previous",
    ]


# --- checks run on every step that changes HEAD, and land in its entry -------------------


def test_every_head_change_records_its_checks_and_attenuation(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("revert", path, "B")
    run("rederive", path, "--retain-stats", "r2", "A", "C")
    ledger = Ledger.open(path)
    originals = _originals(env.model_dir)
    checked = [e for e in ledger.entries() if e.op in ("forget", "revert", "rederive")]
    assert [e.op for e in checked] == ["forget", "forget", "forget", "revert", "rederive"]
    for entry in checked:
        stability = entry.body["stability"]
        assert stability["passed"] and stability["failed"] == [] and stability["on_fail"] == "abort"
        w = ledger.exponents(entry.version)
        for site in ledger.sites:
            base = originals[ledger.locations[site.name].key].double()
            share = 1 - float((base * torch.exp(-w[site.name].double())).norm() / base.norm())
            assert stability["attenuation"][site.name] == pytest.approx(share, abs=1e-6)
        assert stability["max_attenuation"] == max(stability["attenuation"].values())
    assert (
        checked[0].body["stability"]["attenuation"][ledger.sites[0].name] == 0.0
    )  # layer 0 untouched


# --- a failed check: nothing written, exit 1, each failure named with figure and limit --------


ABORTS = {
    "forget": (
        "forget",
        "{led}",
        "{d}",
        "--id",
        "D",
        "--gamma",
        "0.5",
        "--max-attenuation",
        "0.001",
        "-q",
    ),
    "revert": ("revert", "{led}", "A", "--max-attenuation", "0.001"),
    "rederive": (
        "rederive",
        "{led}",
        "--retain-stats",
        "r2",
        "A",
        "C",
        "--max-attenuation",
        "0.001",
    ),
}


@pytest.mark.parametrize("verb", sorted(ABORTS))
def test_a_broken_budget_aborts_leaving_every_file_unchanged(
    env: Env, tmp_path: Path, verb: str
) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    before = _tree(path)
    args = [a.format(led=path, d=env.files["d"]) for a in ABORTS[verb]]
    message = run(*args, code=1).output
    assert message.startswith("Error: the step failed ")
    assert "was not committed" in message and "--on-fail warn" in message
    failed = re.findall(rf"attenuation ({SITE_RE}): (\S+) \(limit 0\.001\) FAILED", message)
    assert {site for site, _ in failed} == {f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)}
    assert all(float(figure) > 0.001 for _, figure in failed)
    assert f"the step failed {len(failed)} stability check(s)" in message
    assert _tree(path) == before


def test_check_zeroed_counts_vectors_scaled_below_the_floor() -> None:
    w = torch.tensor([0.0, 6.0, 7.0, 50.0])  # factors 1, 2.5e-3, 9.1e-4, 2e-22
    checks, shares = check_zeroed(Weakening({"s": w}), 0.25, 1e-3)
    assert shares == {"s": 0.5} and not checks[0].passed and checks[0].name == "zeroed s"
    assert check_zeroed(Weakening({"s": w}), 0.5, 1e-3)[0][0].passed
    assert check_zeroed(Weakening({"s": w}), 0.25, 1e-2)[1] == {"s": 0.75}
    # a log-scale lifts every factor of its site: exp(5 - 7) is no longer under 1e-3
    assert check_zeroed(Weakening({"s": w}, {"s": torch.tensor(5.0)}), 0.25, 1e-3)[1] == {"s": 0.25}


def test_overflowing_names_non_finite_and_huge_exponents() -> None:
    assert overflowing({"s": torch.tensor([0.0, 110.0])}) is None  # zeroes a vector, no more
    assert "s has 1 non-finite" in str(overflowing({"s": torch.tensor([0.0, float("inf")])}))
    assert "s has 1 non-finite" in str(overflowing({"s": torch.tensor([float("nan"), 1.0])}))
    assert "largest 2.9e+31" in str(overflowing({"s": torch.tensor([2.9e31, 1.0])}))


def test_absurd_gamma_is_refused_even_with_on_fail_warn(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    before = _tree(path)
    message = run(
        "forget", path, env.files["d"], "--id", "D", "--gamma", "1e33", "--on-fail", "warn", "-q", code=1
    ).output
    assert "where float32 sums of exponents overflow" in message and "lower --gamma" in message
    assert _tree(path) == before
    # --gamma 1e6 (exponents near 1e6) is not overflow: the zeroed-vector limit refuses it
    message = run("forget", path, env.files["d"], "--id", "D", "--gamma", "1e6", "-q", code=1).output
    assert _failed_figure(message, rf"zeroed {SITE_RE}", "0.25") > 0.25
    assert _tree(path) == before


def test_the_zeroed_limit_is_set_by_probe_and_overridden_per_call(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    out = run("probe", path, "--max-zeroed", "0", "--zero-floor", "0.9", "-q").output
    assert "max_zeroed 0" in out and "zero_floor 0.9" in out
    message = run("forget", path, env.files["d"], "--id", "D", "--gamma", "0.5", "-q", code=1).output
    assert _failed_figure(message, rf"zeroed {SITE_RE}", "0") > 0
    run("forget", path, env.files["d"], "--id", "D", "--gamma", "0.5", "--max-zeroed", "1", "-q")
    body = Ledger.open(path).head().body
    assert body["stability"]["passed"]


def test_a_broken_probe_limit_set_on_the_ledger_aborts(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    out = run(
        "probe", path, "--retain", env.files["retain"], "--max-nll-increase", "0.000001", "-q"
    ).output
    assert "limits: max_nll_increase 1e-06\n" in out
    before = _tree(path)
    message = run(
        "forget", path, env.files["d"], "--id", "D", "--gamma", "0.5", "-q", code=1
    ).output
    assert _failed_figure(message, "retain NLL increase vs base", "1e-06") > 1e-6
    assert "attenuation" not in message.split("was not committed")[1]  # only failures are listed
    assert _tree(path) == before


def test_on_fail_warn_commits_and_show_reports_the_failure(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    output = run(
        "forget",
        path,
        env.files["d"],
        "--id",
        "D",
        "--gamma",
        "0.5",
        "--max-attenuation",
        "0.001",
        "--on-fail",
        "warn",
        "-q",
    ).output
    entry = Ledger.open(path).head()
    stability = entry.body["stability"]
    assert output.startswith(f"version {entry.version}: request D applied")
    for c in stability["failed"]:
        assert (
            f"Warning: committed although {c['name']} failed: {c['value']:.4g} (limit 0.001)\n"
            in output
        )
    assert (
        entry.body["request"] == "D" and not stability["passed"] and stability["on_fail"] == "warn"
    )
    assert sorted(c["name"] for c in stability["failed"]) == [
        f"attenuation model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)
    ]
    shown = run("show", path, "D").output
    line = next(x for x in shown.splitlines() if x.startswith("checks   "))
    assert line.startswith("checks   FAILED (warn: committed anyway); max attenuation ")
    for c in stability["failed"]:
        assert f"failed {c['name']}: {c['value']:.4g} > 0.001" in line
    assert json.loads(run("show", path, "D", "--json").output)["body"]["stability"] == stability
    assert run("verify", path).output.startswith("ok: ")


def test_limits_are_kept_per_ledger_and_overridden_per_call(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("probe", path, "--max-attenuation", "0.001")
    run("probe", path, "--max-retain-drop", "0.1")  # a second limit keeps the first
    assert Ledger.open(path).state().limits == {"max_attenuation": 0.001, "max_retain_drop": 0.1}
    before = _tree(path)
    message = run(
        "forget", path, env.files["d"], "--id", "D", "--gamma", "0.5", "-q", code=1
    ).output
    assert _failed_figure(message, "attenuation model.layers.1.mlp.down_proj", "0.001") > 0.001
    assert _tree(path) == before
    run(
        "forget",
        path,
        env.files["d"],
        "--id",
        "D",
        "--gamma",
        "0.5",
        "--max-attenuation",
        "0.9",
        "-q",
    )
    assert Ledger.open(path).state().active == ["A", "B", "C", "D"]


# --- probe sets ----------------------------------------------------------------------------


def _answer_figures(model: nn.Module, records: list[data.Record]) -> dict[str, float]:
    """NLL per answer token and greedy accuracy, from the model's own loss, one record at a time."""
    encoder = data.Encoder(tiny.char_tokenizer(), 256)
    total, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for record in records:
            example = encoder.encode(record)
            ids, labels = example.input_ids.unsqueeze(0), example.labels.unsqueeze(0)
            out = model(input_ids=ids, labels=labels, use_cache=False)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
            predicted = out.logits[0, :-1].argmax(-1)
            answer = labels[0, 1:] != -100
            correct += bool((predicted[answer] == labels[0, 1:][answer]).all())
    return {"acc": correct / len(records), "nll": total / tokens}


def test_probe_sets_are_stored_measured_and_forget_probes_are_efficacy_only(
    env: Env, tmp_path: Path, live: nn.Module
) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("probe", path, "--retain", env.files["retain"], "--general", env.files["b"], "-q")
    ledger = Ledger.open(path)
    entry = ledger.head()
    assert entry.op == "probe" and entry.body["limits"] == {}
    for kind, source in (("retain", env.files["retain"]), ("general", env.files["b"])):
        stored = entry.body["probes"][kind]
        assert stored["path"] == f"probes/v{entry.version}/{kind}/data.jsonl"
        assert stored["path"] in entry.files
        records = data.read_records(source)
        copied = data.read_records(path / stored["path"])
        assert [(r.question, r.answer) for r in copied] == [(r.question, r.answer) for r in records]
        assert stored["data_fingerprint"] == data.fingerprint(records)
        ledger.materialize(live, 1)
        assert stored["base"] == pytest.approx(_answer_figures(live, records), abs=1e-5)
        ledger.materialize(live, entry.version - 1)
        assert entry.body["figures"][kind] == pytest.approx(
            _answer_figures(live, records), abs=1e-5
        )

    # Forget-probe figures are recorded as efficacy and never held to a limit.
    run(
        "forget",
        path,
        env.files["d"],
        "--id",
        "D",
        "--gamma",
        "0.5",
        "--forget-probe",
        env.files["d"],
        "--max-nll-increase",
        "0.000001",
        "--on-fail",
        "warn",
        "-q",
    )
    ledger = Ledger.open(path)
    stability = ledger.head().body["stability"]
    assert set(stability["probes"]) == {"retain", "general", "forget"}
    ledger.materialize(live)
    forget_records = data.read_records(env.files["d"])
    assert stability["probes"]["forget"] == pytest.approx(
        _answer_figures(live, forget_records), abs=1e-5
    )
    # Each retain-type probe whose NLL rose past the tiny limit failed; the forget probe never.
    base = {kind: ledger.state().probes[kind]["base"] for kind in ("retain", "general")}
    rose = {
        f"{kind} NLL increase vs base"
        for kind in base
        if stability["probes"][kind]["nll"] - base[kind]["nll"] > 0.000001
    }
    assert "retain NLL increase vs base" in rose
    assert {c["name"] for c in stability["failed"]} == rose
    question = forget_records[0].question.encode()
    assert not any(
        question in raw for _, raw in _tree(path).values()
    )  # forget data is never stored
    assert ledger.state().probe_figures == stability["probes"]


# --- fast re-derivation --------------------------------------------------------------------


def test_fast_rederive_with_the_same_stats_is_bit_exact(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    head_before = Ledger.open(path).exponents()
    out = run("rederive", path, "--retain-stats", "retain-2", "A", "C", "-q").output
    assert (
        out
        == "A: re-derived (fast)\nC: re-derived (fast)\nversion 7: 2 request(s) re-derived with retain-2\n"
    )
    ledger = Ledger.open(path)
    entry = ledger.head()
    assert list(entry.body["requests"]) == ["A", "C"]  # chain order
    for request_id in ("A", "C"):
        old = _arrays(ledger, f"requests/{request_id}/exponent")
        new = _arrays(ledger, f"rederived/v7/{request_id}/exponent")
        assert set(new) == set(old) == {f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)}
        for site in old:
            assert _same_bits(new[site], old[site]), (request_id, site)
        change = entry.body["requests"][request_id]
        assert change["mode"] == "fast" and change["old"] == {
            name: h
            for name, h in ledger.state(request_id).requests[request_id].body["arrays"].items()
            if "/exponent/" in name
        }
        assert list(change["new"].values()) == list(change["old"].values())
    head = ledger.exponents()
    assert all(_same_bits(head[s], head_before[s]) for s in head)
    assert ledger.verify().problems == []


def test_fast_rederive_with_other_stats_equals_a_recomputation_from_the_traces(
    env: Env, tmp_path: Path, live: nn.Module
) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("rederive", path, "--retain-stats", "r2", "A", "C", "-q")
    ledger = Ledger.open(path)
    entry = ledger.head()
    c_retain = _arrays(ledger, "retain/r2")
    for request_id in ("A", "C"):
        traces = _arrays(ledger, f"requests/{request_id}/trace")
        new = _arrays(ledger, f"rederived/v7/{request_id}/exponent")
        old = _arrays(ledger, f"requests/{request_id}/exponent")
        assert set(new) == set(traces)
        for name, trace in traces.items():
            assert trace.shape == (2, 32)  # two batches of one record
            expected = _from_trace(trace, c_retain[name], GAMMA)
            assert _same_bits(new[name], expected), (request_id, name)
            assert not torch.equal(new[name], old[name])  # other stats, other exponents
        change = entry.body["requests"][request_id]
        assert change["new"] == {
            f"rederived/v7/{request_id}/exponent/{s}": tensor_hash(w) for s, w in new.items()
        }
        assert change["new"].items() <= entry.body["arrays"].items()
    assert entry.body["active"] == ["A", "B", "C"]

    # HEAD is A' + B + C' in chain order, and materialises as base * exp(-sum).
    originals = _originals(env.model_dir)
    prefixes = ["rederived/v7/A/exponent", "requests/B/exponent", "rederived/v7/C/exponent"]
    ledger.materialize(live)
    for site in ledger.sites:
        w = _chain_sum(ledger, prefixes, site.name, site.n_vectors)
        assert _same_bits(ledger.exponents()[site.name], w)
        base = originals[ledger.locations[site.name].key]
        assert _same_bits(
            site_weight(live, site).detach(), (base.float() * torch.exp(-w)).to(base.dtype)
        )
    # earlier versions still rebuild from the old exponents
    assert _same_bits(
        ledger.exponents(6)[ledger.sites[1].name],
        Ledger.open(env.ledger).exponents()[ledger.sites[1].name],
    )
    assert run("verify", path).output.startswith("ok: ")


# --- exact re-derivation -------------------------------------------------------------------


def test_exact_rederive_equals_the_same_requests_run_from_scratch(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("retain", path, env.files["retain2"], "--at", "1", "--id", "fresh", "-q")  # on the base
    run(
        "rederive",
        path,
        "--retain-stats",
        "fresh",
        "--exact",
        f"A={env.files['a']}",
        "--exact",
        f"B={env.files['b']}",
        "--exact",
        f"C={env.files['c']}",
        "-q",
    )
    ledger = Ledger.open(path)
    entry = ledger.head()
    assert {r: c["mode"] for r, c in entry.body["requests"].items()} == {
        "A": "exact",
        "B": "exact",
        "C": "exact",
    }

    scratch = Ledger.create(tmp_path / "scratch", env.model_dir, progress=False)
    scratch.retain(env.files["retain2"], stats_id="fresh", progress=False)
    for site in ledger.sites:  # the same statistics, array for array
        assert _same_bits(
            scratch.store.read_array(f"retain/fresh/{site.name}"),
            ledger.store.read_array(f"retain/fresh/{site.name}"),
        )
    for request_id, config in (
        ("A", CONFIG),
        ("B", KVWConfig(gamma=GAMMA, keep_trace=False)),
        ("C", CONFIG),
    ):
        scratch.forget(
            env.files[request_id.lower()], request_id=request_id, config=config, progress=False
        )

    v = entry.version
    for request_id in ("A", "B", "C"):
        got = _arrays(ledger, f"rederived/v{v}/{request_id}/exponent")
        want = _arrays(scratch, f"requests/{request_id}/exponent")
        assert set(got) == set(want)
        old = _arrays(ledger, f"requests/{request_id}/exponent")
        for name in want:
            assert _same_bits(got[name], want[name]), (request_id, name)
            assert not torch.equal(got[name], old[name])  # the new stats changed it
        traces = _arrays(ledger, f"rederived/v{v}/{request_id}/trace")
        if request_id == "B":
            assert traces == {} and "trace" not in entry.body["requests"]["B"]
        else:
            fresh = _arrays(scratch, f"requests/{request_id}/trace")
            assert all(_same_bits(traces[s], fresh[s]) for s in fresh)
    head, fresh_head = ledger.exponents(), scratch.exponents()
    assert all(_same_bits(head[s], fresh_head[s]) for s in head)
    assert ledger.verify().problems == []


def test_exact_rederive_of_an_early_request_checks_the_whole_staged_head(
    env: Env, tmp_path: Path, live: nn.Module
) -> None:
    # The exact loop leaves the model at A' alone; the probes must see A' + B + C.
    path = _copy(env.ledger, tmp_path / "led")
    run("probe", path, "--retain", env.files["retain"], "-q")
    run("rederive", path, "--retain-stats", "r2", "--exact", f"A={env.files['a']}", "C", "-q")
    ledger = Ledger.open(path)
    entry = ledger.head()
    assert {r: c["mode"] for r, c in entry.body["requests"].items()} == {"A": "exact", "C": "fast"}
    ledger.materialize(live)
    figures = _answer_figures(live, data.read_records(env.files["retain"]))
    assert entry.body["stability"]["probes"]["retain"] == pytest.approx(figures, abs=1e-5)


# --- ten requests, one reverted in the middle ---------------------------------------------------


def test_ten_requests_then_reverting_a_middle_one_keeps_history_consistent(
    env: Env, tmp_path: Path, live: nn.Module
) -> None:
    path = _copy(env.retained, tmp_path / "led")
    ledger = Ledger.open(path)
    ids = [f"r{i}" for i in range(10)]
    for i, request_id in enumerate(ids):
        records = tiny.qa_records(1, 100 + i)
        ledger.forget(
            tiny.write_jsonl(tmp_path / f"{request_id}.jsonl", records),
            request_id=request_id,
            config=CONFIG,
            progress=False,
        )
    run("revert", path, "r4", "--reason", "withdrawn")
    remaining = [r for r in ids if r != "r4"]

    logged = json.loads(run("log", path, "--json").output)
    assert [e["op"] for e in logged] == ["init", "retain", *["forget"] * 10, "revert"]
    assert [e["active"] for e in logged] == [[], [], *[ids[: i + 1] for i in range(10)], remaining]
    for e in logged:
        assert Ledger.open(path).state(e["version"]).active == e["active"]
    assert run("verify", path).output.startswith("ok: ")

    originals = _originals(env.model_dir)
    for version, active in ((13, remaining), (12, ids)):
        ledger.materialize(live, version)
        for site in ledger.sites:
            w = _chain_sum(
                ledger, [f"requests/{r}/exponent" for r in active], site.name, site.n_vectors
            )
            base = originals[ledger.locations[site.name].key]
            expected = (base.float() * torch.exp(-w)).to(base.dtype)
            assert _same_bits(site_weight(live, site).detach(), expected), (version, site.name)


# --- gc ------------------------------------------------------------------------------------


def test_gc_deletes_reverted_arrays_and_keeps_the_journal_verifiable(
    env: Env, tmp_path: Path, live: nn.Module
) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("rederive", path, "--retain-stats", "r2", "A", "-q")  # version 7: rederived/v7/A
    run("revert", path, "A")  # version 8
    head_before = Ledger.open(path).exponents()
    out = run("gc", path, "--reverted").output
    ledger = Ledger.open(path)
    gc_entry = ledger.head()
    assert (
        out
        == f"version 9: deleted {len(gc_entry.body['deleted_files'])} files of 1 reverted request(s): A\n"
    )
    assert not (path / "requests" / "A").exists() and not (path / "rederived" / "v7" / "A").exists()
    assert (path / "requests" / "B").is_dir() and (path / "requests" / "C").is_dir()

    # the journal still names A's files and hashes; the gc entry lists every one it removed
    named = {
        f
        for e in ledger.entries()
        for f in e.files
        if f.startswith(("requests/A/", "rederived/v7/A/"))
    }
    assert named and named <= set(gc_entry.body["deleted_files"])
    assert any(n.startswith("requests/A/exponent/") for n in ledger.entries()[2].body["arrays"])
    assert ledger.verify().problems == []
    assert run("verify", path).output.startswith("ok: ")
    head = ledger.exponents()
    assert all(_same_bits(head[s], head_before[s]) for s in head)

    for version in (3, 7):  # A active, before and after its re-derivation
        with pytest.raises(
            RefNotFoundError, match="the exponents of request 'A' are gone .*deleted by gc"
        ):
            ledger.materialize(live, version)
    message = run("export", path, tmp_path / "out", "--at", "A", "-q", code=2).output
    assert "request 'A' are gone" in message and "can no longer be rebuilt" in message
    assert not (tmp_path / "out").exists()
    assert torch.equal(ledger.exponents(2)[ledger.sites[1].name], torch.zeros(32))

    # gc twice is harmless
    before = {k: v for k, v in _tree(path).items() if not k.startswith(("journal/", "head/"))}
    assert (
        run("gc", path, "--reverted").output
        == "version 10: deleted 0 files of 0 reverted request(s): -\n"
    )
    assert {
        k: v for k, v in _tree(path).items() if not k.startswith(("journal/", "head/"))
    } == before
    assert Ledger.open(path).verify().problems == []


def test_gc_interrupted_after_its_commit_leaves_a_verifiable_ledger(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    run("revert", path, "C")
    ledger = Ledger.open(path)

    def crash(self: object, prefix: str) -> list[str]:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr("kvw_ledger.store.Store.delete", crash)
        with pytest.raises(OSError):
            ledger.gc()
    assert ledger.head().op == "gc" and ledger.head().body["deleted"] == ["C"]
    assert (path / "requests" / "C").is_dir()  # the deletion never ran
    assert ledger.verify().problems == []
    ledger.gc()  # sweeps what the interrupted gc left
    assert not (path / "requests" / "C").exists()
    assert ledger.verify().problems == []


# --- error paths: exit 2, a message that says what is wrong, nothing written -----------------


def test_bad_input_exits_2_and_writes_nothing(env: Env, tmp_path: Path) -> None:
    path = _copy(env.ledger, tmp_path / "led")
    Ledger.open(path).revert("A")
    before = _tree(path)
    a, b, d = env.files["a"], env.files["b"], env.files["d"]
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        (
            ("rederive", path, "--retain-stats", "r2", "A"),
            "request 'A' is reverted; only active requests are re-derived",
        ),
        (("rederive", path, "--retain-stats", "r2", "Z"), "no request 'Z' in this ledger"),
        (
            ("rederive", path, "--retain-stats", "r2", "B"),
            "request 'B' has no C_f trace; pass --exact B=DATA.jsonl",
        ),
        (
            ("rederive", path, "--retain-stats", "r2"),
            "pass --exact B=DATA.jsonl",
        ),  # default: every active one
        (("rederive", path, "--retain-stats", "r2", "--exact", f"B={a}"), "fingerprint differs"),
        (
            ("rederive", path, "--retain-stats", "r2", "--exact", "B"),
            "must look like REQUEST_ID=DATA.jsonl",
        ),
        (
            ("rederive", path, "--retain-stats", "r2", "--exact", f"={b}"),
            "must look like REQUEST_ID=DATA.jsonl",
        ),
        (
            ("rederive", path, "--retain-stats", "r2", "--exact", "B="),
            "must look like REQUEST_ID=DATA.jsonl",
        ),
        (
            ("rederive", path, "--retain-stats", "r2", "--exact", f"B={b}", "--exact", f"B={a}"),
            "request 'B' is given twice",
        ),
        (("rederive", path, "--retain-stats", "nope", "C"), "retain stats 'nope' do not exist"),
        (("rederive", path, "C"), "Missing option '--retain-stats'"),
        (
            ("rederive", path, "--retain-stats", "r2", "C", "--max-nll-increase", "-1"),
            "--max-nll-increase must be >= 0, not -1.0",
        ),
        (("probe", path), "probe has nothing to do"),
        (("probe", path, "--max-attenuation", "0"), "--max-attenuation must be in (0, 1], not 0.0"),
        (("probe", path, "--max-attenuation", "2"), "--max-attenuation must be in (0, 1], not 2.0"),
        (
            ("probe", path, "--retain", tmp_path / "missing.jsonl"),
            "missing.jsonl: no such data file",
        ),
        (
            ("forget", path, d, "--max-attenuation", "0"),
            "--max-attenuation must be in (0, 1], not 0.0",
        ),
        (
            ("forget", path, d, "--forget-probe", tmp_path / "nope.jsonl"),
            "nope.jsonl: no such data file",
        ),
        (("forget", path, d, "--on-fail", "shrug"), "Invalid value for '--on-fail'"),
        (
            ("revert", path, "C", "--max-retain-drop", "1.5"),
            "--max-retain-drop must be in [0, 1], not 1.5",
        ),
        (("gc", path), "gc needs --reverted"),
    ]
    for args, message in cases:
        output = run(*args, code=2).output
        assert message in output, (args, output)
    assert _tree(path) == before
