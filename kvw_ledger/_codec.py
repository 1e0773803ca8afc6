"""The Zarr v3 chunk codec of a ledger's arrays: one array per directory, bit-exact.

An array is a ``zarr.json`` and its chunk files ``c/<i>/<j>...``, each chunk
little-endian, padded to the full chunk shape with the fill value 0, zstd
(level 3), then its crc32c. zarr-python writes the metadata (and 0-d arrays
whole); the chunks of every other array are written and read here without it,
byte for byte what zarr writes, because each zarr call is a round trip through
its event-loop thread. Arrays in any other layout are read through zarr.
``tests/test_codec.py`` checks both directions against ``zarr.open_array``.

Tensors NumPy cannot hold (bfloat16, float8...) are stored as the unsigned
integer of the same width, with the torch dtype's name in attr ``dtype``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from kvw_ledger import _chunks
from kvw_ledger._chunks import CODEC_ERRORS, Digests
from kvw_ledger.errors import BadInputError, IntegrityError

__all__ = [
    "chunk_shape",
    "dtype_name",
    "from_numpy",
    "read_array",
    "read_bytes",
    "read_hashed",
    "tensor_hash",
    "to_numpy",
    "write_array",
]

# torch dtypes NumPy holds natively; any other (bfloat16, float8...) is stored as
# the unsigned integer of the same width, with the torch name in attr "dtype".
_NATIVE = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}



def read_bytes(path: Path | str) -> bytes | None:
    """A file's bytes, or None when it does not exist.

    Raises:
        IntegrityError: naming the file, when it exists and cannot be read.
    """
    return _chunks.read_file(Path(), str(path), None)


def dtype_name(dtype: torch.dtype) -> str:
    """The torch dtype's name without its module, e.g. ``bfloat16`` (attr ``dtype``)."""
    return str(dtype).removeprefix("torch.")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a C-contiguous NumPy array (unsigned ints for dtypes
    NumPy lacks, such as bfloat16)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise BadInputError(f"expected a dense torch.Tensor, got {type(t).__name__}")
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    if t.dtype in _NATIVE:
        return t.numpy()
    width = t.dtype.itemsize
    if width not in _INT_OF_WIDTH:
        raise BadInputError(f"cannot store tensors of dtype {t.dtype}")
    return t.view(_INT_OF_WIDTH[width]).numpy().view(f"u{width}")


