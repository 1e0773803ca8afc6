"""The ledger's append-only, hash-chained journal: reading, appending, installing entries.

Each entry is one canonical-JSON file ``journal/{version:08d}.json``. It names
the sha256 of its parent entry's file bytes and the sha256 of every file its
commit added, so the chain pins every byte the ledger holds. Creating the entry
file (exclusively, with ``os.link``) is the commit point of the whole ledger.

Each file also carries ``digest``, the sha256 of its own canonical content
without that key: the chain only protects an entry through its child, so
without it a damaged head entry would go unnoticed. What an entry holds, and the
parsers that check a file against it, are :mod:`kvw_ledger.entry`'s.

Readers never lock. Writers hold :class:`kvw_ledger.lock.WriterLock`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

# fsync_dir and sha256_file stay importable from here, where they were first defined.
from kvw_ledger._fs import (
    fsync_dir,
    fsync_file,
    hash_files,
    hash_workers,
    sha256_bytes,
    sha256_file,
)

# The entry's schema and parsers moved to entry.py; they stay importable from here.
from kvw_ledger.entry import (
    OPS,
    Entry,
    Problem,
    canonical_json,
    check_operator,
    default_operator,
    format_time,
    parse_entry,
    utc_now,
)
from kvw_ledger.errors import (
    BadInputError,
    ConcurrentCommitError,
    IntegrityError,
    LedgerNotFoundError,
    RefNotFoundError,
    TornEntryError,
)

__all__ = [
    "OPS",
    "Entry",
    "Journal",
    "Problem",
    "canonical_json",
    "check_operator",
    "default_operator",
    "format_time",
    "fsync_dir",
    "hash_files",
    "hash_workers",
    "parse_entry",
    "sha256_file",
    "utc_now",
]

_ENTRY_NAME = re.compile(r"\d{8,}\.json")
_TEMP_NAME = re.compile(r"\.\d{8,}\.(\d+)\.[0-9a-f]+\.tmp")  # _install's, before its link
_MAX_ENTRY_BYTES = 64 << 20  # entries are small; this only bounds a corrupt file's read


@dataclass(frozen=True)
class _Scanned:
    """One entry file as read: its raw hash and either the parsed entry or why not."""

    version: int
    path: Path
    raw_hash: str | None  # None when the file could not be read at all
    entry: Entry | None
    error: IntegrityError | None


class Journal:
    """The entries under ``ledger_root / "journal"``.

    Args:
        ledger_root: the ledger directory.
        clock: returns the current time as an aware datetime; tests pass a fixed one.
    """

    def __init__(self, ledger_root: Path, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.root = Path(ledger_root)
        self.path = self.root / "journal"
        self._clock = clock

    def entry_path(self, version: int) -> Path:
        """Returns the file name entry ``version`` has (or would have)."""
        return self.path / f"{version:08d}.json"

    def _versions(self) -> list[tuple[int, Path, IntegrityError | None]]:
        """Lists entry files in version order, each with a numbering error or None."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise IntegrityError(f"cannot list the journal directory {self.path}: {e}") from e
        found = sorted((int(name[:-5]), name) for name in names if _ENTRY_NAME.fullmatch(name))
        listed: list[tuple[int, Path, IntegrityError | None]] = []
        expected = 1
        for version, name in found:
            path = self.path / name
            if name != f"{version:08d}.json":
                error = IntegrityError(
                    f"journal entry {path} has a malformed name; entries are named "
                    f"{version:08d}.json"
                )
                listed.append((version, path, error))
                continue
            listed.append(
                (
                    version,
                    path,
                    None
                    if version == expected
                    else IntegrityError(
                        f"journal entry {path} follows version {expected - 1}: "
                        f"version {expected} is missing"
                    ),
                )
            )
            expected = version + 1
        return listed

    @staticmethod
    def _read_raw(path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_ENTRY_BYTES + 1)
        except OSError as e:
            raise IntegrityError(f"cannot read journal entry {path}: {e}") from e
        if len(raw) > _MAX_ENTRY_BYTES:
            raise IntegrityError(f"journal entry {path} is larger than {_MAX_ENTRY_BYTES} bytes")
        return raw

    def _read(self, version: int, path: Path) -> Entry:
        return parse_entry(self._read_raw(path), version, path)

    def _scan(self) -> Iterator[_Scanned]:
        for version, path, name_error in self._versions():
            raw_hash: str | None = None
            entry: Entry | None = None
            error = name_error
            try:
                raw = self._read_raw(path)
                raw_hash = sha256_bytes(raw)
                entry = parse_entry(raw, version, path)
            except IntegrityError as e:
                error = error or e
            yield _Scanned(version, path, raw_hash, None if error else entry, error)

    def scan(self) -> list[_Scanned]:
        """Every entry file read and parsed once, for :meth:`entries`, :meth:`readable` and
        :meth:`verify` to share (verify needs all three; at 1,000 entries a read is ~1 s).

        Raises:
            IntegrityError: the journal directory cannot be listed.
        """
        return list(self._scan())

    def entries(self, scanned: Sequence[_Scanned] | None = None) -> list[Entry]:
        """Returns all entries in version order, parsed and validated (from ``scanned``,
        a :meth:`scan`, when given).

        Raises:
            IntegrityError: an entry file is malformed, altered or missing from the numbering;
                the message names the file.
        """
        result: list[Entry] = []
        scanned_all = list(self._scan()) if scanned is None else list(scanned)
        for i, item in enumerate(scanned_all):
            if item.error is not None:
                if i == len(scanned_all) - 1 and item.entry is None and self._unparsable(item):
                    raise self._torn(item.version, item.path, item.error, result)
                raise item.error
            if item.entry is not None:
                result.append(item.entry)
        return result

    def readable(self, scanned: Sequence[_Scanned] | None = None) -> tuple[list[Entry], TornEntryError | None]:
        """The entries, and None; or, when only the newest entry file is torn, the entries
        before it and that file's error (older versions stay readable by number).

        Raises:
            IntegrityError: any other damage, or a torn version 1.
        """
        try:
            return self.entries(scanned), None
        except TornEntryError as e:
            if not e.valid:
                raise
            return list(e.valid), e

    def _unparsable(self, scanned: _Scanned) -> bool:
        """Whether the file itself fails to parse (not a gap or a bad name in the numbering)."""
        return scanned.path.name == f"{scanned.version:08d}.json" and not any(
            e is not None and p == scanned.path for _, p, e in self._versions()
        )

    def _torn(self, version: int, path: Path, error: IntegrityError, valid: list[Entry] | None) -> TornEntryError:
        rel = f"journal/{path.name}"
        if version == 1:
            return TornEntryError(
                f"{error}; it is version 1 (init), so nothing before it can be read: remove the "
                "directory and run init again, or restore it from a backup",
                rel, version, valid,
            )
        return TornEntryError(
            f"{rel} is not a valid journal entry ({error}). It is the newest: versions "
            f"1..{version - 1} can still be read by number, but HEAD is unknown and nothing can be "
            f"written. Run `kvw-ledger repair {self.root}` to move it aside (into repair/), or "
            "restore it from a backup",
            rel, version, valid,
        )

    def head(self) -> Entry | None:
        """Returns the newest entry, or None for an empty journal (reads only that file)."""
        listed = self._versions()
        for _, _, error in listed:
            if error is not None:
                raise error
        if not listed:
            return None
        version, path, _ = listed[-1]
        try:
            return self._read(version, path)
        except IntegrityError as e:
            raise self._torn(version, path, e, None) from e

    def get(self, version: int) -> Entry:
        """Returns entry ``version``.

        Raises:
            RefNotFoundError: there is no such entry.
            IntegrityError: the entry file is malformed or altered.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RefNotFoundError(
                f"journal version {version!r} does not exist; versions start at 1"
            )
        path = self.entry_path(version)
        if not path.is_file():
            head = self._versions()
            last = head[-1][0] if head else 0
            raise RefNotFoundError(
                f"journal version {version} does not exist; the journal has versions 1..{last}"
            )
        return self._read(version, path)

    def raw(self, version: int) -> bytes:
        """The bytes of entry file ``version`` exactly as stored (what its child's parent hash covers)."""
        path = self.entry_path(version)
        if not path.is_file():
            raise RefNotFoundError(f"journal version {version} does not exist in {self.path}")
        return self._read_raw(path)

    def append(
        self,
        op: str,
        body: dict[str, Any],
        files: dict[str, str],
        *,
        parent: Entry | None,
        operator: str | None = None,
    ) -> Entry:
        """Commits a new entry after ``parent``; this is the ledger's commit point.

        Args:
            op: one of :data:`OPS`.
            body: op-specific JSON data.
            files: every file the commit added, relative path -> sha256 hex.
            parent: the entry this one follows (the head the writer read), None for the first.
            operator: who commits it (hashed with the rest); default :func:`default_operator`.

        Raises:
            BadInputError: ``op``, ``body`` or ``files`` is not valid.
            ConcurrentCommitError: another writer already created this version.
        """
        version = 1 if parent is None else parent.version + 1
        content = {
            "version": version,
            "op": op,
            "time": format_time(self._clock()),
            "parent": None if parent is None else parent.hash,
            "files": files,
            "body": body,
            "operator": check_operator(operator) if operator is not None else default_operator(),
        }
        final = self.entry_path(version)
        try:
            content["digest"] = sha256_bytes(canonical_json(content))
            raw = canonical_json(content)
        except (TypeError, ValueError, RecursionError) as e:
            raise BadInputError(f"journal entry for {op!r} is not JSON data: {e}") from e
        try:
            # Readers will hold the file to exactly these rules, so check before committing.
            entry = parse_entry(raw, version, final)
        except IntegrityError as e:
            raise BadInputError(f"cannot commit: {e}") from e
        if parent is not None:
            self._check_parent(parent)
        self._install(version, raw)
        return entry

    def adopt(self, raw: bytes, parent: Entry | None) -> Entry:
        """Commits an entry written elsewhere (a mirror of a remote ledger), byte for byte.

        The bytes must parse as the entry after ``parent`` and name it as their parent.

        Raises:
            IntegrityError: ``raw`` is not a valid entry, or does not follow ``parent``.
            ConcurrentCommitError: this version exists already.
        """
        version = 1 if parent is None else parent.version + 1
        entry = parse_entry(raw, version, self.entry_path(version))
        if entry.parent != (None if parent is None else parent.hash):
            raise IntegrityError(
                f"journal entry {version} does not follow version {version - 1}: its parent hash "
                f"is {entry.parent}, not {None if parent is None else parent.hash}"
            )
        if parent is not None:
            self._check_parent(parent)
        self._install(version, raw)
        return entry

    def _install(self, version: int, raw: bytes) -> None:
        """Creates entry file ``version`` holding ``raw``, durably and exclusively."""
        final = self.entry_path(version)
        if not self.root.is_dir():
            raise LedgerNotFoundError(f"no ledger directory at {self.root}")
        self._make_dir()
        tmp = self.path / f".{version:08d}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                fsync_file(f)
            try:
                # link() never replaces an existing name: two writers cannot both commit N
                os.link(tmp, final)
            except FileExistsError as e:
                raise ConcurrentCommitError(
                    f"another writer committed journal version {version} ({final}) first; "
                    "re-read the head and retry under the writer lock"
                ) from e
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.path)

    def clean_temp(self) -> list[str]:
        """Removes the temporary entry files of writers that died before their link (for the
        writer-lock holder only); returns their names. A live process's file is kept."""
        removed = []
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        for name in sorted(names):
            match = _TEMP_NAME.fullmatch(name)
            if match and not _alive(int(match.group(1))):
                (self.path / name).unlink(missing_ok=True)
                removed.append(name)
        return removed

    def _check_parent(self, parent: Entry) -> None:
        path = self.entry_path(parent.version)
        try:
            on_disk = sha256_file(path)
        except OSError as e:
            raise BadInputError(
                f"parent version {parent.version} is not an entry of {self.path}: {e}"
            ) from e
        if on_disk != parent.hash:
            raise BadInputError(
                f"parent version {parent.version} (sha256 {parent.hash}) does not match {path} "
                f"(sha256 {on_disk}); pass an entry read from this journal"
            )

    def _make_dir(self) -> None:
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            return
        os.chmod(self.path, 0o700)  # mkdir's mode is filtered by the umask
        fsync_dir(self.root)

    def verify(
        self,
        root: Path,
        *,
        digests: Mapping[str, str | OSError] | None = None,
        scanned: Sequence[_Scanned] | None = None,
    ) -> list[Problem]:
        """Checks the hash chain and every file each entry recorded, in journal order.

        Args:
            root: the directory the entries' file paths are relative to (the ledger root).
            digests: files already hashed (path -> sha256, or the OSError reading it
                raised), as verify's array reads hash the bytes they decode; every other
                named file is read and hashed here.
            scanned: the journal as :meth:`scan` read it, or None to read it here.

        Returns:
            Problems, the first naming the first broken file; empty when all is well.
            A file that a later ``gc`` entry lists in ``body["deleted_files"]`` may be missing.
        """
        root = Path(root)
        if scanned is None:
            try:
                scanned = list(self._scan())
            except IntegrityError as e:
                return [Problem("journal", str(e))]
        deleted_at: dict[str, int] = {}
        for item in scanned:
            if item.entry is not None and item.entry.op == "gc":
                for path in item.entry.body.get("deleted_files", []):
                    deleted_at[path] = item.entry.version
        named = {path for item in scanned if item.entry is not None for path in item.entry.files}
        known = {path: digests[path] for path in named & digests.keys()} if digests else {}
        hashes = {**known, **hash_files(root, named - known.keys())}
        problems: list[Problem] = []
        previous: _Scanned | None = None
        for item in scanned:
            rel = item.path.relative_to(self.root).as_posix()
            if item.error is not None:
                problems.append(Problem(rel, str(item.error)))
            entry, before = item.entry, previous
            previous = item
            if entry is None:
                continue
            if before is not None and before.raw_hash not in (None, entry.parent):
                before_rel = before.path.relative_to(self.root).as_posix()
                problems.append(
                    Problem(
                        rel,
                        (
                            f"parent hash {entry.parent} does not match {before_rel} "
                            f"(sha256 {before.raw_hash}); one of the two was altered or replaced"
                        ),
                    )
                )
            problems.extend(self._verify_files(hashes, entry, rel, deleted_at))
        return problems

    @staticmethod
    def _verify_files(
        hashes: dict[str, str | OSError], entry: Entry, rel: str, deleted_at: dict[str, int]
    ) -> list[Problem]:
        problems = []
        for path, expected in sorted(entry.files.items()):
            actual = hashes[path]
            if isinstance(actual, FileNotFoundError):
                if deleted_at.get(path, 0) > entry.version:
                    continue
                problems.append(Problem(path, f"missing; {rel} recorded it with sha256 {expected}"))
                continue
            if isinstance(actual, OSError):
                problems.append(Problem(path, f"cannot be read ({actual}); {rel} recorded it"))
                continue
            if actual != expected:
                problems.append(
                    Problem(
                        path, f"has sha256 {actual} but {rel} recorded {expected}; it was altered"
                    )
                )
        return problems


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, left by an append this process gave up on
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
