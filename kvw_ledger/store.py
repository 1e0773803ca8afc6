"""The Zarr v3 array layout of a ledger directory.

The store knows arrays and files, not KVW and not the journal: ``journal/`` and
``lock`` belong to ``journal.py`` and are never touched here. Layout::

    zarr.json                      root group; attrs {"format_version": int, ...}
    base/<site>                    value matrices, original dtype (bit-exact)
    retain/<stats-id>/<site>       float32 [n_vectors]
    requests/<id>/exponent/<site>  float32 [n_vectors]
    requests/<id>/trace/<site>     float32 [n_batches, n_vectors]
    requests/<id>/log_scale/<site> float32 [] (requests made with rescale only)
    head/<site>                    cached exponent sum, attr log_scale (the summed
                                   log-scale, when any); group attrs version, digest

Every array is written into a temporary directory at the ledger root, fsynced,
then renamed into place, so an array is either whole or absent after a crash.
Chunk files carry a crc32c, so a damaged byte is detected on read and reported
as an :class:`IntegrityError` naming the file.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import zarr
from zarr.storage import LocalStore

from kvw_ledger import _codec, _tree, layout
from kvw_ledger._codec import Digests, tensor_hash
from kvw_ledger._codec import read_bytes as _read_bytes
from kvw_ledger._fs import fsync_path as _fsync
from kvw_ledger._fs import fsync_tree as _fsync_tree
from kvw_ledger._fs import sha256_file as _file_sha256
from kvw_ledger._tree import check_name as _check_name
from kvw_ledger._tree import check_prefix as _check_prefix
from kvw_ledger._tree import check_site
from kvw_ledger._tree import owner_only as _owner_only
from kvw_ledger.errors import (
    BadInputError,
    IntegrityError,
    LedgerExistsError,
    RefNotFoundError,
)
from kvw_ledger.head import (
    HeadCache,
    check_files,
    check_meta,
    checked_scales,
    log_scale_attr,
    sealed_meta,
    sealed_sites,
)
from kvw_ledger.interrupts import uninterrupted
from kvw_ledger.refs import check_id
from kvw_ledger.root import FORMAT_VERSION, read_root_attrs
from kvw_ledger.root import read_zarr_meta as _read_meta
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.data import Record

__all__ = [
    "FORMAT_VERSION",
    "ArrayRecord",
    "HeadCache",
    "Store",
    "check_id",
    "check_site",
    "tensor_hash",
]

# 2-D arrays are chunked along axis 0 so one chunk holds about this many bytes
# (the brief allows 4-16 MiB): small enough to stream, large enough to compress.
_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ArrayRecord:
    """What :meth:`Store.write_array` wrote.

    Attributes:
        name: The array's name, e.g. ``requests/r1/exponent/<site>``.
        sha256: :func:`tensor_hash` of the logical content.
        files: Ledger-relative path -> sha256 of the file's bytes, for the array's
            ``zarr.json`` and every chunk file.
    """

    name: str
    sha256: str
    files: dict[str, str] = field(default_factory=dict)




class Store:
    """A ledger directory's Zarr arrays and files (not its journal).

    Writes are for the single lock holder; reads never lock. Every write runs
    under umask 0o077, so the ledger is readable by its owner only.
    """

    def __init__(self, path: Path, attrs: dict[str, Any]) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.path = Path(path)
        self._attrs = attrs

    @classmethod
    def create(cls, path: Path, attrs: Mapping[str, Any]) -> Store:
        """Create an empty ledger store at ``path`` (a new or empty directory).

        Raises:
            LedgerExistsError: if ``path`` exists and is not an empty directory.
            BadInputError: if ``attrs`` holds ``format_version`` or is not JSON.
        """
        path = Path(path)
        if "format_version" in attrs:
            raise BadInputError("attrs must not set 'format_version'; the store writes it")
        root_attrs = {"format_version": FORMAT_VERSION, **attrs}
        try:
            json.dumps(root_attrs)
        except (TypeError, ValueError) as e:
            raise BadInputError(f"ledger attrs are not JSON-serialisable: {e}") from e
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LedgerExistsError(
                f"{path} already exists and is not empty; choose a new path for the ledger"
            )
        with _owner_only():
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path, 0o700)  # an existing empty directory keeps its own mode
            zarr.create_group(store=LocalStore(path), attributes=root_attrs, zarr_format=3)
            _fsync(path / "zarr.json")
            _fsync(path)
            _fsync(path.parent)
        return cls(path, root_attrs)

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open an existing ledger store.

        Raises:
            LedgerNotFoundError: if there is no ``zarr.json`` at ``path``.
            IntegrityError: if ``zarr.json`` is unreadable.
            FormatVersionError: if the format version is newer than this code or not an int.
        """
        path = Path(path)
        attrs = read_root_attrs(path)
        return cls(path, attrs)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root group's attributes (a copy)."""
        return copy.deepcopy(self._attrs)

    # ----------------------------------------------------------------- arrays

    def write_array(
        self, name: str, tensor: torch.Tensor, *, attrs: Mapping[str, Any] | None = None
    ) -> ArrayRecord:
        """Store ``tensor`` bit-exactly as array ``name`` and fsync it.

        Only ``head/`` arrays may be overwritten; every other array is immutable.

        Raises:
            BadInputError: on a bad name, a non-strided tensor or bad ``attrs``.
            LedgerExistsError: if the array exists and is not under ``head/``.
        """
        _check_name(name)
        final = self.path / name
        if final.exists() and not name.startswith("head/"):
            raise LedgerExistsError(
                f"array {name} already exists in {self.path}; stored arrays are immutable"
            )
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            tensor = tensor.detach().cpu().contiguous()  # one device copy for hash and write
        digest = tensor_hash(tensor)
        with _owner_only():
            tmp = self._scratch("array.tmp")
            try:
                with uninterrupted():  # zarr's event loop, interrupted while made, prints a traceback
                    _write_zarr_array(tmp, tensor, attrs)
                    self._ensure_groups(name.rsplit("/", 1)[0])
                self._swap_in(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        files = {rel: _file_sha256(self.path / rel) for rel in _tree.files_under(self.path, name)}
        return ArrayRecord(name=name, sha256=digest, files=files)

    def read_array(self, name: str, *, digests: Digests | None = None) -> torch.Tensor:
        """Read array ``name`` with its original dtype restored (with ``digests``, each
        file read is hashed into it: see :func:`_codec.read_array`).

        Raises:
            RefNotFoundError: naming the array, if it does not exist.
            IntegrityError: naming the file, if metadata or a chunk is damaged or missing.
        """
        _check_name(name)
        return _codec.read_array(self.path, name, digests=digests)

    def array_attrs(self, name: str) -> dict[str, Any]:
        """The attributes stored with array ``name`` (``dtype`` and the caller's)."""
        _check_name(name)
        meta = self._array_meta(name)
        return dict(meta.get("attributes", {}))

    def content_hash(self, name: str, *, digests: Digests | None = None) -> str:
        """Recompute :func:`tensor_hash` of array ``name`` from the stored chunks."""
        return self.read_hashed(name, digests=digests)[1]

    def read_hashed(self, name: str, *, digests: Digests | None = None) -> tuple[torch.Tensor, str]:
        """:meth:`read_array` and the array's :func:`tensor_hash`, from one read."""
        _check_name(name)
        return _codec.read_hashed(self.path, name, digests=digests)

    def has_array(self, name: str) -> bool:
        """Whether array ``name`` exists."""
        _check_name(name)
        meta_path = self.path / name / "zarr.json"
        return meta_path.is_file() and _read_meta(meta_path).get("node_type") == "array"

    def list_arrays(self, prefix: str) -> list[str]:
        """Full names of the arrays at or under ``prefix`` ("" for all), sorted."""
        return sorted(n for n, kind in self._nodes(prefix) if kind == "array")

    # ------------------------------------------------------------------ layout
    # The only place that spells where each kind of array lives (see _tree.LAYOUT).

    base_path = staticmethod(layout.base_path)
    head_path = staticmethod(layout.head_path)
    retain_path = staticmethod(layout.retain_path)
    request_path = staticmethod(layout.request_path)
    rederived_path = staticmethod(layout.rederived_path)
    probe_path = staticmethod(layout.probe_path)

    def write_probe(self, version: int, kind: str, source: str | Path) -> tuple[str, dict[str, str]]:
        """Copies probe set ``kind`` (a JSONL file and its images) in as registered at
        ``version``: (its data file's ledger-relative path, every file written -> sha256)."""
        from kvw_ledger.probes import store_probe

        return store_probe(self.path, self.probe_path(version, kind), kind, source)

    def read_probe(self, path: str) -> list[Record]:
        """The records of the stored probe set whose data file is ``path`` (as an entry names it)."""
        from kvw_ledger.probes import read_probe

        return read_probe(self.path, path)

    def read_base(self, site: str) -> torch.Tensor:
        """``site``'s base value matrix (its original dtype)."""
        return self.read_array(self.base_path(site))

    def read_sites(self, prefix: str, sites: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """site -> array ``prefix/<site>``: of each of ``sites`` (each must exist), else of
        every array under ``prefix`` (empty when none)."""
        if sites is not None:
            return {site: self.read_array(f"{prefix}/{site}") for site in sites}
        return {name.rsplit("/", 1)[1]: self.read_array(name) for name in self.list_arrays(prefix)}

    def write_sites(
        self, prefix: str, arrays: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Writes ``prefix/<site>`` for each array: (files -> sha256, array name -> content hash)."""
        files: dict[str, str] = {}
        hashes: dict[str, str] = {}
        for site, value in arrays.items():
            record = self.write_array(f"{prefix}/{site}", value)
            files.update(record.files)
            hashes[record.name] = record.sha256
        return files, hashes

    def group_files(self, prefix: str) -> dict[str, str]:
        """The group ``zarr.json`` files from the root's children down to the arrays
        under ``prefix`` (the root's own is excluded) -> sha256 of their bytes."""
        parts = _check_prefix(prefix)
        groups = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        groups += [n for n, kind in self._nodes(prefix) if kind == "group"]
        out: dict[str, str] = {}
        for g in sorted(set(groups)):
            meta_path = self.path / g / "zarr.json"
            if meta_path.is_file() and _read_meta(meta_path).get("node_type") == "group":
                out[f"{g}/zarr.json"] = _file_sha256(meta_path)
        return out

    def files(self) -> list[str]:
        """Every file under the ledger root, relative and sorted, except the journal's
        (``journal/``, ``lock``) and crash leftovers (temp dirs, ``*.partial``)."""
        return _tree.files(self.path)

    def delete(self, prefix: str) -> list[str]:
        """Delete the group or array ``prefix`` with everything under it.

        The subtree is first renamed away, so a crash never leaves it half there.
        Returns the ledger-relative paths of the files removed ([] if absent).
        """
        return _tree.delete(self.path, prefix)

    def discard(self, rel: str) -> None:
        """Remove the file or subtree ``rel`` (ledger-relative, not the journal's), whatever
        it holds: what an interrupted writer left. Renamed away first, as :meth:`delete`."""
        _tree.discard(self.path, rel)

    def clean_temp(self) -> list[str]:
        """Remove crash leftovers (temp dirs, ``*.partial`` files); return their paths."""
        return _tree.clean_temp(self.path)

    # ------------------------------------------------------------------- head

    def write_head(self, weakening: Weakening, version: int, digest: str) -> None:
        """Replace the whole head cache crash-safely.

        The exponents are one array per site; the log-scales (site -> float32 scalar)
        are kept as attr ``log_scale`` of those sites' arrays, which the seal covers.

        The new head is built in ``head.tmp-*`` and fsynced, then swapped in by two
        renames; a crash in between leaves no ``head`` and :meth:`read_head_cache` says None.
        """
        scales = checked_scales(weakening, version, digest)
        tensors = weakening.exponents
        with _owner_only():
            tmp = self._scratch("head.tmp")
            try:
                with uninterrupted():
                    for site, t in tensors.items():
                        extra = {"log_scale": scales[site]} if site in scales else None
                        _write_zarr_array(tmp / site, t, extra)
                # The head is named by no journal entry, so it seals itself: its group
                # zarr.json lists every file's sha256 and hashes its own content.
                files = {
                    f"head/{Path(rel).relative_to(tmp.name).as_posix()}": _file_sha256(
                        self.path / rel
                    )
                    for rel in _tree.files_under(self.path, tmp.name)
                }
                (tmp / "zarr.json").write_bytes(
                    sealed_meta({"version": version, "digest": digest, "files": files})
                )
                self._swap_in(tmp, self.path / "head")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def read_head_cache(self) -> HeadCache | None:
        """The head cache with its log-scales, or None if there is
        no complete head (never written, or a crash interrupted :meth:`write_head`),
        or a writer replaced it while it was being read.

        Raises:
            IntegrityError: naming the file, if the head is damaged or its seal broken.
        """
        meta_path = self.path / "head" / "zarr.json"
        raw = _read_bytes(meta_path)
        if raw is None:
            return None
        attrs = check_meta(raw)
        sites = sealed_sites(attrs)
        try:
            tensors = {site: self.read_array(f"head/{site}") for site in sites}
            scales = {
                site: log_scale_attr(self.array_attrs(f"head/{site}"), site) for site in sites
            }
        except (IntegrityError, RefNotFoundError, OSError) as e:
            if _read_bytes(meta_path) != raw:
                return None  # swapped by a writer mid-read: callers recompute from the requests
            raise IntegrityError(f"the head cache is damaged: {e}") from e
        if _read_bytes(meta_path) != raw:
            return None
        log_scales = {site: value for site, value in scales.items() if value is not None}
        return HeadCache(Weakening(tensors, log_scales), attrs["version"], attrs["digest"])

    def check_head(self) -> list[tuple[str, str]]:
        """Every head file against the seal :meth:`write_head` put in ``head/zarr.json``.

        Returns:
            (ledger-relative path, what is wrong) per damaged, missing or extra file;
            empty when the head is whole, or absent (a crash between the two renames).
        """
        meta_path = self.path / "head" / "zarr.json"
        on_disk = set(_tree.files_under(self.path, "head")) if (self.path / "head").is_dir() else set()
        raw = _read_bytes(meta_path)
        return check_files(raw, on_disk, lambda rel: _file_sha256(self.path / rel))

    # ---------------------------------------------------------------- private

    def _scratch(self, kind: str) -> Path:
        return self.path / f"{kind}-{secrets.token_hex(8)}"

    def _swap_in(self, new: Path, final: Path) -> None:
        """Rename ``new`` to ``final``, moving an existing ``final`` away first."""
        _fsync_tree(new)
        old = None
        if final.exists():
            old = self._scratch("trash.old")
            os.rename(final, old)
        os.rename(new, final)
        _fsync(final.parent)
        _fsync(self.path)
        if old is not None:
            shutil.rmtree(old)

    def _ensure_groups(self, group: str) -> None:
        """Create the implicit groups on the way to ``group`` and fsync them."""
        parts = group.split("/")
        for i in range(len(parts)):
            sub = "/".join(parts[: i + 1])
            if not (self.path / sub / "zarr.json").is_file():
                zarr.create_group(store=LocalStore(self.path / sub), zarr_format=3)
                _fsync(self.path / sub / "zarr.json")
                _fsync(self.path / sub)
                _fsync((self.path / sub).parent)

    def _nodes(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(name, "array" | "group") for every node at or under ``prefix``."""
        return _tree.nodes(self.path, prefix)

    def _array_meta(self, name: str) -> dict[str, Any]:
        meta_path = self.path / name / "zarr.json"
        if not meta_path.is_file():
            raise RefNotFoundError(f"no array {name} in ledger {self.path}")
        meta = _read_meta(meta_path)
        if meta.get("node_type") != "array":
            raise RefNotFoundError(f"{name} in ledger {self.path} is a group, not an array")
        return meta

# ------------------------------------------------------------------ helpers


def _write_zarr_array(path: Path, tensor: torch.Tensor, attrs: Mapping[str, Any] | None) -> None:
    """:func:`kvw_ledger._codec.write_array` at this layout's chunk size."""
    _codec.write_array(path, tensor, attrs, _CHUNK_BYTES)
