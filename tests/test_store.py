"""Tests for kvw_ledger.store: the Zarr layout, bit-exact arrays, hashes, head swap."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvw_ledger import store as store_mod
from kvw_ledger.errors import (
    BadInputError,
    FormatVersionError,
    IntegrityError,
    LedgerExistsError,
    LedgerNotFoundError,
    RefNotFoundError,
)
from kvw_ledger.store import FORMAT_VERSION, Store, tensor_hash
from kvw_ledger.weakening import Weakening

SITE = "model.language_model.layers.3.mlp.down_proj"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _disk_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[t.element_size()])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "ledger", {"model": "tiny"})


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Random bits plus -0.0 and NaNs with unusual payloads, as ``dtype``."""
    width = torch.empty(0, dtype=dtype).element_size()
    int_dtype = {2: torch.int16, 4: torch.int32}[width]
    info = torch.iinfo(int_dtype)
    bits = torch.randint(info.min, info.max, (7, 9), dtype=int_dtype)
    nan_payloads = {
        torch.float32: [0x7FC00001, 0x7F800123, -0x00400001],
        torch.float16: [0x7E01, 0x7C03, -0x01FF],
        torch.bfloat16: [0x7FC1, 0x7F81, -0x003F],
    }[dtype]
    flat = bits.view(-1)
    flat[:3] = torch.tensor(nan_payloads, dtype=int_dtype)
    t = bits.view(dtype)
    t.view(-1)[3] = -0.0
    return t


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(store: Store, dtype: torch.dtype) -> None:
    t = _special(dtype)
    rec = store.write_array(f"base/{SITE}", t)
    back = store.read_array(f"base/{SITE}")
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(_bits(back), _bits(t))
    assert store.array_attrs(f"base/{SITE}")["dtype"] == str(dtype).removeprefix("torch.")
    assert rec.sha256 == tensor_hash(t) == store.content_hash(f"base/{SITE}")


def test_bfloat16_is_stored_as_uint16(store: Store) -> None:
    store.write_array(f"base/{SITE}", torch.ones(4, 3, dtype=torch.bfloat16))
    meta = json.loads((store.path / "base" / SITE / "zarr.json").read_text())
    assert meta["data_type"] == "uint16"
    assert meta["attributes"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "t",
    [
        torch.full((5,), -0.0),  # all equal to the fill value except the sign bit
        torch.tensor(2.5),  # 0-d
        torch.empty(0, 4),
        torch.arange(6, dtype=torch.int64).view(2, 3),
        torch.tensor([True, False, True]),
        torch.arange(4, dtype=torch.float64),
        torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn),
    ],
)
def test_round_trip_other_shapes_and_dtypes(store: Store, t: torch.Tensor) -> None:
    store.write_array("requests/r1/trace/s0", t)
    back = store.read_array("requests/r1/trace/s0")
    assert back.dtype == t.dtype and back.shape == t.shape
    if t.numel():
        assert torch.equal(_bits(back), _bits(t))
    assert store.content_hash("requests/r1/trace/s0") == tensor_hash(t)


def test_write_array_keeps_caller_attrs(store: Store) -> None:
    store.write_array(f"retain/stats-1/{SITE}", torch.ones(3), attrs={"tokens": 12})
    assert store.array_attrs(f"retain/stats-1/{SITE}") == {"dtype": "float32", "tokens": 12}
    with pytest.raises(BadInputError, match="dtype"):
        store.write_array(f"retain/stats-1/{SITE}.x", torch.ones(3), attrs={"dtype": "x"})


# ------------------------------------------------------------------ chunking


def test_large_matrix_is_chunked_along_axis_0(store: Store) -> None:
    t = torch.randn(6000, 1024)  # 24 MiB of float32
    rec = store.write_array(f"base/{SITE}", t)
    chunks = sorted(f for f in rec.files if "/c/" in f)
    assert len(chunks) >= 2
    meta = json.loads((store.path / "base" / SITE / "zarr.json").read_text())
    rows, cols = meta["chunk_grid"]["configuration"]["chunk_shape"]
    assert cols == 1024 and 4 << 20 <= rows * cols * 4 <= 16 << 20
    assert chunks == [f"base/{SITE}/c/{i}/0" for i in range(len(chunks))]
    assert torch.equal(store.read_array(f"base/{SITE}"), t)


def test_mostly_zero_exponents_compress_well(store: Store) -> None:
    w = torch.zeros(1 << 18)
    w[torch.randint(0, 1 << 18, (1000,))] = torch.rand(1000)
    rec = store.write_array(f"requests/r1/exponent/{SITE}", w)
    chunk = store.path / next(f for f in rec.files if "/c/" in f)
    assert chunk.stat().st_size < w.numel() * 4 // 10


