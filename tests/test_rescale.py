"""Tests for the authors' optional rescale (``forget --rescale``) and crash-leftover cleanup.

A rescaled request keeps, per site, a log-scale s that restores the site's Frobenius
norm to what it was before the request; the weights at a version are
``base * exp(S - W)``, S and W the chain-order sums of the active requests' log-scales
and exponents. Every expected weight here is computed from the ORIGINAL model file and
the stored arrays, never through the ledger's own weight code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kvw_ledger import sums
from kvw_ledger.cli import main
from kvw_ledger.coefficients import collect
from kvw_ledger.data import Encoder, Example, Record, encode_all, iter_batches
from kvw_ledger.kvw import KVWConfig, run_kvw
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model
from kvw_ledger.sites import discover_sites, select_layers, site_weight
from kvw_ledger.tune import tune

PLAIN = KVWConfig(gamma=0.5)
RESCALED = KVWConfig(gamma=0.5, rescale=True)
N_FORGET_SETS = 6


@dataclass(frozen=True)
class Env:
    root: Path
    model_dir: Path
    ledger: Path  # after init and retain
    retain: Path
    forget: tuple[Path, ...]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("rescale")
    model_dir = root / "model"
    tiny.llama().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget = tuple(
        tiny.write_jsonl(root / f"forget-{i}.jsonl", tiny.qa_records(1 + i % 2, 3 * i))
        for i in range(N_FORGET_SETS)
    )
    Ledger.create(root / "led", model_dir, progress=False)
    Ledger.open(root / "led").retain(retain, progress=False)
    return Env(root, model_dir, root / "led", retain, forget)


@pytest.fixture(scope="module")
def live(env: Env) -> nn.Module:
    return load_model(env.model_dir)


def _copy(src: Path, dst: Path) -> Ledger:
    shutil.copytree(src, dst)
    return Ledger.open(dst)





def _array(ledger: Ledger, name: str, default: torch.Tensor) -> torch.Tensor:
    return ledger.store.read_array(name) if ledger.store.has_array(name) else default


def _sums(
    ledger: Ledger, active: list[str], site: str, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, S) of ``active`` in chain order from the requests' own arrays (S None: no scale)."""
    w = torch.zeros(n, dtype=torch.float32)
    s: torch.Tensor | None = None
    for request_id in active:
        w = w + _array(ledger, f"requests/{request_id}/exponent/{site}", torch.zeros(n))
        name = f"requests/{request_id}/log_scale/{site}"
        if ledger.store.has_array(name):
            s = (
                torch.zeros((), dtype=torch.float32) if s is None else s
            ) + ledger.store.read_array(name)
    return w, s


