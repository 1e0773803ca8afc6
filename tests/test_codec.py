"""Tests for kvw_ledger._codec against zarr-python itself: it reads what the codec writes,
the codec's files are the ones zarr writes, and the codec reads what zarr writes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from kvw_ledger import _chunks, _codec
from kvw_ledger.errors import IntegrityError
from kvw_ledger.store import tensor_hash

# Every dtype the ledger writes: base weights as the model holds them (bfloat16, float16,
# float32, float64), and float32 for retain means, exponents, traces, log-scales and the head.
_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
_CHUNK_BYTES = [8, 24, 64, 8 << 20]  # the small ones split even tiny arrays into partial chunks


@st.composite
def _tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of arbitrary bits (NaNs, infinities, -0.0 included), 0 to 3 dimensions."""
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
    width = torch.empty(0, dtype=dtype).element_size()
    n = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=n * width, max_size=n * width))
    return torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return _codec.to_numpy(t).tobytes()


def _zarr_reads(path: Path) -> Any:
    return zarr.open_array(store=LocalStore(path, read_only=True), mode="r")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@settings(max_examples=80, deadline=None)
@given(_tensors(), st.sampled_from(_CHUNK_BYTES))
def test_zarr_reads_what_the_codec_writes(t: torch.Tensor, chunk_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _codec.write_array(root / "a", t, {"log_scale": 0.5}, chunk_bytes)
        arr = _zarr_reads(root / "a")
        stored = _codec.to_numpy(t)
        assert arr.shape == tuple(t.shape)
        assert arr.dtype == stored.dtype  # bfloat16 as uint16
        assert arr.chunks == _codec.chunk_shape(tuple(t.shape), stored.dtype.itemsize, chunk_bytes)
        assert dict(arr.attrs) == {"dtype": str(t.dtype).removeprefix("torch."), "log_scale": 0.5}
        assert np.asarray(arr[...]).tobytes() == _bits(t)
        back = _codec.read_array(root, "a")
        assert back.dtype == t.dtype and back.shape == t.shape and _bits(back) == _bits(t)


@settings(max_examples=40, deadline=None)
@given(_tensors(), st.sampled_from(_CHUNK_BYTES))
def test_the_codec_writes_the_files_zarr_writes(t: torch.Tensor, chunk_bytes: int) -> None:
    """Byte for byte: the codec's own chunk writer is zarr's ``arr[...] = data``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _codec.write_array(root / "ours", t, None, chunk_bytes)
        data = _codec.to_numpy(t)
        arr = zarr.create_array(
            store=LocalStore(root / "zarrs"),
            shape=data.shape,
            dtype=data.dtype,
            chunks=_codec.chunk_shape(data.shape, data.dtype.itemsize, chunk_bytes),
            compressors=[ZstdCodec(level=3), Crc32cCodec()],
            fill_value=0,
            config={"write_empty_chunks": True},
            attributes={"dtype": str(t.dtype).removeprefix("torch.")},
            zarr_format=3,
        )
        arr[...] = data
        assert _files(root / "ours") == _files(root / "zarrs")


def test_a_compressible_request_array_is_zarrs_to_the_byte() -> None:
    """Tiny arrays compress alike at every zstd level; a mostly-zero exponent of a real
    width (and its 2-D trace, several chunks with a partial last one) does not."""
    g = torch.Generator().manual_seed(0)
    exponent = torch.rand(1 << 16, generator=g) * (torch.rand(1 << 16, generator=g) < 0.1)
    trace = torch.rand(7, 1 << 12, generator=g).to(torch.bfloat16)
    for t, chunk_bytes in ((exponent, 8 << 20), (trace, 3 << 13)):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _codec.write_array(root / "ours", t, None, chunk_bytes)
            _zarr_writes(
                root / "zarrs", t, _codec.chunk_shape(tuple(t.shape), t.element_size(), chunk_bytes),
                compressors=[ZstdCodec(level=3), Crc32cCodec()],
            )
            ours, theirs = _files(root / "ours"), _files(root / "zarrs")
            assert len(ours) == (2 if t.dim() == 1 else 4) and ours == theirs


def test_partial_edge_chunks_round_trip() -> None:
    """10 rows in chunks of 4: the last chunk holds 2 rows and is padded on disk."""
    t = torch.arange(30, dtype=torch.float32).reshape(10, 3).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _codec.write_array(root / "a", t, None, chunk_bytes=24)  # 24 // (3 * 2 bytes) = 4 rows
        arr = _zarr_reads(root / "a")
        assert arr.chunks == (4, 3) and arr.cdata_shape == (3, 1)
        assert sorted(p.name for p in (root / "a" / "c").iterdir()) == ["0", "1", "2"]
        assert np.asarray(arr[8:10]).tobytes() == _bits(t[8:10])
        assert torch.equal(_codec.read_array(root, "a"), t)


@st.composite
def _zarr_arrays(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A tensor of 1 to 3 dimensions and any chunk shape for it (edges partial in every axis)."""
    t = draw(_tensors().filter(lambda t: t.dim() >= 1))
    chunks = tuple(draw(st.integers(1, max(1, s))) for s in t.shape)
    return t, chunks


def _zarr_writes(path: Path, t: torch.Tensor, chunks: tuple[int, ...], **layout: Any) -> None:
    data = _codec.to_numpy(t)
    arr = zarr.create_array(
        store=LocalStore(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        fill_value=0,
        config={"write_empty_chunks": True},
        attributes={"dtype": str(t.dtype).removeprefix("torch.")},
        zarr_format=3,
        **layout,
    )
    arr[...] = data


@settings(max_examples=60, deadline=None)
@given(_zarr_arrays(), st.sampled_from([1, 3, 9]))
def test_the_codec_reads_what_zarr_writes_in_its_layout(
    case: tuple[torch.Tensor, tuple[int, ...]], level: int
) -> None:
    """Arrays zarr wrote with the ledger's codecs are read by the codec's own chunk reader
    (whatever the zstd level or chunk shape), bit for bit."""
    t, chunks = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _zarr_writes(root / "a", t, chunks, compressors=[ZstdCodec(level=level), Crc32cCodec()])
        meta = json.loads((root / "a" / "zarr.json").read_text())
        assert _chunks.own_layout(meta) is not None  # the fast path, not zarr, reads it
        back = _codec.read_array(root, "a")
        assert back.dtype == t.dtype and back.shape == t.shape and _bits(back) == _bits(t)


@pytest.mark.parametrize(
    "layout",
    [
        {"compressors": None},  # bytes alone
        {"compressors": [ZstdCodec(level=3)]},  # no checksum
        {"serializer": BytesCodec(endian="big"), "compressors": [ZstdCodec(level=3), Crc32cCodec()]},
    ],
    ids=["uncompressed", "zstd-only", "big-endian"],
)
@pytest.mark.parametrize("dtype", _DTYPES)
def test_other_zarr_layouts_are_read_through_zarr(layout: dict[str, Any], dtype: torch.dtype) -> None:
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _zarr_writes(root / "a", t, (2, 2), **layout)
        assert _chunks.own_layout(json.loads((root / "a" / "zarr.json").read_text())) is None
        back = _codec.read_array(root, "a")
        assert back.dtype == dtype and tensor_hash(back) == tensor_hash(t)
        # Missing chunks are named, not filled with zeros as zarr would.
        (root / "a" / "c" / "2" / "1").unlink()
        with pytest.raises(IntegrityError, match="c/2/1"):
            _codec.read_array(root, "a")


def _reference_hash(t: torch.Tensor) -> str:
    """tensor_hash as its docstring defines it, spelled out independently of the codec."""
    import hashlib

    header = json.dumps({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}, separators=(",", ":"))
    return hashlib.sha256(header.encode() + b"\n" + _bits(t)).hexdigest()


@settings(max_examples=60, deadline=None)
@given(_tensors(), st.sampled_from(_CHUNK_BYTES))
def test_one_read_gives_the_tensor_its_hash_and_its_files_digests(t: torch.Tensor, chunk_bytes: int) -> None:
    """What verify reads once: the tensor, its content hash and every file's sha256."""
    import hashlib

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _codec.write_array(root / "a", t, None, chunk_bytes)
        digests: _codec.Digests = {}
        back, digest = _codec.read_hashed(root, "a", digests=digests)
        assert back.dtype == t.dtype and back.shape == t.shape and _bits(back) == _bits(t)
        assert digest == _reference_hash(t) == tensor_hash(t)
        expected = {f"a/{rel}": hashlib.sha256(raw).hexdigest() for rel, raw in _files(root / "a").items()}
        if t.dim() > 0:  # a 0-d array zarr wrote whole is read through zarr, which hashes nothing
            assert digests == expected


def test_a_damaged_chunk_is_named_and_its_digest_still_recorded() -> None:
    """verify reports a damaged chunk by name and the journal's file check sees its real
    sha256, not a digest of what it should have been."""
    import hashlib

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _codec.write_array(root / "a", t, None, 16)
        chunk = root / "a" / "c" / "1" / "0"
        chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
        digests: _codec.Digests = {}
        with pytest.raises(IntegrityError, match="c/1/0"):
            _codec.read_hashed(root, "a", digests=digests)
        assert digests["a/c/1/0"] == hashlib.sha256(chunk.read_bytes()).hexdigest()
        (root / "a" / "c" / "0" / "0").unlink()
        digests = {}
        with pytest.raises(IntegrityError, match="c/0/0 is missing"):
            _codec.read_hashed(root, "a", digests=digests)
        assert isinstance(digests["a/c/0/0"], FileNotFoundError)


@pytest.mark.parametrize("dtype", _DTYPES)
def test_arrays_zarr_reads_hash_as_the_codec_does(dtype: torch.dtype) -> None:
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _zarr_writes(root / "a", t, (2, 2), compressors=None)
        back, digest = _codec.read_hashed(root, "a")
        assert digest == _reference_hash(t) and _bits(back) == _bits(t)