# -------------------------------------------------------------- files, hashes


def test_record_files_match_disk(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 64)
    before = _disk_files(store.path)
    name = f"requests/r-1/trace/{SITE}"
    rec = store.write_array(name, torch.randn(10, 4))
    new = _disk_files(store.path) - before
    groups = store.group_files("requests/r-1")
    assert set(groups) == {
        "requests/zarr.json",
        "requests/r-1/zarr.json",
        "requests/r-1/trace/zarr.json",
    }
    assert set(rec.files) | set(groups) == new
    assert set(rec.files) == {f"{name}/zarr.json", *(f"{name}/c/{i}/0" for i in range(3))}
    for rel, digest in {**rec.files, **groups}.items():
        assert _sha(store.path / rel) == digest
    assert store.files() == sorted(_disk_files(store.path))


def test_files_ignores_journal_lock_and_temp(store: Store) -> None:
    store.write_array(f"base/{SITE}", torch.ones(2))
    (store.path / "journal").mkdir()
    (store.path / "journal" / "00000001.json").write_text("{}")
    (store.path / "lock").write_text("1")
    (store.path / "head.tmp-x").mkdir()
    (store.path / "head.tmp-x" / "zarr.json").write_text("{}")
    (store.path / "base" / f"zarr.{'a' * 32}.partial").write_text("x")
    (store.path / "stray.bin").write_text("orphan")
    assert store.files() == [
        f"base/{SITE}/c/0",
        f"base/{SITE}/zarr.json",
        "base/zarr.json",
        "stray.bin",
        "zarr.json",
    ]
    assert store.clean_temp() == ["base/zarr." + "a" * 32 + ".partial", "head.tmp-x"]
    assert (store.path / "journal" / "00000001.json").exists() and (store.path / "lock").exists()


def test_every_flipped_chunk_byte_is_detected(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 64)
    name = f"requests/r1/trace/{SITE}"
    t = torch.randn(6, 8)
    rec = store.write_array(name, t)
    assert store.content_hash(name) == tensor_hash(t)
    chunk_files = [rel for rel in rec.files if "/c/" in rel]
    assert len(chunk_files) == 3
    for rel in chunk_files:
        path = store.path / rel
        good = path.read_bytes()
        for i in range(len(good)):
            bad = bytearray(good)
            bad[i] ^= 0x01
            path.write_bytes(bytes(bad))
            try:
                assert store.content_hash(name) != tensor_hash(t), (rel, i)
            except IntegrityError as e:
                assert rel in str(e)
        path.write_bytes(good)
    assert store.content_hash(name) == tensor_hash(t)


