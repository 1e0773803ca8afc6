"""The files of a ledger directory: the array names its layout allows, and walking,
listing and removing what lies under the root.

:class:`kvw_ledger.store.Store` is the one caller; its methods of the same names
(``files``, ``delete``, ``discard``, ``clean_temp``) hand their work to this module.
Everything here is plain ``os`` on the directory, with no torch and no zarr: the
journal's files (``journal/``, ``lock``), the fingerprint cache and ``repair/`` are
never listed, hashed or removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from kvw_ledger._fs import fsync_path as _fsync
from kvw_ledger.errors import BadInputError, IntegrityError
from kvw_ledger.fingerprint_cache import CACHE_NAME
from kvw_ledger.refs import check_id
from kvw_ledger.root import parse_zarr_meta

__all__ = [
    "LAYOUT",
    "check_name",
    "check_prefix",
    "check_site",
    "clean_temp",
    "delete",
    "discard",
    "files",
    "files_under",
    "nodes",
    "owner_only",
]

_SITE_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# Root-level scratch directories (array.tmp-*, head.tmp-*, head.old-*...) and the
# ``<name>.<uuid4 hex>.partial`` files zarr's LocalStore writes before renaming.
_TEMP_ROOT_RE = re.compile(r"[a-z]+\.(?:tmp|old)-[A-Za-z0-9_-]+")
_PARTIAL_RE = re.compile(r".*\.[0-9a-f]{32}\.partial")
# Owned by journal.py and lock.py, the model fingerprint cache (never hashed, never
# named by an entry: see fingerprint_cache.py), and repair/ (Ledger.repair's quarantine).
_NOT_OURS = frozenset({"journal", "lock", CACHE_NAME, "repair"})

# Which path components follow each top-level group: "id", "site", or a set of
# literal names.
LAYOUT: dict[str, tuple[str | frozenset[str], ...]] = {
    "base": ("site",),
    "retain": ("id", "site"),
    "requests": ("id", frozenset({"exponent", "trace", "log_scale"}), "site"),
    # re-derived exponents and traces: rederived/v<version>/<request>/{exponent,trace}/<site>
    "rederived": ("id", "id", frozenset({"exponent", "trace", "log_scale"}), "site"),
    "head": ("site",),
}


def check_site(value: str) -> str:
    """Validate a site name (a module path such as ``model.layers.3.mlp.down_proj``).

    Raises:
        BadInputError: naming the site, if it is empty, has empty parts or a "/".
    """
    if (
        not isinstance(value, str)
        or len(value) > 255
        or value.startswith("__")  # reserved by Zarr
        or not _SITE_RE.fullmatch(value)
    ):
        raise BadInputError(
            f"bad site name {value!r}: expected dot-separated parts of A-Z a-z 0-9 _ -, "
            "no '/', no empty parts, not starting with '__'"
        )
    return value


def check_name(name: str) -> list[str]:
    """Validate an array name against the layout; return its parts."""
    parts = name.split("/") if isinstance(name, str) else []
    pattern = LAYOUT.get(parts[0]) if parts else None
    if pattern is None or len(parts) != len(pattern) + 1:
        forms = (
            "base/<site>, retain/<stats-id>/<site>, requests/<id>/{exponent,trace,log_scale}/<site>, "
            "head/<site>"
        )
        raise BadInputError(
            f"bad array name {name!r}: expected one of {forms} (site names cannot contain '/')"
        )
    for part, want in zip(parts[1:], pattern, strict=True):
        if isinstance(want, frozenset):
            if part not in want:
                raise BadInputError(f"bad array name {name!r}: {part!r} must be one of {sorted(want)}")
        elif (want, part) not in _PASSED:  # verify checks 50,000 names of a few thousand parts
            if want == "site":
                check_site(part)
            else:
                check_id(part, "stats id" if parts[0] == "retain" else "request id")
            if len(_PASSED) < 1 << 16:
                _PASSED.add((want, part))
    return parts


_PASSED: set[tuple[str, str]] = set()  # (kind, part) that check_site or check_id accepted


def check_prefix(prefix: str) -> list[str]:
    """Validate a group/array prefix ("" is the root); return its parts."""
    if prefix == "":
        return []
    parts = prefix.split("/") if isinstance(prefix, str) else [""]
    if parts[0] not in LAYOUT or any(p in ("", ".", "..") for p in parts):
        raise BadInputError(
            f"bad prefix {prefix!r}: expected a path under one of {sorted(LAYOUT)}, "
            "with no empty, '.' or '..' parts"
        )
    return parts


@contextlib.contextmanager
def owner_only() -> Iterator[None]:
    """Runs the block under umask 0o077, so what it creates is its owner's alone."""
    # umask is process-wide: new files come out 0o600 and directories 0o700.
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def files(root: Path) -> list[str]:
    """Every file under ``root``, relative and sorted, except the journal's
    (``journal/``, ``lock``) and crash leftovers (temp dirs, ``*.partial``)."""
    out: list[str] = []
    for entry in sorted(os.listdir(root)):
        if entry in _NOT_OURS or _TEMP_ROOT_RE.fullmatch(entry):
            continue
        out += files_under(root, entry)
    return sorted(out)