def from_numpy(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``dtype`` whose bits :func:`to_numpy` gave (shares ``data``'s memory)."""
    if dtype in _NATIVE:
        return torch.from_numpy(data)
    signed = _INT_OF_WIDTH[dtype.itemsize]
    return torch.from_numpy(data.view(str(signed).removeprefix("torch."))).view(dtype)


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """The chunks of an array: 2-D and up split along axis 0 into about ``chunk_bytes``
    each, anything smaller in one chunk."""
    # Zarr needs every chunk extent >= 1, even for empty dimensions.
    if len(shape) < 2:
        return tuple(max(1, s) for s in shape)
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows = min(max(1, shape[0]), max(1, chunk_bytes // row_bytes))
    return (rows, *(max(1, s) for s in shape[1:]))


def write_array(
    path: Path, tensor: torch.Tensor, attrs: Mapping[str, Any] | None, chunk_bytes: int
) -> None:
    """Write ``tensor`` as a standalone Zarr array rooted at directory ``path``.

    Args:
        path: the array's directory (created; nothing is fsynced here).
        tensor: a dense tensor of any dtype :func:`to_numpy` takes.
        attrs: extra JSON attributes; ``dtype`` is the codec's own.
        chunk_bytes: about how many bytes one chunk of a 2-D or larger array holds.

    Raises:
        BadInputError: a non-dense tensor, an unstorable dtype or bad ``attrs``.
    """
    data = to_numpy(tensor)
    extra = dict(attrs or {})
    if "dtype" in extra:
        raise BadInputError("array attrs must not set 'dtype'; the store writes it")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"array attrs are not JSON-serialisable: {e}") from e
    attributes = {"dtype": dtype_name(tensor.dtype), **extra}
    chunks = chunk_shape(data.shape, data.dtype.itemsize, chunk_bytes)
    key = (data.shape, data.dtype.str, chunks, json.dumps(attributes))
    meta = _META_CACHE.get(key)
    if meta is not None and data.ndim > 0:
        # The same metadata zarr wrote before for this shape, dtype and attributes:
        # the request and head arrays of a model repeat a handful of them.
        path.mkdir(parents=True, exist_ok=True)
        (path / "zarr.json").write_bytes(meta)
        _write_own_chunks(path, data, chunks)
        return
    arr = zarr.create_array(
        store=LocalStore(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        fill_value=0,
        # Otherwise zarr skips chunks equal to the fill value, and -0.0 comes back as 0.0.
        config={"write_empty_chunks": True},
        attributes=attributes,
        zarr_format=3,
    )
    if data.ndim == 0:
        arr[...] = data
        return
    if len(_META_CACHE) < 256:
        _META_CACHE[key] = (path / "zarr.json").read_bytes()
    _write_own_chunks(path, data, chunks)


# zarr.json bytes by (shape, dtype, chunks, attributes): zarr's metadata is a pure
# function of these, and writing it through zarr costs an event-loop round trip.
_META_CACHE: dict[tuple[Any, ...], bytes] = {}


def read_array(root: Path, name: str, *, digests: Digests | None = None) -> torch.Tensor:
    """Read array ``name`` (a path under directory ``root``) with its torch dtype restored.

    Args:
        digests: when given, the sha256 of every file this read opens is put in it
            (ledger-relative path -> hex digest, or the OSError opening it raised), from
            the same bytes that were decoded: verify checks the journal's file hashes
            without reading the files a second time. Arrays in a layout only zarr reads
            add nothing.

    Raises:
        RefNotFoundError: naming the array, if it does not exist or is a group.
        IntegrityError: naming the file, if metadata or a chunk is damaged or missing.
    """
    return _read(root, name, digests, hashed=False)[0]


def read_hashed(root: Path, name: str, *, digests: Digests | None = None) -> tuple[torch.Tensor, str]:
    """:func:`read_array` and the array's :func:`tensor_hash`, hashed from the decoded
    chunks without a round trip through torch (what verify does for 50,000 arrays)."""
    tensor, digest = _read(root, name, digests, hashed=True)
    assert digest is not None  # hashed=True always hashes
    return tensor, digest


def _read(root: Path, name: str, digests: Digests | None, *, hashed: bool) -> tuple[torch.Tensor, str | None]:
    meta_path, _, attr, layout = _chunks.read_meta(root, name, digests)
    dtype = _torch_dtype(attr)
    if layout is not None and dtype is not None:
        if layout[2] != _stored_dtype(dtype):
            raise IntegrityError(
                f"{meta_path} is damaged (stored dtype {layout[2]} does not hold {dtype}); the ledger is damaged"
            )
        data = _chunks.read_own_chunks(root, name, layout, digests)
        return from_numpy(data, dtype), _chunks.array_digest(dtype_name(dtype), data) if hashed else None
    tensor = _read_through_zarr(root, name, meta_path, dtype)
    return tensor, tensor_hash(tensor) if hashed else None


@functools.lru_cache(maxsize=256)
def _torch_dtype(attr: str) -> torch.dtype | None:
    """The torch dtype attribute ``dtype`` names, or None."""
    dtype = getattr(torch, attr, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _read_through_zarr(root: Path, name: str, meta_path: str, dtype: torch.dtype | None) -> torch.Tensor:
    """An array in a layout :func:`write_array` does not write, read chunk by chunk by zarr."""
    try:
        if dtype is None:
            raise ValueError("attribute 'dtype' does not name a torch dtype")
        arr = zarr.open_array(store=LocalStore(root, read_only=True), path=name, mode="r")
        chunks, grid = arr.chunks, arr.cdata_shape
        if arr.dtype != _stored_dtype(dtype):
            raise ValueError(f"stored dtype {arr.dtype} does not hold {dtype}")
    except CODEC_ERRORS as e:
        raise IntegrityError(f"{meta_path} is damaged ({e}); the ledger is damaged") from e
    out = np.empty(arr.shape, dtype=arr.dtype)
    # Chunk by chunk, so a damaged or missing chunk is reported by its file name
    # (zarr would silently return the fill value for a missing one).
    for coords in itertools.product(*(range(n) for n in grid)):
        rel = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
        if not (root / rel).is_file():
            raise IntegrityError(f"chunk file {rel} is missing; the ledger is damaged")
        sel = tuple(slice(c * k, (c + 1) * k) for c, k in zip(coords, chunks, strict=True))
        try:
            out[sel] = arr[sel]
        except CODEC_ERRORS as e:
            raise IntegrityError(f"chunk file {rel} is damaged ({e}); the ledger is damaged") from e
    return from_numpy(out, dtype)


@functools.cache
def _stored_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype :func:`to_numpy` gives a tensor of ``dtype``."""
    return to_numpy(torch.empty(0, dtype=dtype)).dtype


@functools.cache
def stored_dtypes() -> dict[str, np.dtype]:
    """The name of each dtype a model's weights or the ledger's arrays come in -> the
    NumPy dtype :func:`to_numpy` stores it as (any other is read through torch)."""
    wide = [getattr(torch, n) for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    return {dtype_name(d): _stored_dtype(d) for d in (*_NATIVE, *wide)}


def tensor_hash(t: torch.Tensor) -> str:
    """The logical sha256 of a tensor, independent of how it is stored.

    The digest covers the UTF-8 line ``{"dtype":"<torch name>","shape":[...]}\\n``
    (compact JSON) followed by the raw C-order little-endian bytes of the data.
    """
    data = to_numpy(t)  # first: it names what is not a dense tensor
    return _chunks.array_digest(dtype_name(t.dtype), data)


# The layout write_array writes is read without zarr (_chunks): every zarr call is a
# round trip through its event-loop thread (about 1 ms each), which made reading the
# small exponent arrays cost ~2 ms apiece, and verify, diff and materialise grow with it.
_ZSTD_LEVEL_3 = Zstd(level=3, checksum=False)  # as ZstdCodec(level=3) in write_array


def _write_own_chunks(path: Path, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Writes the chunk files ``arr[...] = data`` would, byte for byte, without zarr's
    event loop: each chunk little-endian, padded to the full chunk shape with the fill
    value 0 (every chunk written, as ``write_empty_chunks``), zstd, then its crc32c."""
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    grid = [-(-s // k) for s, k in zip(data.shape, chunks, strict=True)]
    for coords in itertools.product(*(range(n) for n in grid)):
        block = little[tuple(slice(c * k, (c + 1) * k) for c, k in zip(coords, chunks, strict=True))]
        if block.shape != chunks:
            padded = np.zeros(chunks, dtype=little.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        body = bytes(_ZSTD_LEVEL_3.encode(np.ascontiguousarray(block)))
        target = path.joinpath("c", *map(str, coords))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