def test_missing_chunk_or_metadata_is_an_integrity_error(store: Store) -> None:
    name = f"requests/r1/exponent/{SITE}"
    store.write_array(name, torch.zeros(4))
    (store.path / name / "c" / "0").unlink()
    with pytest.raises(IntegrityError, match=f"{name}/c/0"):
        store.read_array(name)
    (store.path / name / "zarr.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"zarr\.json"):
        store.read_array(name)


def test_read_missing_array(store: Store) -> None:
    with pytest.raises(RefNotFoundError, match=f"no array base/{SITE}"):
        store.read_array(f"base/{SITE}")
    assert not store.has_array(f"base/{SITE}")


def test_refuses_to_overwrite_except_head(store: Store) -> None:
    store.write_array(f"base/{SITE}", torch.ones(3))
    with pytest.raises(LedgerExistsError, match=f"base/{SITE}"):
        store.write_array(f"base/{SITE}", torch.zeros(3))
    assert torch.equal(store.read_array(f"base/{SITE}"), torch.ones(3))
    store.write_array(f"head/{SITE}", torch.ones(3))
    store.write_array(f"head/{SITE}", torch.zeros(2))
    assert torch.equal(store.read_array(f"head/{SITE}"), torch.zeros(2))
    assert store.files() == sorted(_disk_files(store.path))


def test_list_and_has_arrays(store: Store) -> None:
    for name in [
        "requests/r1/exponent/b.1",
        "requests/r1/exponent/a.0",
        "requests/r1/trace/a.0",
        "requests/r2/exponent/a.0",
    ]:
        store.write_array(name, torch.zeros(2))
    assert store.list_arrays("requests/r1/exponent") == [
        "requests/r1/exponent/a.0",
        "requests/r1/exponent/b.1",
    ]
    assert len(store.list_arrays("requests")) == 4
    assert store.list_arrays("") == store.list_arrays("requests")
    assert store.list_arrays("requests/r9") == []
    assert store.has_array("requests/r1/trace/a.0")


def test_delete_returns_removed_files(store: Store) -> None:
    store.write_array("requests/r1/exponent/a.0", torch.zeros(2))
    rec = store.write_array("requests/r1/trace/a.0", torch.zeros(2, 2))
    kept = store.write_array("requests/r2/exponent/a.0", torch.zeros(2))
    before = set(store.files())
    removed = store.delete("requests/r1")
    assert removed == sorted(f for f in before if f.startswith("requests/r1/"))
    assert set(rec.files) <= set(removed)
    assert set(store.files()) == before - set(removed)
    assert set(kept.files) <= set(store.files())
    assert store.delete("requests/r1") == []
    with pytest.raises(BadInputError):
        store.delete("")
    with pytest.raises(BadInputError):
        store.delete("journal")


# ------------------------------------------------------------ create / open


def test_create_and_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    Store.create(path, {"model": "tiny", "sites": ["a"]})
    s = Store.open(path)
    assert s.attrs == {"format_version": FORMAT_VERSION, "model": "tiny", "sites": ["a"]}
    s.attrs["model"] = "changed"
    assert s.attrs["model"] == "tiny"


def test_create_refuses_non_empty_path(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("hi")
    with pytest.raises(LedgerExistsError, match=str(tmp_path)):
        Store.create(tmp_path, {})
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    Store.create(empty, {})
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700


def test_open_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError) as e:
        Store.open(tmp_path / "nope")
    assert str(e.value) == f"no ledger at {tmp_path / 'nope'}; create one with `kvw-ledger init`"


@pytest.mark.parametrize(
    ("version", "match"),
    [
        (FORMAT_VERSION + 1, f"format {FORMAT_VERSION + 1}, this one reads up to {FORMAT_VERSION}"),
        ("1", "not a positive integer"),
        (True, "not a positive integer"),
        (None, "not a positive integer"),
    ],
)
def test_open_checks_format_version(tmp_path: Path, version: object, match: str) -> None:
    Store.create(tmp_path / "l", {})
    meta_path = tmp_path / "l" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = version
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match=match):
        Store.open(tmp_path / "l")


def test_open_unreadable_root_metadata(tmp_path: Path) -> None:
    Store.create(tmp_path / "l", {})
    (tmp_path / "l" / "zarr.json").write_text("][")
    with pytest.raises(IntegrityError, match=r"zarr\.json"):
        Store.open(tmp_path / "l")


def test_permissions_are_owner_only_and_umask_restored(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        s = Store.create(tmp_path / "ledger", {})
        s.write_array(f"base/{SITE}", torch.ones(3, 2, dtype=torch.bfloat16))
        s.write_array(f"requests/r1/exponent/{SITE}", torch.zeros(2))
        s.write_head(Weakening({SITE: torch.zeros(2)}), 1, "d")
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)
    paths = [s.path, *s.path.rglob("*")]
    assert len(paths) > 10
    for p in paths:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


# ---------------------------------------------------------------------- head


def test_head_round_trip_and_replace(store: Store) -> None:
    assert store.read_head_cache() is None
    heads = {SITE: torch.rand(5), "model.layers.0.mlp.experts.2": torch.rand(3)}
    store.write_head(Weakening(heads), 7, "abc")
    got = store.read_head_cache()
    assert got is not None
    tensors, version, digest = got.weakening.exponents, got.version, got.digest
    assert (version, digest) == (7, "abc")
    assert tensors.keys() == heads.keys()
    assert all(torch.equal(tensors[k], heads[k]) for k in heads)
    store.write_head(Weakening({SITE: torch.zeros(5)}), 8, "def")
    got = store.read_head_cache()
    assert got is not None and list(got.weakening.exponents) == [SITE] and (got.version, got.digest) == (8, "def")
    assert [e for e in os.listdir(store.path) if ".tmp-" in e or ".old-" in e] == []


