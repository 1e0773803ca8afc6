"""The ledger's own array layout read without torch or zarr: each file read once (and
hashed from the bytes read), each distinct ``zarr.json`` parsed once, chunks checked
by their crc32c and decoded to NumPy, and the content digest ``tensor_hash`` defines.

``_codec`` makes tensors from what this reads; verify's worker processes use it
alone, so that a forked worker touches neither torch's thread pool nor zarr's
event-loop thread.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs.zstd import Zstd

from kvw_ledger._fs import sha256_bytes
from kvw_ledger._tree import under
from kvw_ledger.errors import IntegrityError, RefNotFoundError
from kvw_ledger.root import parse_zarr_meta

__all__ = [
    "ABSENT",
    "CODEC_ERRORS",
    "Digests",
    "Layout",
    "array_digest",
    "own_layout",
    "read_file",
    "read_meta",
    "read_own_chunks",
]

Digests = dict[str, str | OSError]  # ledger-relative file -> sha256, or the error reading it
Layout = tuple[tuple[int, ...], tuple[int, ...], np.dtype]  # shape, chunk shape, stored dtype

ABSENT = (FileNotFoundError, NotADirectoryError)
CODEC_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, KeyError)

# The layout _codec.write_array writes: bytes little-endian -> zstd -> crc32c, c/i/j keys.
_OWN_CODECS = ["bytes", "zstd", "crc32c"]
_OWN_KEYS = {"name": "default", "configuration": {"separator": "/"}}
_ZSTD = Zstd()  # decoding needs no level; the frame says how it was made


def read_file(
    root: Path | str, rel: str, digests: Digests | None, absent: tuple[type[OSError], ...] = ABSENT
) -> bytes | None:
    """The bytes of file ``rel`` under ``root``, None when opening it raises one of
    ``absent``; with ``digests``, its sha256 or the OSError opening it (what the
    journal's own hashing of the file would have met) is put in there.

    Raises:
        IntegrityError: naming the file, when it exists and cannot be read.
    """
    try:
        with open(under(root, rel), "rb", buffering=0) as f:  # one read: no buffer to fill
            raw = f.readall()
    except OSError as e:
        if digests is not None:
            digests[rel] = e
        if isinstance(e, absent):
            return None
        raise IntegrityError(f"{under(root, rel)} is unreadable ({e}); the ledger is damaged") from e
    if digests is not None:
        digests[rel] = sha256_bytes(raw)
    return raw


def read_meta(
    root: Path | str, name: str, digests: Digests | None
) -> tuple[str, dict[str, Any], str, Layout | None]:
    """Array ``name``'s metadata: (its ``zarr.json`` path, the parsed metadata, the
    ``dtype`` attribute as a string, its :func:`own_layout` or None).

    Raises:
        RefNotFoundError: naming the array, if it does not exist or is a group.
        IntegrityError: naming the file, if it is unreadable or not Zarr v3 metadata.
    """
    # Strings, not Paths, on this path: verify reads some 50,000 arrays at 1,000 requests.
    meta_path = under(root, f"{name}/zarr.json")
    # A directory named zarr.json is no array, as os.path.isfile would say.
    raw = read_file(root, f"{name}/zarr.json", digests, (*ABSENT, IsADirectoryError))
    if raw is None:
        raise RefNotFoundError(f"no array {name} in ledger {root}")
    meta, attr, layout = _parsed(raw, meta_path)
    if meta.get("node_type") != "array":
        raise RefNotFoundError(f"{name} in ledger {root} is a group, not an array")
    return meta_path, meta, attr, layout


def _parsed(raw: bytes, meta_path: str) -> tuple[dict[str, Any], str, Layout | None]:
    """Remembered by the file's bytes: a model's arrays repeat a handful of metadata,
    and parsing and checking each cost more than decoding its chunk."""
    known = _PARSED.get(raw)
    if known is not None:
        return known
    meta = parse_zarr_meta(raw, meta_path)
    parsed = (meta, str(meta.get("attributes", {}).get("dtype")), own_layout(meta))
    if len(_PARSED) < 256:
        _PARSED[raw] = parsed
    return parsed


# Parsed metadata by its zarr.json bytes; callers only read it.
_PARSED: dict[bytes, tuple[dict[str, Any], str, Layout | None]] = {}


def own_layout(meta: Mapping[str, Any]) -> Layout | None:
    """(shape, chunk shape, stored dtype) when ``meta`` is exactly what
    ``_codec.write_array`` writes (a regular grid of ``c/i/j`` chunks, bytes
    little-endian -> zstd -> crc32c, at least one dimension); None otherwise, and
    zarr reads it."""
    try:
        codecs = meta["codecs"]
        shape = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        ok = (
            [c["name"] for c in codecs] == _OWN_CODECS
            and codecs[0]["configuration"] == {"endian": "little"}
            and meta["chunk_grid"]["name"] == "regular"
            and meta["chunk_key_encoding"] == _OWN_KEYS
            and not meta.get("storage_transformers")
            and len(shape) == len(chunks) >= 1
            and all(type(s) is int and s >= 0 for s in shape)
            and all(type(c) is int and c >= 1 for c in chunks)
            and isinstance(meta["data_type"], str)
        )
        stored = np.dtype(meta["data_type"]) if ok else None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None
    if stored is None or stored.name != meta["data_type"] or stored.kind not in "biufc":
        return None
    return shape, chunks, stored


def read_own_chunks(
    root: Path | str, name: str, layout: Layout, digests: Digests | None
) -> np.ndarray:
    """Decodes every chunk file of an array in :func:`own_layout`, each checked by its crc32c.

    Raises:
        IntegrityError: naming the chunk file, if it is missing or damaged.
    """
    shape, chunks, stored = layout
    out = np.empty(shape, dtype=stored)
    on_disk = stored.newbyteorder("<")
    size = math.prod(chunks) * stored.itemsize  # zarr pads edge chunks to the full shape
    grid = [-(-s // k) for s, k in zip(shape, chunks, strict=True)]
    for coords in itertools.product(*(range(n) for n in grid)):
        rel = f"{name}/c/{'/'.join(map(str, coords))}"
        raw = read_file(root, rel, digests)
        if raw is None:
            raise IntegrityError(f"chunk file {rel} is missing; the ledger is damaged")
        try:
            data = _decode_chunk(raw, size)
        except CODEC_ERRORS as e:
            raise IntegrityError(f"chunk file {rel} is damaged ({e}); the ledger is damaged") from e
        block = np.frombuffer(data, dtype=on_disk).reshape(chunks)
        sel = tuple(
            slice(c * k, min((c + 1) * k, s)) for c, k, s in zip(coords, chunks, shape, strict=True)
        )
        out[sel] = block[tuple(slice(0, part.stop - part.start) for part in sel)]
    return out


def _decode_chunk(raw: bytes, size: int) -> bytes:
    """crc32c (little-endian, last 4 bytes) checked, then zstd; ValueError if anything is off."""
    if len(raw) < 4:
        raise ValueError("shorter than its checksum")
    body = raw[:-4]
    if google_crc32c.value(body).to_bytes(4, "little") != raw[-4:]:
        raise ValueError("crc32c checksum mismatch")
    data = bytes(_ZSTD.decode(body))
    if len(data) != size:
        raise ValueError(f"decodes to {len(data)} bytes, expected {size}")
    return data


def array_digest(dtype_name: str, data: np.ndarray) -> str:
    """``tensor_hash`` of the tensor of torch dtype ``dtype_name`` whose bits ``data``
    holds: sha256 of ``{"dtype":"<name>","shape":[...]}\\n`` then the C-order
    little-endian bytes."""
    h = hashlib.sha256(_hash_header(dtype_name, data.shape))
    if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and sys.byteorder == "big"):
        data = data.astype(data.dtype.newbyteorder("<"))
    h.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _hash_header(dtype_name: str, shape: tuple[int, ...]) -> bytes:
    header = json.dumps({"dtype": dtype_name, "shape": list(shape)}, separators=(",", ":"))
    return header.encode() + b"\n"