def _expected(base: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The reference formula: float32 from the original tensor, ``exp(S - W)``, cast once."""
    exponent = -w if s is None else s - w
    return (base.float() * torch.exp(exponent).unsqueeze(0)).to(base.dtype)


def _check_version(ledger: Ledger, live: nn.Module, version: int, active: list[str]) -> None:
    originals = tiny.file_tensors(Path(ledger.model_info["dir"]))
    assert ledger.state(version).active == active
    ledger.materialize(live, at=version)
    scales = ledger.log_scales(version)
    for site in ledger.sites:
        w, s = _sums(ledger, active, site.name, site.n_vectors)
        if s is None:
            assert site.name not in scales, (version, site.name)
        else:
            assert tiny.same_bits(scales[site.name], s), (version, site.name)
        base = originals[ledger.locations[site.name].key]
        got = site_weight(live, site).detach()
        assert tiny.same_bits(got, _expected(base, w, s)), (version, site.name)


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


# --- the engine against the authors' rescale ----------------------------------------------


def _reference_rescaled(
    model: nn.Module,
    names: list[str],
    axis: int,
    forget: list[Example],
    c_r: dict[str, torch.Tensor],
    cfg: KVWConfig,
    pad: int,
) -> None:
    """The authors' loop with rescale: gate each batch, then W *= ||W_old|| / ||W||."""
    from test_kvw import reference_batches, reference_coefficients

    modules = {n: model.get_submodule(n) for n in names}
    for batch in reference_batches(forget, cfg, pad):
        c_f = reference_coefficients(model, modules, batch)
        for n in names:
            a = torch.clamp(torch.log(c_f[n] + cfg.eps) - torch.log(c_r[n] + cfg.eps), min=0)
            g = torch.exp(-cfg.gamma * a)
            w = modules[n].weight.data
            old = w.norm(p=2)
            w.mul_(g.unsqueeze(0) if axis == 1 else g.unsqueeze(1))
            w.mul_(old / w.norm(p=2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_engine_matches_the_authors_rescale(arch: str) -> None:
    build = {"llama": tiny.llama, "gpt2": tiny.gpt2}[arch]
    tok = tiny.char_tokenizer()
    enc = Encoder(tok)

    def records(n: int, offset: int) -> list[Record]:
        return [
            Record(r["question"], r["answer"], None, None, f"mem:{i}")
            for i, r in enumerate(tiny.qa_records(n, offset))
        ]

    forget, retain = encode_all(enc, records(5, 0)), encode_all(enc, records(6, 20))
    cfg = KVWConfig(gamma=0.5, layers=(1, 2), batch_size=2, epochs=2, seed=3, rescale=True)
    ours = build()
    sites = discover_sites(ours)
    chosen = select_layers(sites, cfg.layers)
    c_r = collect(ours, chosen, iter_batches(retain, 1, tok.pad_token_id), progress=False).means()
    result = run_kvw(ours, sites, forget, c_r, cfg, pad_token_id=tok.pad_token_id, progress=False)
    theirs = build()
    _reference_rescaled(
        theirs, [s.module for s in chosen], chosen[0].axis, forget, c_r, cfg, tok.pad_token_id
    )
    assert result.log_scales is not None and set(result.log_scales) == {s.name for s in chosen}
    for site in chosen:
        got, want = site_weight(ours, site), site_weight(theirs, site)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert _norm(got) == pytest.approx(_norm(site_weight(build(), site)), rel=2e-6)
        assert float(result.log_scales[site.name]) > 0
        assert bool((result.exponents[site.name] > 0).any())


# --- the norm is restored --------------------------------------------------------------


def test_rescale_restores_each_weakened_sites_norm(
    env: Env, live: nn.Module, tmp_path: Path
) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=PLAIN, progress=False)
    ledger.forget(env.forget[1], request_id="B", config=RESCALED, progress=False)
    ledger.forget(env.forget[2], request_id="C", config=RESCALED, progress=False)
    # Each rescaled request restores the norm of the version it was derived on.
    for request_id in ("B", "C"):
        version = ledger.resolve(request_id)
        ledger.materialize(live, version - 1)
        before = {s.name: _norm(site_weight(live, s)) for s in ledger.sites}
        ledger.materialize(live, version)
        weakened = 0
        for site in ledger.sites:
            name = f"requests/{request_id}/exponent/{site.name}"
            if not ledger.store.has_array(name):
                continue  # outside the request's layers
            weakened += int(bool((ledger.store.read_array(name) > 0).any()))
            after = _norm(site_weight(live, site))
            assert after == pytest.approx(before[site.name], rel=2e-6), (request_id, site.name)
            assert ledger.store.has_array(f"requests/{request_id}/log_scale/{site.name}")
        assert weakened, "the request weakened nothing; the test would prove nothing"
    # Without rescale the norm does drop (the plain request A), and A keeps no scale.
    ledger.materialize(live, ledger.resolve("A"))
    dropped = [
        _norm(site_weight(live, s)) < _norm(ledger.base(s.name)) * (1 - 1e-6)
        for s in ledger.sites[1:]
    ]
    assert any(dropped)
    assert not any("/log_scale/" in n for n in ledger.store.list_arrays("requests/A"))
    # The journal records the option; a plain request is recorded as before it existed.
    assert ledger.state().requests["B"].body["params"]["rescale"] is True
    assert "rescale" not in ledger.state().requests["A"].body["params"]
    # The attenuation budget measures the effective matrix: B and C removed nothing more.
    requests = ledger.state().requests
    after_a = requests["A"].body["stability"]["attenuation"]
    for site, share in requests["C"].body["stability"]["attenuation"].items():
        assert share == pytest.approx(after_a[site], abs=1e-5), site
    for version, active in enumerate([[], [], ["A"], ["A", "B"], ["A", "B", "C"]], start=1):
        _check_version(ledger, live, version, active)
    assert ledger.verify().problems == []


def test_without_rescale_nothing_is_stored_and_the_head_has_no_scale(
    env: Env, tmp_path: Path
) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=PLAIN, progress=False)
    assert ledger.log_scales() == {}
    assert not list((ledger.path / "requests").rglob("log_scale"))
    head_meta = [json.loads(p.read_text()) for p in (ledger.path / "head").glob("*/zarr.json")]
    assert head_meta and all("log_scale" not in m["attributes"] for m in head_meta)


# --- revert, replay, order ------------------------------------------------------------


def test_revert_of_a_rescaled_request_is_bit_exact(
    env: Env, live: nn.Module, tmp_path: Path
) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=PLAIN, progress=False)
    before = ledger.head().version
    ledger.forget(env.forget[1], request_id="B", config=RESCALED, progress=False)
    ledger.revert("B")
    assert ledger.log_scales() == {}
    ledger.materialize(live, before)
    at_a = {s.name: site_weight(live, s).detach().clone() for s in ledger.sites}
    ledger.materialize(live)
    for site in ledger.sites:
        assert tiny.same_bits(site_weight(live, site).detach(), at_a[site.name]), site.name
    assert ledger.export(tmp_path / "out", progress=False) == ledger.resolve("HEAD")
    exported = tiny.file_tensors(tmp_path / "out")
    for site in ledger.sites:
        assert tiny.same_bits(exported[ledger.locations[site.name].key], at_a[site.name]), site.name
    assert ledger.verify().problems == []


