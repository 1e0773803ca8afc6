"""Streaming safetensors export: rewrite a model's weight files one tensor at a time.

This module knows models, not ledgers: the caller passes a ``transform`` that
returns the new value of a tensor (or None to keep it). Memory stays at about
two tensors (one and its transform) whatever the model size: each output file's
header is written first (the transform keeps every dtype and shape, so the source
header's offsets stay valid), then each tensor is loaded, transformed, written
and freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from kvw_ledger._fs import fsync_dir, fsync_file
from kvw_ledger.errors import BadInputError, LedgerExistsError
from kvw_ledger.model_files import copyable_files, weight_files

__all__ = [
    "PROVENANCE_FILE",
    "PROVENANCE_KEY",
    "TensorInfo",
    "Transform",
    "export_model",
    "read_safetensors_header",
]

PROVENANCE_KEY = "kvw_ledger.provenance"  # key in each safetensors file's __metadata__
PROVENANCE_FILE = "kvw_provenance.json"

Transform = Callable[[str, str, torch.Tensor], torch.Tensor | None]

# The safetensors library refuses larger headers; so do we, before allocating them.
_MAX_HEADER = 100_000_000
_COPY_BLOCK = 1 << 20

# Bits per element of the safetensors dtypes, to check that offsets fit shapes.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str  # safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [begin, end) in bytes, relative to the end of the header

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.data_offsets[1] - self.data_offsets[0]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_header(path: Path) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Return (header length, tensors in header order, __metadata__), fully validated."""
    bad = f"{path}: not a valid safetensors file"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInputError(f"{bad} (only {len(prefix)} bytes, truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise BadInputError(
                    f"{bad} (header length {n} exceeds the file size {size}, truncated?)"
                )
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{bad} (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise BadInputError(f"{bad} (header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadInputError(f"{bad} (__metadata__ must map strings to strings)")

    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(type(o) is int for o in offsets)
            )
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise BadInputError(f"{bad} (malformed entry for tensor {key!r})")
        info = TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None and info.nbytes * 8 != math.prod(info.shape) * bits:
            raise BadInputError(f"{bad} (tensor {key!r}: offsets do not match dtype and shape)")
        tensors[key] = info

    # Data must tile the rest of the file exactly, as the safetensors library requires.
    pos = 0
    for key, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        begin, end = info.data_offsets
        if begin != pos or end < begin:
            raise BadInputError(f"{bad} (tensor {key!r}: data offsets overlap or leave a gap)")
        pos = end
    if 8 + n + pos != size:
        raise BadInputError(
            f"{bad} (data is {size - 8 - n} bytes, the header describes {pos}; truncated?)"
        )
    return n, tensors, metadata


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors file's header without loading any tensor.

    Returns:
        (tensor name -> :class:`TensorInfo` in header order, the ``__metadata__`` dict).

    Raises:
        BadInputError: the file is truncated or its header is garbled; names the file.
    """
    _, tensors, metadata = _read_header(Path(path))
    return tensors, metadata


def _encode_header(
    tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str], where: Path
) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for key, info in tensors.items():
        header[key] = {
            "dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)
        }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-byte aligned
    if len(raw) > _MAX_HEADER:
        raise BadInputError(
            f"{where}: the header would exceed {_MAX_HEADER} bytes; shrink the provenance"
        )
    return raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # bfloat16 too
    if sys.byteorder == "big" and t.element_size() > 1:
        # safetensors is little-endian on disk.
        data = data.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return data.numpy().data


# safetensors dtypes torch can view raw little-endian bytes as.
_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
    "F64": torch.float64, "C64": torch.complex64, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}


@contextlib.contextmanager
def _tensor_reader(
    src: Path, header_length: int, tensors: Mapping[str, TensorInfo]
) -> Iterator[Callable[[str, TensorInfo], torch.Tensor]]:
    """Yields ``read(key, info) -> tensor`` for one safetensors file.

    Tensors are read with plain reads into buffers of their own: through safetensors'
    mmap every page read stays resident, counted in the process's RSS, until the file
    is closed, so exporting a shard held the whole shard plus a tensor. Dtypes torch
    cannot view (F4, F6, ...) and big-endian hosts still go through ``safe_open``.
    """
    if sys.byteorder == "little" and all(i.dtype in _TORCH_DTYPES for i in tensors.values()):
        start = 8 + header_length
        try:
            fh = src.open("rb")
        except OSError as e:
            raise BadInputError(f"{src}: cannot read: {e}") from e

        def read(key: str, info: TensorInfo) -> torch.Tensor:
            dtype = _TORCH_DTYPES[info.dtype]
            if not info.nbytes:
                return torch.empty(info.shape, dtype=dtype)
            buf = torch.empty(info.nbytes, dtype=torch.uint8)  # not zero-filled: read over
            fh.seek(start + info.data_offsets[0])
            if fh.readinto(buf.numpy().data) != info.nbytes:
                raise BadInputError(f"{src}: cannot read tensor {key}: the file is truncated")
            return buf.view(dtype).reshape(info.shape)

        with fh:
            yield read
        return
    try:
        reader = safe_open(str(src), framework="pt")
    except SafetensorError as e:
        raise BadInputError(f"{src}: not a readable safetensors file: {e}") from e

    with reader as f:

        def read_mapped(key: str, info: TensorInfo) -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except SafetensorError as e:
                raise BadInputError(f"{src}: cannot read tensor {key}: {e}") from e

        yield read_mapped


def _copy_bytes(src: BinaryIO, out: BinaryIO, offset: int, n: int, where: str) -> None:
    """Appends ``n`` bytes of ``src`` from ``offset`` to ``out``; in the kernel where it can
    (``copy_file_range``), so untouched tensors never pass through this process."""
    out.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                copied = os.copy_file_range(src.fileno(), out.fileno(), n - done, offset + done)
                if copied == 0:
                    break  # end of src: the read below names the truncation
                done += copied
        except OSError:
            pass  # not across these file systems: the rest goes through user space
        out.seek(0, os.SEEK_END)  # the copy moved the descriptor, not the buffered file
    src.seek(offset + done)
    while done < n:
        chunk = src.read(min(_COPY_BLOCK, n - done))
        if not chunk:
            raise BadInputError(f"{where}: the file is truncated")
        out.write(chunk)
        done += len(chunk)


def _export_file(
    src: Path,
    dst: Path,
    transform: Transform,
    provenance_json: str,
    bar: tqdm,
    touches: Callable[[str, str], bool] | None = None,
) -> None:
    header_length, tensors, metadata = _read_header(src)
    new_metadata = {**metadata, PROVENANCE_KEY: provenance_json}
    header = _encode_header(tensors, new_metadata, src)
    data_start = 8 + header_length
    with dst.open("xb") as out, src.open("rb") as raw:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        out.flush()
        with _tensor_reader(src, header_length, tensors) as read:
            for key, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
                if touches is not None and not touches(src.name, key):
                    where = f"{src}: tensor {key}"
                    _copy_bytes(raw, out, data_start + info.data_offsets[0], info.nbytes, where)
                    bar.update(info.nbytes)
                    continue
                tensor = read(key, info)
                new = transform(src.name, key, tensor)
                if new is None:
                    new = tensor
                elif not isinstance(new, torch.Tensor):
                    raise BadInputError(
                        f"{src.name}: transform returned {type(new).__name__} for {key}; "
                        "return a tensor or None"
                    )
                elif new.dtype != tensor.dtype or tuple(new.shape) != tuple(tensor.shape):
                    raise BadInputError(
                        f"{src.name}: transform returned {new.dtype} {tuple(new.shape)} for "
                        f"{key}, expected {tensor.dtype} {tuple(tensor.shape)}; "
                        "it must keep dtype and shape"
                    )
                data = _tensor_bytes(new)
                if data.nbytes != info.nbytes:
                    raise BadInputError(
                        f"{src.name}: {key} has {data.nbytes} bytes, the header says {info.nbytes}"
                    )
                out.write(data)
                # Flush per tensor: its bytes leave this process before the next one loads.
                out.flush()
                del tensor, new, data
                bar.update(info.nbytes)
        fsync_file(out)


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)
    with dst.open("rb") as f:  # read-only: copy2 kept the source's mode, maybe 0o444
        fsync_file(f)


def check_out_dir(out_dir: Path) -> None:
    """Refuses an export directory that exists and is not empty (exports never overwrite)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise LedgerExistsError(
            f"{out_dir} already exists and is not a directory; export never overwrites"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise LedgerExistsError(
            f"{out_dir} already exists and is not empty; export never overwrites, "
            "choose a new directory"
        )


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    transform: Transform,
    provenance: Mapping[str, Any],
    *,
    progress: bool = True,
    touches: Callable[[str, str], bool] | None = None,
) -> Path:
    """Write a servable copy of a model with transformed weights.

    Each weight file is rewritten with the same tensor names, dtypes, shapes and
    order, each tensor being ``transform(file name, key, tensor)``, or the tensor
    as it is when that returns None. The files of :func:`copyable_files` are copied
    verbatim and ``kvw_provenance.json`` is written; every safetensors file keeps its
    ``__metadata__`` and gains ``kvw_ledger.provenance`` (sorted-key JSON).

    The export is atomic: it is built in a sibling ``<out_dir>.tmp-<random>``
    directory and renamed into place, and removed on any error.

    Args:
        model_dir: source model directory (safetensors weights).
        out_dir: where to write; must not exist or be an empty directory.
        transform: the new value of each tensor, with the same dtype and shape.
        provenance: JSON-serialisable record of what produced this export.
        progress: show a progress bar over bytes on stderr.
        touches: ``touches(file name, key)`` is false for tensors ``transform`` leaves
            as they are; those are copied byte for byte without being read or passed
            to ``transform``. Default: every tensor goes through ``transform``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        LedgerExistsError: ``out_dir`` exists and is not empty.
        BadInputError: unusable source, provenance that is not JSON, or a transform
            that changed a dtype or shape (the message names file and key).
    """
    src_dir = Path(model_dir)
    out = Path(out_dir)
    files = weight_files(src_dir)
    extras = copyable_files(src_dir)
    try:
        provenance_json = json.dumps(provenance, sort_keys=True)
        provenance_pretty = json.dumps(provenance, sort_keys=True, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise BadInputError(f"provenance is not JSON-serialisable: {e}") from e
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # mkdtemp makes the directory 0o700: nobody reads a half-written export.
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        total = sum(p.stat().st_size for p in files)
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"export {out.name}", file=sys.stderr, disable=not progress,
        ) as bar:
            for src in files:
                _export_file(src, tmp / src.name, transform, provenance_json, bar, touches)
        for src in extras:
            _copy_file(src, tmp / src.name)
        with (tmp / PROVENANCE_FILE).open("x", encoding="utf-8") as f:
            f.write(provenance_pretty)
            fsync_file(f)
        # A servable model: readable by the serving user, like any downloaded model.
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        # An export may land where a directory cannot be opened: durable where the platform allows.
        fsync_dir(tmp, best_effort=True)
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one,
            # so a directory created meanwhile is never overwritten.
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise LedgerExistsError(
                    f"{out} appeared during the export; export never overwrites"
                ) from e
            raise
        fsync_dir(out.parent, best_effort=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