def files_under(root: Path, rel: str) -> list[str]:
    """``root``-relative paths of the files at or under ``rel``, minus ``*.partial``."""
    top = root / rel
    if top.is_file():
        return [] if _PARTIAL_RE.fullmatch(top.name) else [rel]
    out: list[str] = []
    _walk_files(str(top), top.relative_to(root).as_posix(), out)
    return sorted(out)


def nodes(root: Path, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, "array" | "group") for every node at or under ``prefix``."""
    parts = check_prefix(prefix)
    if parts:
        stack = [prefix]
    else:
        stack = [e for e in os.listdir(root) if e not in _NOT_OURS]
        stack = [e for e in stack if not _TEMP_ROOT_RE.fullmatch(e)]
    while stack:
        name = stack.pop()
        kind = _node_type(root, name)
        if kind is None:
            continue
        yield name, kind
        if kind == "group":
            stack += [f"{name}/{e}" for e in os.listdir(under(root, name)) if e != "zarr.json"]


def under(root: Path | str, rel: str) -> str:
    """``str(root / rel)`` for a checked relative ``rel``, without building Paths."""
    top = str(root)
    return rel if top == "." else os.path.join(top, rel)


def _node_type(root: Path, name: str) -> str | None:
    """The ``node_type`` node ``name``'s ``zarr.json`` names; None when it has none (where
    ``os.path.isfile`` would say False).

    Strings, and each distinct file parsed once: verify lists the 33,000 arrays of a
    1,000-request head, whose metadata repeat a handful of forms.

    Raises:
        IntegrityError: naming the file, when it is unreadable or not Zarr v3 metadata.
    """
    meta_path = under(root, f"{name}/zarr.json")
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        raise IntegrityError(f"{meta_path} is unreadable ({e}); the ledger is damaged") from e
    kind = _KINDS.get(raw)
    if kind is None:
        kind = str(parse_zarr_meta(raw, meta_path).get("node_type"))
        if len(_KINDS) < 256:
            _KINDS[raw] = kind
    return kind


_KINDS: dict[bytes, str] = {}  # node_type by zarr.json bytes


def delete(root: Path, prefix: str) -> list[str]:
    """Delete the group or array ``prefix`` with everything under it.

    The subtree is first renamed away, so a crash never leaves it half there.
    Returns the ``root``-relative paths of the files removed ([] if absent).
    """
    if not check_prefix(prefix):
        raise BadInputError("refusing to delete the whole ledger; name a group or array")
    target = root / prefix
    if not target.is_dir():
        return []
    removed = files_under(root, prefix)
    trash = root / f"trash.old-{secrets.token_hex(8)}"
    os.rename(target, trash)
    _fsync(target.parent)
    _fsync(root)
    shutil.rmtree(trash)
    return removed


def discard(root: Path, rel: str) -> None:
    """Remove the file or subtree ``rel`` (``root``-relative, not the journal's), whatever
    it holds: what an interrupted writer left. Renamed away first, as :func:`delete`."""
    parts = rel.split("/")
    if not rel or parts[0] in _NOT_OURS or any(p in ("", ".", "..") for p in parts):
        raise BadInputError(f"refusing to discard {rel!r}; name a path inside the ledger's arrays")
    target = root / rel
    if not target.exists():
        return
    trash = root / f"trash.old-{secrets.token_hex(8)}"
    os.rename(target, trash)
    _fsync(target.parent)
    _fsync(root)
    if trash.is_dir():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def clean_temp(root: Path) -> list[str]:
    """Remove crash leftovers (temp dirs, ``*.partial`` files); return their paths."""
    removed: list[str] = []
    for entry in sorted(os.listdir(root)):
        if _TEMP_ROOT_RE.fullmatch(entry):
            if (root / entry).is_dir():
                shutil.rmtree(root / entry, ignore_errors=True)
            else:  # a file: the fingerprint cache's scratch, left by a killed process
                with contextlib.suppress(OSError):
                    (root / entry).unlink()
            removed.append(entry)
    for dirpath, dirnames, filenames in os.walk(root):
        parts = Path(dirpath).relative_to(root).parts
        if not parts:
            dirnames[:] = [d for d in dirnames if d not in _NOT_OURS]
        elif parts[0] in LAYOUT and len(parts) == len(LAYOUT[parts[0]]):
            # The children are arrays, built in scratch directories and renamed in
            # whole, so no partial file is ever written inside one. Skipping their
            # chunks keeps this walk (run by every write) to the groups, not O(files).
            dirnames[:] = []
        for f in filenames:
            if _PARTIAL_RE.fullmatch(f):
                p = Path(dirpath) / f
                p.unlink(missing_ok=True)
                removed.append(p.relative_to(root).as_posix())
    return sorted(removed)


def _walk_files(directory: str, rel: str, out: list[str]) -> None:
    """Appends ``rel/...`` for every file under ``directory`` as ``os.walk`` finds them (links
    to directories not followed, unreadable directories skipped), minus ``*.partial``.

    Strings, not Paths: verify lists some 100,000 files at 1,000 requests, and building
    a Path per file was seconds of it.
    """
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError:
        return
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            if not _PARTIAL_RE.fullmatch(entry.name):
                out.append(f"{rel}/{entry.name}")
            continue
        try:
            linked = entry.is_symlink()
        except OSError:
            linked = False
        if not linked:
            _walk_files(entry.path, f"{rel}/{entry.name}", out)