OPS = st.lists(
    st.tuples(
        st.sampled_from(["forget", "revert"]), st.integers(0, N_FORGET_SETS - 1), st.booleans()
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=6, deadline=None)
@given(ops=OPS)
def test_random_rescaled_sequences_replay_bit_exactly(
    env: Env, live: nn.Module, ops: list[tuple[str, int, bool]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = _copy(env.ledger, Path(tmp) / "led")
        active: list[str] = []
        expected: list[list[str]] = [[], []]
        for n, (op, pick, rescale) in enumerate(ops):
            if op == "revert" and active:
                victim = active[pick % len(active)]
                ledger.revert(victim)
                active = [r for r in active if r != victim]
            else:
                request = f"q{n}"
                config = RESCALED if rescale else PLAIN
                ledger.forget(env.forget[pick], request_id=request, config=config, progress=False)
                active = [*active, request]
            expected.append(active)
        for version, want in enumerate(expected, start=1):
            _check_version(ledger, live, version, want)
        assert ledger.verify().ok


def test_request_order_changes_only_the_last_bits_with_scales(env: Env, tmp_path: Path) -> None:
    # Rescaled requests on layer 0 alone (whose coefficients no weakening of its own
    # down_proj changes, so each request's exponents do not depend on what came before).
    # Each log-scale restores the norm the site had before its request, so a sequence's
    # log-scales telescope: per request they differ with the order, their sum does not,
    # beyond rounding. Compared here: the ledger's own sums and exports, across two orders.
    config = KVWConfig(gamma=0.3, layers=(0, 0), rescale=True)
    orders = {"forward": [0, 1, 2], "shuffled": [2, 0, 1]}
    ledgers = {}
    for name, order in orders.items():
        ledger = _copy(env.ledger, tmp_path / name)
        for i in order:
            ledger.forget(env.forget[i], request_id=f"r{i}", config=config, progress=False)
        ledgers[name] = ledger
    forward, shuffled = ledgers["forward"], ledgers["shuffled"]
    site = forward.sites[0]
    for request in ("r0", "r1", "r2"):
        assert tiny.same_bits(
            forward.request_exponents(request)[site.name], shuffled.request_exponents(request)[site.name]
        ), request
    assert not tiny.same_bits(  # the premise of the telescoping: per request, they differ
        forward.request_log_scales("r0")[site.name], shuffled.request_log_scales("r0")[site.name]
    )
    scales_f, scales_s = forward.log_scales(), shuffled.log_scales()
    assert scales_f.keys() == scales_s.keys() == {site.name}
    assert float(scales_f[site.name]) > 0
    torch.testing.assert_close(scales_s[site.name], scales_f[site.name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        shuffled.exponents()[site.name], forward.exponents()[site.name], rtol=1e-6, atol=0.0
    )
    for name, ledger in ledgers.items():
        assert ledger.export(tmp_path / f"{name}-out", progress=False) == ledger.resolve("HEAD")
    exported = {name: tiny.file_tensors(tmp_path / f"{name}-out") for name in ledgers}
    key = forward.locations[site.name].key
    torch.testing.assert_close(exported["shuffled"][key], exported["forward"][key], rtol=1e-5, atol=1e-8)
    base = forward.base(site.name)  # and the norm is the base's, in either order
    for name in orders:
        assert _norm(exported[name][key]) == pytest.approx(_norm(base), rel=1e-5), name
    for other in exported["forward"].keys() - {key}:
        assert tiny.same_bits(exported["shuffled"][other], exported["forward"][other]), other


# --- verify, rederive, gc ----------------------------------------------------------------


def test_a_tampered_log_scale_fails_verify(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[1], request_id="B", config=RESCALED, progress=False)
    assert ledger.verify().problems == []
    assert tiny.verify_both_ways(ledger, monkeypatch)["problems"] == []  # log-scales: read by the parent
    site = ledger.sites[2].name
    name = f"requests/B/log_scale/{site}"
    chunk = next(f for f in ledger.state().requests["B"].body["arrays"] if f == name)
    files = [
        f for f in ledger.head().files if f.startswith(f"{chunk}/") and not f.endswith("zarr.json")
    ]
    assert files
    path = ledger.path / files[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    report = Ledger.open(ledger.path).verify()
    assert not report.ok
    assert any(p.path.startswith(name) for p in report.problems if p.severity == "error")
    assert tiny.verify_both_ways(Ledger.open(ledger.path), monkeypatch) == report.to_json()


def test_a_tampered_head_log_scale_fails_verify(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[1], request_id="B", config=RESCALED, progress=False)
    site = ledger.sites[2].name
    meta_path = ledger.path / "head" / site / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["log_scale"] += 0.5
    meta_path.write_text(json.dumps(meta))
    report = Ledger.open(ledger.path).verify()
    assert not report.ok
    assert any(p.path.startswith("head") for p in report.problems if p.severity == "error")


def test_rederive_recomputes_the_scales_and_gc_deletes_them(
    env: Env, live: nn.Module, tmp_path: Path
) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=RESCALED, progress=False)
    ledger.forget(env.forget[1], request_id="B", config=PLAIN, progress=False)
    ledger.forget(env.forget[2], request_id="C", config=RESCALED, progress=False)
    stats = ledger.state().latest_retain
    assert stats is not None
    old_c = {s: ledger.store.read_array(f"requests/C/log_scale/{s.name}") for s in ledger.sites[1:]}
    # The same statistics reproduce exponents and log-scales bit for bit.
    entry = ledger.rederive(stats, progress=False)
    version = entry.version
    for site, value in old_c.items():
        assert tiny.same_bits(
            ledger.store.read_array(f"rederived/v{version}/C/log_scale/{site.name}"), value
        )
    change = entry.body["requests"]["C"]
    assert change["log_scale"] == f"rederived/v{version}/C/log_scale"
    assert list(change["new_log_scale"].values()) == list(change["old_log_scale"].values())
    assert "log_scale" not in entry.body["requests"]["B"]
    # Other statistics: C's scale again restores the norm of A' + B, its new start.
    ledger.retain(env.forget[3], stats_id="other", progress=False)
    entry = ledger.rederive("other", progress=False)
    state = ledger.state()
    assert state.log_scales["C"] == f"rederived/v{entry.version}/C/log_scale"
    originals = tiny.file_tensors(env.model_dir)
    for site in ledger.sites[1:]:
        base = originals[ledger.locations[site.name].key]
        exps = {r: ledger.request_exponents(r, state)[site.name] for r in ("A", "B", "C")}
        scales = {r: ledger.request_log_scales(r, state)[site.name] for r in ("A", "C")}
        start = exps["A"] + exps["B"]
        before = _norm(_expected(base, start, scales["A"]))
        after = _norm(_expected(base, start + exps["C"], scales["A"] + scales["C"]))
        assert after == pytest.approx(before, rel=2e-6), site.name
    ledger.materialize(live)
    for site in ledger.sites:
        base = originals[ledger.locations[site.name].key]
        w = sums.total(ledger, state).exponents[site.name]
        s = ledger.log_scales().get(site.name)
        assert tiny.same_bits(site_weight(live, site).detach(), _expected(base, w, s)), site.name
    assert ledger.verify().problems == []
    # Reverted and collected, every log-scale array of C goes; verify still passes.
    ledger.revert("C")
    ledger.gc()
    assert not [f for f in ledger.store.files() if "/C/" in f]
    assert ledger.verify().problems == []


def test_exact_rederive_of_a_rescaled_request_reproduces_it(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=RESCALED, progress=False)
    ledger.forget(env.forget[1], request_id="B", config=RESCALED, progress=False)
    stats = ledger.state().latest_retain
    assert stats is not None
    entry = ledger.rederive(stats, ["A", "B"], exact={"B": env.forget[1]}, progress=False)
    assert entry.body["requests"]["B"]["mode"] == "exact"
    state = ledger.state()
    for request_id in ("A", "B"):
        old = {
            n.rsplit("/", 1)[1]: ledger.store.read_array(n)
            for n in ledger.store.list_arrays(f"requests/{request_id}/log_scale")
        }
        new = ledger.request_log_scales(request_id, state)
        assert old.keys() == new.keys() and old
        assert all(tiny.same_bits(new[site], old[site]) for site in old), request_id
    assert ledger.verify().problems == []


# --- tune and the CLI ----------------------------------------------------------------


def test_tune_with_rescale(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    result = tune(ledger, env.forget[0], env.retain, [0.5], [(1, 3)], rescale=True, progress=False)
    assert result["rescale"] is True
    assert len(result["rows"]) == 1
    assert ledger.head().version == 2  # nothing committed


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(f"{args}: exit {result.exit_code}\n{result.output}", result.exception)
    return result


def test_cli_forget_rescale_end_to_end(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "led"
    shutil.copytree(env.ledger, path)
    out = run(
        "forget", path, env.forget[1], "--id", "B", "--gamma", "0.5", "--rescale", "-q"
    ).output
    assert out.startswith("version 3: request B applied")
    ledger = Ledger.open(path)
    assert ledger.state().requests["B"].body["params"]["rescale"] is True
    assert "B (2 records, gamma 0.5, rescaled)" in run("log", path).output
    shown = json.loads(run("show", path, "B", "--json").output)
    for row in shown["sites"]:
        assert row["log_scale"] == float(
            ledger.store.read_array(f"requests/B/log_scale/{row['site']}")
        )
    assert "log-scale" in run("show", path, "B").output
    diff = json.loads(run("diff", path, "2", "3", "--json").output)
    assert {s["site"] for s in diff["sites"]} == {s.name for s in ledger.sites[1:]}
    scales = ledger.log_scales()
    for s in diff["sites"]:
        assert s["log_scale_change"] == pytest.approx(float(scales[s["site"]]))
    # The export is base * exp(S - W) and restores every site's norm.
    originals = tiny.file_tensors(env.model_dir)
    exported = tiny.file_tensors(
        Path(run("export", path, tmp_path / "out", "-q").output.split(" to ")[1].strip())
    )
    for site in ledger.sites:
        key = ledger.locations[site.name].key
        w, s = _sums(ledger, ["B"], site.name, site.n_vectors)
        assert tiny.same_bits(exported[key], _expected(originals[key], w, s)), site.name
        assert _norm(exported[key]) == pytest.approx(_norm(originals[key]), rel=2e-6)
    assert run("verify", path).output.startswith("ok:")
    assert "--rescale" in run("forget", "--help").output
    assert "--rescale" in run("tune", "--help").output


# --- crash leftovers ---------------------------------------------------------------------


def test_the_next_write_removes_a_crashed_writers_temp_dirs(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    for name in ("array.tmp-0123abcd", "head.tmp-feedbeef", "trash.old-00ff00ff"):
        (ledger.path / name / "x").mkdir(parents=True)
        (ledger.path / name / "x" / "c").write_bytes(b"half")
    ledger.forget(env.forget[0], request_id="A", config=PLAIN, progress=False)
    assert not [p.name for p in ledger.path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert ledger.verify().problems == []
