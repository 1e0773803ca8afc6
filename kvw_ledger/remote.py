"""Ledgers kept at an fsspec URL (``s3://bucket/ledger``, ``gs://...``, ``memory://...``).

Object stores have no rename, link or fsync, which the local commit protocol
relies on, so a URL ledger is worked on through a local mirror: a plain ledger
directory under the cache (``$KVW_LEDGER_CACHE``, else ``~/.cache/kvw-ledger``).
The URL holds the same Zarr v3 layout, file for file, and is the truth:

- Opening pulls: the journal entries the mirror lacks are read, checked against
  the chain (each names its parent's sha256), and every file they name is
  downloaded and checked against its sha256 before the entry is adopted.
- A write takes the URL's ``lock`` (created exclusively), pulls, commits in the
  mirror under the local protocol, then pushes: the files first, then each entry,
  created exclusively, so a version appears at the URL only once every file it
  names is there, and two writers can never both publish the same version.
  A ``gc`` entry is pushed before the files it deletes are removed.
- A push that fails leaves the URL at its previous version (files without an
  entry are only reported by ``verify`` as unnamed) and the mirror one step
  ahead; the next write there pushes it first.

The head cache is not copied: each mirror rebuilds its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvw_ledger._fs import atomic_write, sha256_bytes, sha256_file
from kvw_ledger.errors import (
    ConcurrentCommitError,
    FormatVersionError,
    IntegrityError,
    LedgerLockedError,
    LedgerNotFoundError,
    StorageError,
)
from kvw_ledger.journal import (
    Entry,
    Journal,
    Problem,
    canonical_json,
    format_time,
    parse_entry,
    utc_now,
)
from kvw_ledger.lock import retry_while_locked
from kvw_ledger.root import FORMAT_VERSION

__all__ = ["Remote", "is_url", "local_path", "mirror_dir"]

_ENTRY_NAME = re.compile(r"(\d{8,})\.json")
_LOCAL_PROTOCOLS = ("file", "local")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a remote (non-local) fsspec URL; ``file://`` is local."""
    text = str(location)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in _LOCAL_PROTOCOLS


def local_path(location: str | Path) -> Path:
    """``location`` as a local path (``file://`` stripped)."""
    text = str(location)
    for protocol in _LOCAL_PROTOCOLS:
        if text.lower().startswith(f"{protocol}://"):
            return Path(text[len(protocol) + 3 :])
    return Path(text)


def mirror_dir(url: str) -> Path:
    """The local mirror of ``url``: ``$KVW_LEDGER_CACHE`` (else ``~/.cache/kvw-ledger``)
    ``/<first 16 hex of sha256(url)>``."""
    base = os.environ.get("KVW_LEDGER_CACHE") or Path.home() / ".cache" / "kvw-ledger"
    return Path(base) / sha256_bytes(url.rstrip("/").encode())[:16]


