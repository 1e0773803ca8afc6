"""Tests for kvw_ledger.ledger: bit-exact revert and replay, bfloat16, REFs, crash leftovers.

Every expected weight is computed here from the ORIGINAL model file and the stored
exponents, never through the ledger's own weight code.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kvw_ledger.data import Encoder, encode_all, read_records
from kvw_ledger.errors import (
    BadInputError,
    LedgerNotFoundError,
    ModelMismatchError,
    RefNotFoundError,
    RequestStateError,
)
from kvw_ledger.kvw import KVWConfig, run_kvw
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model, load_processor, max_length
from kvw_ledger.sites import site_weight
from kvw_ledger.stability import check_attenuation
from kvw_ledger.weakening import Weakening

CONFIG = KVWConfig(gamma=0.5)
N_FORGET_SETS = 10


@dataclass(frozen=True)
class Env:
    root: Path
    model_dir: Path
    bare: Path  # a ledger after init only
    ledger: Path  # a ledger after init and retain
    forget: tuple[Path, ...]  # forget sets of 1-2 records each, disjoint


def _save_model(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny.char_tokenizer().save_pretrained(path)
    return path





def _expected(base: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference formula: float32 math from the original tensor, cast once."""
    return (base.float() * torch.exp(-w).unsqueeze(0)).to(base.dtype)


def _exponent(ledger: Ledger, request_id: str, site: str, n: int) -> torch.Tensor:
    name = f"requests/{request_id}/exponent/{site}"
    if ledger.store.has_array(name):
        return ledger.store.read_array(name)
    return torch.zeros(n, dtype=torch.float32)  # a site outside the request's layers


def _chain_sum(ledger: Ledger, active: list[str], site: str, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=torch.float32)
    for request_id in active:  # the order the requests were applied
        total = total + _exponent(ledger, request_id, site, n)
    return total


def _copy(src: Path, dst: Path) -> Ledger:
    shutil.copytree(src, dst)
    return Ledger.open(dst)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("ledger")
    model_dir = _save_model(tiny.llama(), root / "model")
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget = tuple(
        tiny.write_jsonl(root / f"forget-{i}.jsonl", tiny.qa_records(1 + i % 2, 3 * i))
        for i in range(N_FORGET_SETS)
    )
    Ledger.create(root / "bare", model_dir, progress=False)
    shutil.copytree(root / "bare", root / "led")
    Ledger.open(root / "led").retain(retain, progress=False)
    return Env(root, model_dir, root / "bare", root / "led", forget)


@pytest.fixture(scope="module")
def live(env: Env) -> nn.Module:
    """One loaded model that tests materialise versions into."""
    return load_model(env.model_dir)


# --- bit-exact revert --------------------------------------------------------------------


def test_revert_is_bit_exact_and_init_export_is_the_original(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=CONFIG, progress=False)
    ledger.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)
    ledger.revert("A")
    assert ledger.state().active == ["B"]

    original = tiny.file_tensors(env.model_dir)
    assert ledger.export(tmp_path / "head", progress=False) == ledger.resolve("HEAD")
    exported = tiny.file_tensors(tmp_path / "head")
    assert list(exported) == list(original)
    site_keys = {loc.key: name for name, loc in ledger.locations.items()}
    weakened_any = False
    for key, base in original.items():
        site = site_keys.get(key)
        if site is None:
            assert tiny.same_bits(exported[key], base), key
            continue
        w_b = _exponent(ledger, "B", site, base.shape[1])
        assert tiny.same_bits(exported[key], _expected(base, w_b)), key
        weakened_any |= not tiny.same_bits(exported[key], base)
    assert weakened_any, "request B weakened nothing; the test would prove nothing"

    assert ledger.export(tmp_path / "v1", at=1, progress=False) == ledger.resolve(1)
    at_init = tiny.file_tensors(tmp_path / "v1")
    assert list(at_init) == list(original)
    for key, base in original.items():
        assert tiny.same_bits(at_init[key], base), key
    assert ledger.verify().problems == []


# --- replay ------------------------------------------------------------------------------

# 10 requests with reverts between them: (op, forget-set index or request id).
HISTORY = [
    ("forget", 0), ("forget", 1), ("forget", 2), ("revert", "r1"), ("forget", 3),
    ("forget", 4), ("forget", 5), ("revert", "r0"), ("forget", 6), ("forget", 7),
    ("revert", "r5"), ("forget", 8), ("forget", 9), ("revert", "r8"),
]


