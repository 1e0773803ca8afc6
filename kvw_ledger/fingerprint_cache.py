"""A stat-keyed cache of model files' sha256, kept beside a ledger.

Every command that loads or exports the model checks that its directory holds the
files ``init`` saw: the sha256 of every weight file. For a 7B model in bfloat16
that is 14 GB read per command. This cache remembers, per file, the digest with
the file's stat key (resolved path, device, inode, size, mtime_ns, ctime_ns), so
a command on an unchanged model reads none of it.

What makes a remembered digest safe to reuse:

- Any write to a file changes its ctime, which nobody can set back (``os.utime``
  sets mtime and atime only), and a replaced file has a new inode. So a file whose
  key is unchanged still has its bytes, unless it was written within the same tick
  of the filesystem clock as the write the key recorded.
- That last case is git's "racy" index entry (Documentation/technical/racy-git.txt),
  and the rule is git's: an entry is trusted only when its mtime and ctime are
  strictly older than the cache file's own timestamp. That timestamp is read from
  the filesystem clock before the first file is examined (a scratch file is created
  and removed first, and the finished cache gets its mtime), so a file whose tick
  had not yet passed when it was stat-ed is re-hashed by the next command. A
  margin (``RACY_MARGIN_NS``) covers filesystems with coarse timestamps (FAT's 2 s,
  1 s ones) and a little clock skew to a network file server.
- A file that changes while it is hashed (its key before and after differ) is not
  remembered.

The cache file is written to a scratch name, fsynced and renamed into place, with
owner-only permissions, and sealed with the sha256 of its entries. It is named by no journal entry, never hashed, never
pushed to a URL ledger, and ``verify`` ignores it. A cache that cannot be read or
parsed is ignored (every file is hashed) and replaced by the next write; one that
cannot be written (a read-only ledger) is simply not updated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvw_ledger._fs import fsync_file, sha256_bytes

__all__ = ["CACHE_NAME", "RACY_MARGIN_NS", "FingerprintCache", "StatKey", "stat_key"]

CACHE_NAME = "model-fingerprints.json"  # at the ledger's root (a URL ledger's: its mirror's)
_SCRATCH = "fingerprints.tmp-"  # the store's crash-leftover pattern: never listed, never hashed
_FORMAT = 1
_MAX_ENTRIES = 4096  # a few models' worth of shards; the oldest are dropped past it
RACY_MARGIN_NS = 2_000_000_000  # entries this close to the cache's timestamp are not trusted
_HEX64 = re.compile(r"[0-9a-f]{64}")

# (resolved path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)
StatKey = tuple[str, int, int, int, int, int]


def stat_key(path: Path) -> StatKey:
    """The key a digest is remembered under; any write to the file changes it."""
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FingerprintCache:
    """Remembered digests of one ledger's model files; see the module docstring.

    Use :meth:`open`, then :meth:`begin` before the first file is stat-ed, :meth:`get`
    and :meth:`put` per file, and :meth:`save` at the end.
    """

    def __init__(self, path: Path, trusted: Mapping[StatKey, str] | None = None) -> None:
        self.path = path
        self._trusted: dict[StatKey, str] = dict(trusted or {})
        self._fresh: dict[StatKey, str] = {}
        self._stamp_ns: int | None = None

    @classmethod
    def open(cls, path: Path) -> FingerprintCache:
        """Reads the cache at ``path``; keeps only the entries older than its timestamp.

        A missing, unreadable or malformed file gives an empty cache: it is only ever
        a way to skip work, so damage costs a re-hash, never a wrong answer.
        """
        try:
            stamp = path.stat().st_mtime_ns
            raw = json.loads(path.read_bytes())
            entries = _entries(raw)
        except (OSError, ValueError, TypeError, KeyError):
            return cls(path)
        limit = stamp - RACY_MARGIN_NS
        return cls(path, {key: digest for key, digest in entries.items() if key[4] < limit and key[5] < limit})

    def begin(self) -> None:
        """Reads the filesystem clock before any file is stat-ed: the mtime of a scratch
        file created (and removed again at once, so a killed process leaves none) here."""
        if self._stamp_ns is not None:
            return
        probe = self.path.with_name(f"{_SCRATCH}{secrets.token_hex(8)}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._stamp_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
                probe.unlink()
        except OSError:
            return  # a read-only ledger: lookups still work, nothing is remembered

    def get(self, key: StatKey) -> str | None:
        """The digest remembered for ``key``, if it is trusted."""
        return self._trusted.get(key)

    def put(self, key: StatKey, digest: str) -> None:
        """Remembers a digest just computed for a file whose key was ``key`` throughout."""
        self._fresh[key] = digest

    def save(self) -> None:
        """Writes the cache (atomically, owner-only) when it learnt something."""
        stamp, self._stamp_ns = self._stamp_ns, None
        if stamp is None or not self._fresh:
            return
        scratch = self.path.with_name(f"{_SCRATCH}{secrets.token_hex(8)}")
        try:
            merged = {**self._trusted, **self._fresh}
            kept = list(merged.items())[-_MAX_ENTRIES:]
            entries = [
                {"path": k[0], "dev": k[1], "ino": k[2], "size": k[3], "mtime_ns": k[4],
                 "ctime_ns": k[5], "sha256": d}
                for k, d in kept
            ]  # fmt: skip
            body = {"format": _FORMAT, "entries": entries, "seal": _seal(entries)}
            with open(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as fh:
                json.dump(body, fh, sort_keys=True)
                fsync_file(fh)
            # The cache's timestamp is the clock reading from before the first stat.
            os.utime(scratch, ns=(stamp, stamp))
            os.replace(scratch, self.path)
        except OSError:
            # Only an optimisation: a full disk or a vanished directory costs a re-hash later.
            with contextlib.suppress(OSError):
                scratch.unlink()


def _seal(entries: list[dict[str, Any]]) -> str:
    """sha256 of the entries' canonical JSON: a damaged (bit-flipped, truncated) cache is
    recognised and ignored rather than trusted."""
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return sha256_bytes(canonical)


def _entries(raw: Any) -> dict[StatKey, str]:
    """Parses the cache body; raises ValueError/TypeError/KeyError on anything unexpected."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT or not isinstance(raw["entries"], list):
        raise ValueError("not a fingerprint cache of this format")
    if raw.get("seal") != _seal(raw["entries"]):
        raise ValueError("the cache's seal does not match its entries")
    out: dict[StatKey, str] = {}
    for e in raw["entries"]:
        ints = [e[f] for f in ("dev", "ino", "size", "mtime_ns", "ctime_ns")]
        if not isinstance(e["path"], str) or not all(type(i) is int for i in ints):
            raise TypeError("malformed entry")
        if not isinstance(e["sha256"], str) or not _HEX64.fullmatch(e["sha256"]):
            raise ValueError("malformed digest")
        out[(e["path"], *ints)] = e["sha256"]  # type: ignore[assignment]
    return out
