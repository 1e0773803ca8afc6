"""Durable files: fsync (of a file, a directory, a tree), atomic writes, sha256.

Every module that makes a file durable or hashes one calls these, so a ledger's
durability points and digests are spelled out once. ``os.fsync`` is looked up
at each call (never bound at import), so a benchmark that stubs it out for its
setup (``benchmarks/scale.py``'s ``no_fsync``) stubs every caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "fsync_dir",
    "fsync_file",
    "fsync_path",
    "fsync_tree",
    "hash_files",
    "hash_workers",
    "sha256_bytes",
    "sha256_file",
]

_BLOCK = 1 << 20  # bytes read per update when hashing a file


def fsync_path(path: Path) -> None:
    """Flushes the file or directory at ``path`` to disk (a directory: its entries).

    Raises:
        OSError: it cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path, *, best_effort: bool = False) -> None:
    """Makes a rename into, or a new entry in, directory ``path`` durable.

    Args:
        path: the directory.
        best_effort: ignore an ``OSError`` (not every platform can open a
            directory); for writes outside the ledger, such as an export.
    """
    if best_effort:
        with contextlib.suppress(OSError):
            fsync_path(path)
    else:
        fsync_path(path)


def fsync_file(f: IO[Any] | int) -> None:
    """Flushes an open file (its Python buffer first) or a raw descriptor to disk."""
    if isinstance(f, int):
        os.fsync(f)
        return
    f.flush()
    os.fsync(f.fileno())


def fsync_tree(top: Path) -> None:
    """Flushes every file and directory under ``top`` (``top`` included), files first."""
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def atomic_write(
    path: Path, data: bytes, *, scratch: Path | None = None, durable: bool = True
) -> None:
    """Writes ``data`` to ``path`` whole or not at all: a temporary file, then a rename.

    Args:
        path: the final name; its directory must exist. An existing file is replaced.
        data: the file's bytes.
        scratch: the directory the temporary file is made in (default: ``path``'s own);
            it must be on the same file system.
        durable: fsync the file before the rename and the directory after it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=scratch or path.parent)  # mode 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                fsync_file(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """The sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_workers() -> int:
    """Workers for hashing or decoding many files (verify): the cores there are, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def hash_files(root: Path, paths: set[str]) -> dict[str, str | OSError]:
    """sha256 of each ``root``-relative file, or the OSError reading it raised, on threads
    (sha256 releases the GIL on large reads)."""
    top = str(root)

    def batch(some: list[str]) -> list[tuple[str, str | OSError]]:
        found: list[tuple[str, str | OSError]] = []
        for path in some:
            try:  # the paths are checked relative POSIX paths: a join is all a Path would do
                found.append((path, sha256_file(Path(os.path.join(top, path)))))
            except OSError as e:
                found.append((path, e))
        return found

    from concurrent.futures import ThreadPoolExecutor  # verify only: `log` starts without it

    ordered = sorted(paths)
    # Batches, not a task per file: at 100,000 small files the futures cost more than the hashing.
    batches = [ordered[i : i + _HASH_BATCH] for i in range(0, len(ordered), _HASH_BATCH)]
    with ThreadPoolExecutor(max_workers=hash_workers()) as pool:
        return {path: digest for found in pool.map(batch, batches) for path, digest in found}


_HASH_BATCH = 256  # files hashed per thread task