def test_head_crash_leftovers(store: Store) -> None:
    store.write_array(f"base/{SITE}", torch.ones(2))
    store.write_head(Weakening({SITE: torch.ones(2)}), 1, "d1")
    files = store.files()
    # A crash after building the new head but before the swap: the old head stands.
    (store.path / "head.tmp-x" / SITE).mkdir(parents=True)
    (store.path / "head.tmp-x" / SITE / "zarr.json").write_text("half")
    got = store.read_head_cache()
    assert got is not None and got.version == 1
    assert store.files() == files
    # A crash between the two renames: no head at all.
    os.rename(store.path / "head", store.path / "head.old-y")
    assert store.read_head_cache() is None
    assert store.files() == [f for f in files if not f.startswith("head/")]
    store.write_head(Weakening({SITE: torch.ones(2)}), 2, "d2")
    got = store.read_head_cache()
    assert got is not None and (got.version, got.digest) == (2, "d2")


def test_write_head_validates(store: Store) -> None:
    with pytest.raises(BadInputError, match="version"):
        store.write_head(Weakening({}), -1, "d")
    with pytest.raises(BadInputError, match="a/b"):
        store.write_head(Weakening({"a/b": torch.ones(1)}), 1, "d")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("requests/bad id/exponent/s", "'bad id'"),
        ("requests/-r1/exponent/s", "'-r1'"),
        ("requests/" + "r" * 129 + "/exponent/s", "r" * 129),
        ("retain/st@ts/s", "stats id 'st@ts'"),
        ("base/a..b", "site name 'a..b'"),
        ("base/.a", "site name '.a'"),
        ("base/a.", "site name 'a.'"),
        ("base/", "site name ''"),
        ("base/a/b", "'base/a/b'"),
        ("head/__x", "site name '__x'"),
        ("requests/r1/grad/s", "'grad'"),
        ("journal/00000001.json", "'journal/00000001.json'"),
        ("../etc/s", "'../etc/s'"),
    ],
)
def test_bad_names_are_rejected(store: Store, name: str, needle: str) -> None:
    with pytest.raises(BadInputError) as e:
        store.write_array(name, torch.ones(1))
    assert needle in str(e.value)
    with pytest.raises(BadInputError):
        store.read_array(name)


@pytest.mark.parametrize(
    "name",
    [
        "requests/A1._-z/exponent/model.layers.0.mlp.experts.2",
        "retain/" + "s" * 128 + "/vision_tower.blocks.1-x.fc_2",
    ],
)
def test_good_names_are_accepted(store: Store, name: str) -> None:
    written = torch.arange(3, dtype=torch.float32) - 1.5
    record = store.write_array(name, written)
    assert record.name == name
    reopened = Store.open(store.path)  # from disk, not from anything the writer kept
    assert reopened.has_array(name)
    assert name in reopened.list_arrays(name.split("/", 1)[0])
    read = reopened.read_array(name)
    assert read.dtype == written.dtype and torch.equal(read, written)
    assert record.sha256 == tensor_hash(written)


def test_bad_prefix_and_tensor(store: Store) -> None:
    with pytest.raises(BadInputError, match="'requests//r1'"):
        store.list_arrays("requests//r1")
    with pytest.raises(BadInputError, match="list"):
        store.write_array(f"base/{SITE}", [1.0])  # type: ignore[arg-type]


# ----------------------------------------------------------------- tensor_hash

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float64]


@st.composite
def _tensors(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[str, tuple[int, ...], bytes]]:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = 1
    for s in shape:
        n *= s
    width = torch.empty(0, dtype=dtype).element_size()
    raw = draw(st.binary(min_size=n * width, max_size=n * width))
    t = torch.tensor(list(raw), dtype=torch.uint8)
    return t.view(dtype).reshape(shape), (str(dtype), shape, raw)


@settings(max_examples=200, deadline=None)
@given(_tensors(), _tensors())
def test_tensor_hash_is_stable_and_distinguishes(
    a: tuple[torch.Tensor, tuple[str, tuple[int, ...], bytes]],
    b: tuple[torch.Tensor, tuple[str, tuple[int, ...], bytes]],
) -> None:
    (ta, ka), (tb, kb) = a, b
    assert tensor_hash(ta) == tensor_hash(ta.clone())
    if ta.dim() == 2:
        assert tensor_hash(ta) == tensor_hash(ta.t().contiguous().t())  # strides do not matter
    assert (tensor_hash(ta) == tensor_hash(tb)) == (ka == kb)


def test_tensor_hash_distinguishes_shape_and_dtype_of_same_bytes() -> None:
    t = torch.arange(6, dtype=torch.int16)
    hashes = {
        tensor_hash(t),
        tensor_hash(t.view(2, 3)),
        tensor_hash(t.view(3, 2)),
        tensor_hash(t.view(torch.float16)),
        tensor_hash(t.view(torch.bfloat16)),
        tensor_hash(t.view(torch.uint8)),
    }
    assert len(hashes) == 6