@pytest.fixture(scope="module")
def history(env: Env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, list[list[str]]]:
    """The ledger after HISTORY, and the active requests after each version (by hand)."""
    ledger = _copy(env.ledger, tmp_path_factory.mktemp("history") / "led")
    active: list[str] = []
    expected: list[list[str]] = [[], []]  # versions 1 (init) and 2 (retain)
    for op, arg in HISTORY:
        if op == "forget":
            ledger.forget(env.forget[int(arg)], request_id=f"r{arg}", config=CONFIG, progress=False)
            active = [*active, f"r{arg}"]
        else:
            ledger.revert(str(arg))
            active = [r for r in active if r != arg]
        expected.append(active)
    return ledger, expected


def _check_version(ledger: Ledger, live: nn.Module, version: int, active: list[str]) -> None:
    original = tiny.file_tensors(Path(ledger.model_info["dir"]))
    assert ledger.state(version).active == active
    assert ledger.materialize(live, at=version) == version
    sums = ledger.exponents(version)
    for site in ledger.sites:
        w = _chain_sum(ledger, active, site.name, site.n_vectors)
        assert tiny.same_bits(sums[site.name], w), (version, site.name)
        base = original[ledger.locations[site.name].key]
        got = site_weight(live, site).detach()
        assert tiny.same_bits(got, _expected(base, w)), (version, site.name)


def test_every_version_of_a_10_request_history_equals_a_fresh_replay(
    history: tuple[Ledger, list[list[str]]], live: nn.Module
) -> None:
    ledger, expected = history
    assert len(ledger.state().requests) == 10
    assert ledger.head().version == len(expected)
    for version, active in enumerate(expected, start=1):
        _check_version(ledger, live, version, active)
    assert ledger.verify().problems == []


OPS = st.lists(st.tuples(st.sampled_from(["forget", "revert"]), st.integers(0, 9)), min_size=1, max_size=6)