class Remote:
    """The ledger files at one URL (``url``), read and written through fsspec."""

    def __init__(self, url: str) -> None:
        import fsspec  # only URL ledgers need it

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = str(root).rstrip("/")

    def where(self, rel: str) -> str:
        """The URL of ledger-relative file ``rel``, for messages."""
        return f"{self.url}/{rel}"

    # --- reading ----------------------------------------------------------------------

    def read(self, rel: str) -> bytes | None:
        """File ``rel``'s bytes, or None if it does not exist."""
        try:
            return bytes(self.fs.cat_file(self._key(rel)))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"could not read {self.where(rel)} ({e})") from e

    def exists(self) -> bool:
        """Whether a ledger (its root ``zarr.json``) is at the URL."""
        return self.read("zarr.json") is not None

    def versions(self) -> list[int]:
        """The journal's entry numbers, in order; IntegrityError if one is missing."""
        # Listings may be cached (s3fs keeps them): another machine's entries must be seen.
        self.fs.invalidate_cache(self._key("journal"))
        try:
            names = self.fs.ls(self._key("journal"), detail=False)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"could not list {self.where('journal')} ({e})") from e
        found = sorted(
            int(m.group(1))
            for name in names
            if (m := _ENTRY_NAME.fullmatch(str(name).rstrip("/").rsplit("/", 1)[-1]))
        )
        for expected, version in enumerate(found, start=1):
            if version != expected:
                raise IntegrityError(
                    f"{self.where(f'journal/{version:08d}.json')} follows version {expected - 1}: "
                    f"version {expected} is missing"
                )
        return found

    def entry_raw(self, version: int) -> bytes:
        """The bytes of entry ``version``; IntegrityError if it is gone."""
        raw = self.read(_entry_rel(version))
        if raw is None:
            raise IntegrityError(f"{self.where(_entry_rel(version))} is missing")
        return raw

    # --- pull -------------------------------------------------------------------------

    def pull(self, mirror: Path, progress: bool = False) -> None:
        """Brings the mirror (a ledger directory, held under its writer lock) up to the URL.

        A mirror ahead of the URL (a push that failed) is left as it is.

        Raises:
            LedgerNotFoundError: there is no ledger at the URL.
            IntegrityError: naming the file, if an entry breaks the chain, a file does not
                match the sha256 its entry recorded, or the mirror's history differs.
        """
        versions = self.versions()
        if not versions:
            raise LedgerNotFoundError(f"no ledger at {self.url}; create one with `kvw-ledger init`")
        journal = Journal(mirror)
        have = journal.head()
        n, theirs = (0 if have is None else have.version), len(versions)
        if n:
            common = min(n, theirs)
            if sha256_bytes(self.entry_raw(common)) != journal.get(common).hash:
                raise IntegrityError(
                    f"the local copy {mirror} and {self.url} differ from version {common} on (a push "
                    f"that failed, then another writer); remove {mirror} to take the URL's history"
                )
        if n >= theirs:
            return  # up to date, or ahead by a failed push: the next write pushes it
        self._check_format()
        raws = [self.entry_raw(v) for v in range(n + 1, theirs + 1)]
        entries = _chain(raws, have, self.where)
        gone = _deleted_after(entries)
        named = sum(len(entry.files) for entry in entries)
        with _scratch(mirror) as scratch, _bar(progress, f"pull {self.url}", named) as bar:
            parent = have
            for raw, entry in zip(raws, entries, strict=True):
                for rel, digest in sorted(entry.files.items()):
                    bar.update(1)
                    if gone.get(rel, 0) > entry.version or _local_sha(mirror / rel) == digest:
                        continue
                    data = self.read(rel)
                    if data is None:
                        raise IntegrityError(
                            f"{self.where(rel)} is missing; {self.where(_entry_rel(entry.version))} "
                            "recorded it (or a gc ran while this pull read it: retry)"
                        )
                    if sha256_bytes(data) != digest:
                        raise IntegrityError(
                            f"{self.where(rel)} has sha256 {sha256_bytes(data)} but "
                            f"{_entry_rel(entry.version)} recorded {digest}; it was altered"
                        )
                    _install_file(mirror, scratch, rel, data)
                parent = journal.adopt(raw, parent)
                if entry.op == "gc":
                    _remove_files(mirror, entry.body.get("deleted_files", []))

    def _check_format(self) -> None:
        """Refuses a ledger written by a newer kvw-ledger before adopting any of it."""
        raw = self.read("zarr.json")
        try:
            version = json.loads(raw or b"{}").get("attributes", {}).get("format_version")
        except (ValueError, AttributeError):
            return  # a damaged root is named by the pull, against the init entry's hash
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{self.url} was written by a newer kvw-ledger (format {version}, this one reads "
                f"up to {FORMAT_VERSION}; format_version in zarr.json); upgrade kvw-ledger"
            )

    # --- push -------------------------------------------------------------------------

    def push(self, mirror: Path, progress: bool = False) -> None:
        """Publishes the mirror's entries the URL lacks; the caller holds :meth:`lock`.

        Raises:
            ConcurrentCommitError: another writer published a version first.
            IntegrityError: the URL's history is not a prefix of the mirror's.
        """
        journal = Journal(mirror)
        mine = journal.entries()
        theirs = self.versions()
        if len(theirs) > len(mine) or (
            theirs and sha256_bytes(self.entry_raw(len(theirs))) != mine[len(theirs) - 1].hash
        ):
            raise IntegrityError(
                f"{self.url} has a history that the local copy {mirror} does not continue; "
                f"remove {mirror} to take the URL's history"
            )
        pending = mine[len(theirs) :]
        gone = _deleted_after(mine)
        named = sum(len(entry.files) for entry in pending)
        with _bar(progress, f"push {self.url}", named) as bar:
            for entry in pending:
                for rel in sorted(entry.files):
                    bar.update(1)
                    if gone.get(rel, 0) > entry.version:
                        continue  # deleted by a later gc: never needed at the URL
                    data = (mirror / rel).read_bytes()
                    self._put(rel, data)
                try:
                    self._create(_entry_rel(entry.version), journal.raw(entry.version))
                except FileExistsError as e:
                    raise ConcurrentCommitError(
                        f"another writer published version {entry.version} at {self.url} first"
                    ) from e
                if entry.op == "gc":
                    for rel in entry.body.get("deleted_files", []):
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(self._key(rel))

    # --- verify -----------------------------------------------------------------------

    def verify(self) -> list[Problem]:
        """Re-reads the URL's chain and every file its entries name; paths are URLs."""
        problems: list[Problem] = []
        try:
            versions = self.versions()
            raws = [self.entry_raw(v) for v in versions]
            entries = _chain(raws, None, self.where)
        except IntegrityError as e:
            return [Problem(self.where("journal"), str(e))]
        gone = _deleted_after(entries)
        named: set[str] = {_entry_rel(v) for v in versions}
        for entry in entries:
            for rel, digest in sorted(entry.files.items()):
                named.add(rel)
                data = self.read(rel)
                if data is None:
                    if gone.get(rel, 0) <= entry.version:
                        problems.append(Problem(self.where(rel), f"missing; {_entry_rel(entry.version)} recorded it"))
                elif sha256_bytes(data) != digest:
                    problems.append(
                        Problem(self.where(rel), f"has sha256 {sha256_bytes(data)} but {_entry_rel(entry.version)} recorded {digest}; it was altered")
                    )
        for rel in self._all_files():
            if rel not in named and rel != "lock" and not rel.startswith("head/"):
                problems.append(
                    Problem(self.where(rel), "is named by no journal entry (left by a failed push?)", "warning")
                )
        return problems

    # --- the lock ---------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self, operation: str, timeout: float = 0.0, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        """Holds the URL's writer lock (``lock``, created exclusively) around a write."""
        token = secrets.token_hex(8)
        record = canonical_json(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": format_time(utc_now()),
             "operation": operation, "token": token}
        )

        def attempt() -> None:
            while True:
                try:
                    self._create("lock", record)
                    return
                except FileExistsError:
                    holder = self.read("lock") or b""
                    if self._stale(holder):
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(self._key("lock"))
                        continue
                    raise LedgerLockedError(
                        f"{self.url} is locked by {_describe(holder)}. Wait for it to finish, or if that "
                        f"process is gone, delete {self.where('lock')}"
                    ) from None

        retry_while_locked(attempt, timeout, on_wait, pause=(0.05, 0.2))
        try:
            self._check_exclusive(record)
            yield
        finally:
            if self.read("lock") == record:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._key("lock"))

    # --- private ----------------------------------------------------------------------

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _put(self, rel: str, data: bytes) -> None:
        try:
            self._with_parents(rel, lambda key: self.fs.pipe_file(key, data))
        except OSError as e:
            raise StorageError(f"could not write {self.where(rel)} ({e})") from e

    def _create(self, rel: str, data: bytes) -> None:
        """Writes ``rel`` only if it does not exist (fsspec's exclusive write).

        Raises:
            FileExistsError: ``rel`` exists, or another writer's conditional write of it
                won (an object store's precondition failure).
        """
        try:
            self._with_parents(rel, lambda key: self.fs.pipe_file(key, data, mode="create"))
        except FileExistsError:
            raise
        except OSError as e:
            if _lost_a_conditional_write(e):
                raise FileExistsError(f"{self.where(rel)}: another writer created it first ({e})") from e
            raise StorageError(f"could not create {self.where(rel)} exclusively ({e})") from e
        except (TypeError, NotImplementedError) as e:
            raise StorageError(f"could not create {self.where(rel)} exclusively ({e})") from e

    def _with_parents(self, rel: str, write: Callable[[str], object]) -> None:
        """Runs ``write(key)``; where the filesystem has real directories and one is
        missing, makes it and tries once more (object stores never need this)."""
        key = self._key(rel)
        try:
            write(key)
        except FileNotFoundError:
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            write(key)

    def _check_exclusive(self, record: bytes) -> None:
        """Refuses a filesystem that lets an exclusive create replace a file."""
        try:
            self._create("lock", record + b" ")
        except FileExistsError:
            return
        self._put("lock", record)
        raise StorageError(
            f"{self.url}: this filesystem ({type(self.fs).__name__}) replaced an existing file on an "
            "exclusive create (fsspec mode='create'); kvw-ledger cannot write there safely"
        )

    def _stale(self, raw: bytes) -> bool:
        """A lock left by a dead process on this host."""
        try:
            holder = json.loads(raw)
            pid = holder["pid"]
            if holder["host"] != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
                return False
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (ValueError, KeyError, TypeError, OSError):
            return False
        return False

    def _all_files(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        prefix = self.root.lstrip("/") + "/"
        return sorted(str(p).lstrip("/").removeprefix(prefix) for p in found)


# What S3 answers an If-None-Match: * write that another writer's write of the same key
# beat (412) or is racing (409). s3fs turns the 412 into FileExistsError only when the
# response names its condition, which not every S3-compatible store does.
_LOST_CONDITIONAL_WRITE = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


def _lost_a_conditional_write(error: OSError) -> bool:
    """Whether ``error`` is an object store's precondition failure on an exclusive create."""
    for cause in (error, error.__cause__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in _LOST_CONDITIONAL_WRITE or status == 412:
                return True
    return False


def _entry_rel(version: int) -> str:
    return f"journal/{version:08d}.json"


def _local_sha(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _chain(raws: list[bytes], parent: Entry | None, where: Callable[[str], str]) -> list[Entry]:
    """Parses consecutive entries after ``parent``, each naming the one before."""
    out: list[Entry] = []
    version = 0 if parent is None else parent.version
    previous = None if parent is None else parent.hash
    for raw in raws:
        version += 1
        entry = parse_entry(raw, version, where(_entry_rel(version)))
        if entry.parent != previous:
            raise IntegrityError(
                f"{where(_entry_rel(version))} names parent {entry.parent}, but version "
                f"{version - 1} has sha256 {previous}; one of the two was altered or replaced"
            )
        out.append(entry)
        previous = entry.hash
    return out


def _deleted_after(entries: list[Entry]) -> dict[str, int]:
    """file -> the version of the last gc entry that deleted it."""
    gone: dict[str, int] = {}
    for entry in entries:
        if entry.op == "gc":
            for rel in entry.body.get("deleted_files", []):
                gone[rel] = entry.version
    return gone


@contextlib.contextmanager
def _scratch(mirror: Path) -> Iterator[Path]:
    """A scratch directory at the mirror's root, named as the store's crash leftovers are."""
    path = mirror / f"pull.tmp-{secrets.token_hex(8)}"
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True)
        yield path
    finally:
        os.umask(old)
        for leftover in sorted(path.glob("*")):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


def _install_file(mirror: Path, scratch: Path, rel: str, data: bytes) -> None:
    """Writes ``rel`` in the mirror whole or not at all: into the scratch, fsynced, renamed."""
    target = mirror / rel
    if not target.resolve().is_relative_to(mirror.resolve()):
        raise IntegrityError(f"a journal entry names {rel!r}, which is outside the ledger")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data, scratch=scratch)


def _remove_files(mirror: Path, paths: list[str]) -> None:
    """Deletes the files a gc entry deleted, and the directories it leaves empty."""
    for rel in paths:
        target = mirror / rel
        target.unlink(missing_ok=True)
        parent = target.parent
        while parent != mirror and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} ({holder['operation']}, since {holder['time']})"
    except (ValueError, KeyError, TypeError):
        return "an unreadable lock record"


@contextlib.contextmanager
def _bar(progress: bool, what: str, total: int) -> Iterator[Any]:
    """A files bar on stderr; with ``progress`` it still shows only on a terminal."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=what, unit="file", disable=None if progress and total else True) as bar:
        yield bar