@settings(max_examples=8, deadline=None)
@given(ops=OPS)
def test_random_forget_revert_sequences_replay_bit_exactly(env: Env, live: nn.Module, ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = _copy(env.ledger, Path(tmp) / "led")
        active: list[str] = []
        expected: list[list[str]] = [[], []]
        for n, (op, pick) in enumerate(ops):
            if op == "revert" and active:
                victim = active[pick % len(active)]
                ledger.revert(victim)
                active = [r for r in active if r != victim]
            else:
                request = f"q{n}"
                ledger.forget(env.forget[pick], request_id=request, config=CONFIG, progress=False)
                active = [*active, request]
            expected.append(active)
        for version, want in enumerate(expected, start=1):
            _check_version(ledger, live, version, want)


# Requests on layer 0 alone: a coefficient there is the input to layer 0's down_proj, which
# no weakening of that down_proj (the only matrix these requests touch) can change, so each
# request's exponents are the same whatever was applied before it. Two ledgers that take
# the same requests in two orders then differ only in the order their sums are added.
LAYER_0 = KVWConfig(gamma=0.3, layers=(0, 0))  # not a power of 2: products keep every bit
ORDERS = {"forward": [0, 1, 2, 3, 4, 5], "shuffled": [4, 1, 5, 0, 3, 2]}


@pytest.fixture(scope="module")
def two_orders(env: Env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ledger]:
    root = tmp_path_factory.mktemp("orders")
    ledgers = {}
    for name, order in ORDERS.items():
        ledger = _copy(env.ledger, root / name)
        for i in order:
            ledger.forget(env.forget[i], request_id=f"r{i}", config=LAYER_0, progress=False)
        ledger.revert("r1")
        ledgers[name] = ledger
    return ledgers


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most float32 steps between same-signed elements of ``a`` and ``b``."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def test_request_order_changes_only_the_last_bits(two_orders: dict[str, Ledger], tmp_path: Path) -> None:
    # Exponents compose by addition, so the order of requests does not matter
    # mathematically; float addition is not associative, though, so another order may move
    # the last bits of a sum. Here the ledger's own sums (its head cache, its replay of an
    # older version) and its exports are compared across the two orders.
    forward, shuffled = two_orders["forward"], two_orders["shuffled"]
    assert forward.state("HEAD~1").active == [f"r{i}" for i in ORDERS["forward"]]
    assert shuffled.state("HEAD~1").active == [f"r{i}" for i in ORDERS["shuffled"]]
    weakened = 0
    for request in forward.state("HEAD~1").active:  # the premise: the same exponents either way
        mine, theirs = forward.request_exponents(request), shuffled.request_exponents(request)
        assert mine.keys() == theirs.keys() and len(mine) == 1, request
        assert all(tiny.same_bits(mine[s], theirs[s]) for s in mine), request
        weakened += sum(int((w > 0).sum()) for w in mine.values())
    assert weakened > 0, "the requests weakened nothing; the comparison would be vacuous"

    # HEAD~1 holds all six and is replayed from the journal (no head cache stands for it);
    # HEAD, after both reverted the same request, is the head cache that revert wrote.
    moved = 0
    for at in ("HEAD~1", "HEAD"):
        assert sorted(forward.state(at).active) == sorted(shuffled.state(at).active), at
        a, b = forward.exponents(at), shuffled.exponents(at)
        for site in forward.sites:
            torch.testing.assert_close(b[site.name], a[site.name], rtol=1e-6, atol=0.0)
            assert _ulps(b[site.name], a[site.name]) <= 4, (at, site.name)
            moved += int((b[site.name] != a[site.name]).sum())
    assert moved > 0, "both orders round alike everywhere: the tolerance is never exercised"
    for name, ledger in two_orders.items():
        assert ledger.export(tmp_path / name, progress=False) == ledger.resolve("HEAD")
    exported = {name: tiny.file_tensors(tmp_path / name) for name in two_orders}
    site_keys = {forward.locations[s.name].key for s in forward.sites}
    assert exported["forward"].keys() == exported["shuffled"].keys()
    for key, tensor in exported["forward"].items():
        other = exported["shuffled"][key]
        if key not in site_keys:
            assert tiny.same_bits(other, tensor), key
            continue
        torch.testing.assert_close(other, tensor, rtol=1e-6, atol=1e-9)
        assert _ulps(other, tensor) <= 4, key


# --- bfloat16 ----------------------------------------------------------------------------


def test_bfloat16_ledger_round_trips_bit_exactly(env: Env, tmp_path: Path) -> None:
    model_dir = _save_model(tiny.llama().to(torch.bfloat16), tmp_path / "bf16")
    original = tiny.file_tensors(model_dir)
    assert all(t.dtype == torch.bfloat16 for t in original.values())
    ledger = Ledger.create(tmp_path / "led", model_dir, progress=False)
    for site in ledger.sites:
        base = ledger.base(site.name)
        assert base.dtype == torch.bfloat16
        assert tiny.same_bits(base, original[ledger.locations[site.name].key])
    ledger.retain(env.root / "retain.jsonl", progress=False)
    forget = ledger.forget(env.forget[1], request_id="A", config=CONFIG, progress=False)

    assert ledger.export(tmp_path / "forgotten", progress=False) == ledger.resolve("HEAD")
    weakened = tiny.file_tensors(tmp_path / "forgotten")
    for site in ledger.sites:
        key = ledger.locations[site.name].key
        w = _exponent(ledger, "A", site.name, site.n_vectors)
        assert tiny.same_bits(weakened[key], _expected(original[key], w)), key
    assert any(not tiny.same_bits(weakened[k], original[k]) for k in original)

    ledger.revert("A")
    assert ledger.export(tmp_path / "reverted", progress=False) == ledger.resolve("HEAD")
    restored = tiny.file_tensors(tmp_path / "reverted")
    for key, tensor in original.items():
        assert tiny.same_bits(restored[key], tensor), key
    assert ledger.export(tmp_path / "again", at=forget.version, progress=False) == ledger.resolve(forget.version)
    again = tiny.file_tensors(tmp_path / "again")
    for key, tensor in weakened.items():
        assert tiny.same_bits(again[key], tensor), key
    assert ledger.verify().problems == []


# --- REFs and request states -------------------------------------------------------------


def test_resolve_refs(history: tuple[Ledger, list[list[str]]]) -> None:
    ledger, expected = history
    last = len(expected)
    assert ledger.resolve(1) == 1
    assert ledger.resolve("3") == 3
    assert ledger.resolve(" 3 ") == 3
    assert ledger.resolve("HEAD") == last
    assert ledger.resolve("HEAD~0") == last
    assert ledger.resolve("HEAD~2") == last - 2
    assert ledger.resolve(f"HEAD~{last - 1}") == 1
    assert ledger.resolve("r0") == 3  # the entry that applied the request
    assert ledger.resolve("r9") == ledger.state().requests["r9"].version
    for bad, message in [
        ("0", "version 0 does not exist"),
        (str(last + 1), f"version {last + 1} does not exist"),
        (f"HEAD~{last}", "goes back past version 1"),
        ("nope", "'nope' is not a version, a request id, HEAD or HEAD~N"),
        ("retain-2", "is not a version"),  # stats ids are not REFs
        ("²", "is not a version"),  # a digit to str.isdigit, not to int()
        ("head", "is not a version"),
        ("HEAD~-1", "is not a version"),
    ]:
        with pytest.raises(RefNotFoundError, match=message):
            ledger.resolve(bad)


def test_revert_unknown_or_twice_is_refused(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    ledger.forget(env.forget[0], request_id="A", config=CONFIG, progress=False)
    with pytest.raises(RequestStateError, match="no request 'B'"):
        ledger.revert("B")
    ledger.revert("A")
    with pytest.raises(RequestStateError, match="'A' is already reverted"):
        ledger.revert("A")
    with pytest.raises(BadInputError, match="request 'A' already exists"):
        ledger.forget(env.forget[1], request_id="A", config=CONFIG, progress=False)
    assert ledger.head().version == 4


def test_forget_needs_retain_stats(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.bare, tmp_path / "led")
    with pytest.raises(BadInputError, match="no retain statistics.*kvw-ledger retain"):
        ledger.forget(env.forget[0], config=CONFIG, progress=False)
    with pytest.raises(RefNotFoundError, match="retain stats 'other' do not exist"):
        _copy(env.ledger, tmp_path / "led2").forget(
            env.forget[0], retain_stats="other", config=CONFIG, progress=False
        )
    assert ledger.head().version == 1


def test_retain_keeps_the_head_cache_current(env: Env) -> None:
    ledger = Ledger.open(env.ledger)
    head = ledger.head()
    assert head.op == "retain"
    cached = ledger.store.read_head_cache()
    assert cached is not None and (cached.version, cached.digest) == (head.version, head.hash)
    assert ledger.verify().problems == []


def test_materialize_at_head_reads_no_history(
    history: tuple[Ledger, list[list[str]]], live: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, expected = history
    head = ledger.head().version
    want = ledger.sums(head - 1)[1].exponents  # by replay (the cache stands for HEAD only)

    def no_replay(self: object) -> None:
        raise AssertionError("the journal was replayed")

    monkeypatch.setattr(Ledger, "entries", no_replay)
    # HEAD costs the newest entry and the head cache, whatever the number of requests.
    for ref in ("HEAD", "HEAD~0", head, str(head)):
        assert ledger.materialize(live, at=ref) == head
    with pytest.raises(AssertionError, match="replayed"):
        ledger.sums(head - 1)
    monkeypatch.undo()
    _check_version(ledger, live, head, expected[head - 1])
    assert all(tiny.same_bits(ledger.sums(head - 1)[1].exponents[n], want[n]) for n in want)


def test_load_of_the_base_version_reads_no_base_array(
    history: tuple[Ledger, list[list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, expected = history
    assert expected[1] == [] and expected[-1] != []

    def no_base(self: object, site: str) -> None:
        raise AssertionError(f"read the base of {site}")

    monkeypatch.setattr(Ledger, "base", no_base)
    # Nothing active at version 2: the checked model files are the base already.
    model, _ = ledger.load(at=2, progress=False)
    original = tiny.file_tensors(Path(ledger.model_info["dir"]))
    for site in ledger.sites:
        assert tiny.same_bits(site_weight(model, site).detach(), original[ledger.locations[site.name].key])
    with pytest.raises(AssertionError, match="read the base"):
        ledger.load(at="HEAD", progress=False)


def test_the_first_request_copies_its_bases_from_the_checked_model(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    stored = {s.name: ledger.store.read_array(f"base/{s.name}") for s in ledger.sites}
    stats = ledger.state().latest_retain
    retain_means = {s.name: ledger.store.read_array(f"retain/{stats}/{s.name}") for s in ledger.sites}
    read_array = ledger.store.read_array

    def no_base(name: str) -> torch.Tensor:
        if name.startswith("base/"):
            raise AssertionError(f"read {name}")
        return read_array(name)

    monkeypatch.setattr(ledger.store, "read_array", no_base)
    # Nothing active: the fingerprint-checked model holds the bases, so none is decompressed.
    entry = ledger.forget(env.forget[0], request_id="A", config=CONFIG, progress=False)

    # The same request by hand, on the stored bases, gives the same bits and figures.
    model = load_model(env.model_dir)
    encoder = Encoder(load_processor(env.model_dir), max_length(model))
    examples = encode_all(encoder, read_records(env.forget[0]))
    result = run_kvw(model, ledger.sites, examples, retain_means, CONFIG,
                     pad_token_id=encoder.pad_token_id, base=stored, progress=False)  # fmt: skip
    assert any(bool((w > 0).any()) for w in result.exponents.values()), "nothing was weakened"
    for name, w in result.exponents.items():
        assert tiny.same_bits(_exponent(ledger, "A", name, w.numel()), w), name
    staged = {s.name: result.exponents.get(s.name, torch.zeros(s.n_vectors)) for s in ledger.sites}
    _, shares = check_attenuation(stored, Weakening(staged), {s.name: s.axis for s in ledger.sites}, 1.0)
    assert entry.body["stability"]["attenuation"] == shares

    # With a request active the model no longer holds the bases: they are read.
    with pytest.raises(AssertionError, match="read base/"):
        ledger.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)


def test_a_changed_model_dir_is_refused_naming_the_file(env: Env, tmp_path: Path) -> None:
    changed = Path(shutil.copytree(env.model_dir, tmp_path / "model"))
    weights = changed / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    ledger = _copy(env.ledger, tmp_path / "led")
    with pytest.raises(ModelMismatchError, match=r"model\.safetensors differs"):
        ledger.export(tmp_path / "out", model_dir=changed, progress=False)
    with pytest.raises(ModelMismatchError, match=r"model\.safetensors differs"):
        ledger.forget(env.forget[0], model_dir=changed, config=CONFIG, progress=False)
    assert not (tmp_path / "out").exists()
    assert ledger.head().version == 2


def test_open_refuses_what_is_not_a_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError):
        Ledger.open(tmp_path)


# --- crash leftovers ---------------------------------------------------------------------


def test_crash_leftovers_warn_and_the_next_forget_replaces_them(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    site = ledger.sites[1]
    leftover = ledger.store.write_array(
        f"requests/X/exponent/{site.name}", torch.full((site.n_vectors,), 9.0)
    )
    report = ledger.verify()
    assert report.ok
    warned = {p.path for p in report.problems if p.severity == "warning"}
    assert set(leftover.files) <= warned
    assert all(p.severity == "warning" for p in report.problems)

    ledger.forget(env.forget[0], request_id="X", config=CONFIG, progress=False)
    assert ledger.verify().problems == []
    assert float(ledger.store.read_array(f"requests/X/exponent/{site.name}").max()) < 9.0


def test_clock_stamps_entries(env: Env, tmp_path: Path) -> None:
    shutil.copytree(env.ledger, tmp_path / "led")
    fixed = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ledger = Ledger.open(tmp_path / "led", clock=lambda: fixed)
    ledger.forget(env.forget[0], request_id="A", config=CONFIG, progress=False)
    assert ledger.revert("A").time == "2030-01-02T03:04:05Z"
    assert [e.time for e in ledger.entries()][-2:] == ["2030-01-02T03:04:05Z"] * 2


@pytest.mark.parametrize("bad", ["7", "HEAD", "0042"])
def test_request_ids_that_read_as_refs_are_refused(env: Env, tmp_path: Path, bad: str) -> None:
    ledger = _copy(env.ledger, tmp_path / "led")
    with pytest.raises(BadInputError, match=f"request id '{bad}' reads as a version REF"):
        ledger.forget(env.forget[0], request_id=bad, config=CONFIG, progress=False)
    assert len(ledger.entries()) == 2


def test_open_refuses_root_attributes_that_differ_from_init(env: Env, tmp_path: Path) -> None:
    from kvw_ledger.errors import IntegrityError

    _copy(env.ledger, tmp_path / "led")
    root = tmp_path / "led" / "zarr.json"
    root.write_text(root.read_text().replace('"towers": "language"', '"towers": "all"     '))
    with pytest.raises(IntegrityError, match="zarr.json differs from what init recorded"):
        Ledger.open(tmp_path / "led")
    assert not Ledger.open(tmp_path / "led", check_root=False).verify(check_model=False).ok


# --- costs that grow with what changed (issue 14) -----------------------------------------


def test_diff_reads_only_the_requests_that_differ(
    history: tuple[Ledger, list[list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, expected = history
    head = ledger.head().version
    assert "r8" in expected[head - 2] and [r for r in expected[head - 2] if r != "r8"] == expected[head - 1]
    reads: list[str] = []
    real = Ledger.request_weakening
    monkeypatch.setattr(
        Ledger, "request_weakening", lambda self, r, state=None: reads.append(r) or real(self, r, state)
    )
    got = ledger.diff("HEAD~1", "HEAD", top=3)
    assert reads == ["r8"]  # the requests active on both sides cancel unread
    assert (got["from"], got["to"], got["added"], got["removed"]) == (head - 1, head, [], ["r8"])
    monkeypatch.undo()
    w = ledger.request_exponents("r8", ledger.state(head - 1))
    rows = {row["site"]: row for row in got["sites"]}
    assert set(rows) == {name for name, value in w.items() if bool(value.any())}
    for name, row in rows.items():
        delta = -w[name]  # what HEAD lacks: exactly r8's exponents, no rounding of a long sum
        assert row["changed"] == int((delta != 0).sum())
        assert row["max_abs_change"] == float(delta.abs().max())
        assert [t["change"] for t in row["top"]] == [float(delta[t["vector"]]) for t in row["top"]]


def test_verify_reads_every_file_once(
    history: tuple[Ledger, list[list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvw_ledger import _chunks, journal

    ledger, _ = history
    reads: dict[str, int] = {}
    real_read = _chunks.read_file

    def counted(root: Path, rel: str, digests: Any, absent: Any = _chunks.ABSENT) -> bytes | None:
        if not Path(rel).is_absolute():  # an array's file (read_bytes of a whole path is not)
            reads[rel] = reads.get(rel, 0) + 1
        return real_read(root, rel, digests, absent)

    hashed_by_journal: set[str] = set()
    real_hash = journal.hash_files

    def recorded(root: Path, paths: set[str]) -> dict[str, str | OSError]:
        hashed_by_journal.update(paths)
        return real_hash(root, paths)

    monkeypatch.setattr(_chunks, "read_file", counted)
    monkeypatch.setattr(journal, "hash_files", recorded)
    report = ledger.verify(check_model=False)
    assert report.ok and report.problems == []
    exponents = [n for n in reads if "/exponent/" in n]
    assert exponents and max(reads[n] for n in exponents) == 1  # hashed and summed for the head in one read
    assert max(reads.values()) == 1
    # The files the array reads hashed are not read again for the journal's file check.
    chunks = {rel for rel in reads if "/c/" in rel}
    assert chunks and not chunks & hashed_by_journal


def test_worker_processes_find_what_threads_find(
    history: tuple[Ledger, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forked readers' content hashes, file digests and head sums (NumPy) are the
    threads' (torch), on a sound ledger and on one with a damaged and a missing chunk."""
    ledger, _ = history
    sound = tiny.verify_both_ways(ledger, monkeypatch)
    assert sound["ok"] and sound["problems"] == [] and sound["checked_arrays"] > 50

    damaged = _copy(ledger.path, tmp_path / "led")
    state = damaged.state()
    active = state.active[-1]
    traces = damaged.path / state.traces[active]
    trace = sorted(p for p in traces.rglob("*") if p.is_file() and "/c/" in p.as_posix())[0]
    trace.write_bytes(trace.read_bytes()[:-1] + bytes([trace.read_bytes()[-1] ^ 1]))
    exponent = sorted((damaged.path / state.exponent_prefix(active)).glob("*/c/0"))[0]
    exponent.unlink()
    report = tiny.verify_both_ways(damaged, monkeypatch)
    paths = [p["path"] for p in report["problems"] if p["severity"] == "error"]
    rel = lambda f: f.relative_to(damaged.path).as_posix()  # noqa: E731
    assert rel(trace) in paths and rel(exponent) in paths and "head" in paths


def test_ctrl_c_in_verify_stops_its_worker_processes(
    history: tuple[Ledger, list[list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import multiprocessing

    from kvw_ledger import scrub, verify

    ledger, _ = history

    def interrupted(self: scrub.Findings, other: scrub.Findings) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scrub, "PROCESS_MIN_ARRAYS", 0)
    monkeypatch.setattr(verify, "hash_workers", lambda: 2)
    monkeypatch.setattr(scrub.Findings, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ledger.verify(check_model=False)
    assert multiprocessing.active_children() == []
    assert gc.get_freeze_count() == 0 and gc.isenabled()  # the parent's collector is as it was (unfrozen)


def test_history_reads_the_journal_once(
    history: tuple[Ledger, list[list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvw_ledger.history import build_history

    ledger, expected = history
    calls: list[int] = []
    real = Ledger.entries
    monkeypatch.setattr(Ledger, "entries", lambda self: calls.append(1) or real(self))
    rows = build_history(ledger)
    assert len(calls) == 1
    assert [row.active for row in rows] == expected
