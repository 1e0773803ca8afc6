"""The ledger's append-only, hash-chained journal and its single-writer lock.

Each entry is one canonical-JSON file ``journal/{version:08d}.json``. It names
the sha256 of its parent entry's file bytes and the sha256 of every file its
commit added, so the chain pins every byte the ledger holds. Creating the entry
file (exclusively, with ``os.link``) is the commit point of the whole ledger.

Each file also carries ``digest``, the sha256 of its own canonical content
without that key: the chain only protects an entry through its child, so
without it a damaged head entry would go unnoticed.

Readers never lock. Writers hold :class:`kvw_ledger.lock.WriterLock`.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

# fsync_dir and sha256_file stay importable from here, where they were first defined.
from kvw_ledger._fs import fsync_dir, fsync_file, sha256_bytes, sha256_file
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

OPS = ("init", "retain", "forget", "revert", "rederive", "gc", "probe", "audit")

_KEYS = frozenset({"version", "op", "time", "parent", "files", "body", "digest"})
# Entries written before operators were recorded lack this key; they still parse and verify.
_OPTIONAL_KEYS = frozenset({"operator"})
OPERATOR_ENV = "KVW_LEDGER_OPERATOR"
_MAX_OPERATOR = 200
_ENTRY_NAME = re.compile(r"\d{8,}\.json")
_TEMP_NAME = re.compile(r"\.\d{8,}\.(\d+)\.[0-9a-f]+\.tmp")  # _install's, before its link
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_MAX_ENTRY_BYTES = 64 << 20  # entries are small; this only bounds a corrupt file's read


def canonical_json(obj: Any) -> bytes:
    """Encodes ``obj`` as the one byte form the ledger hashes: sorted keys, no spaces, a newline.

    Raises:
        TypeError: ``obj`` holds something JSON cannot represent.
        ValueError: ``obj`` holds NaN or an infinity.
    """
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8") + b"\n"


def check_operator(name: str, where: str = "--operator") -> str:
    """Returns ``name`` if it can stand in an entry as its operator.

    Raises:
        BadInputError: it is empty, longer than 200 characters, or holds a control character.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"{where} must name who acts (e.g. alice@example.org), not {name!r}")
    if len(name) > _MAX_OPERATOR or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadInputError(
            f"{where} {name[:40]!r} must be at most {_MAX_OPERATOR} printable characters"
        )
    return name


def default_operator() -> str:
    """Who acts when nobody says: ``$KVW_LEDGER_OPERATOR``, else user@host."""
    named = os.environ.get(OPERATOR_ENV)
    if named is not None:
        return check_operator(named, f"${OPERATOR_ENV}")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a bare container
        user = f"uid{os.getuid()}"
    return check_operator(f"{user}@{socket.gethostname() or 'localhost'}", "user@host")


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise BadInputError(f"clock returned a naive datetime {moment!r}; return an aware UTC one")
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


@dataclass(frozen=True)
class Entry:
    """One immutable journal entry.

    ``hash`` is the sha256 of the entry file's bytes; it is computed, never stored.
    """

    version: int  # 1-based position; the file is journal/{version:08d}.json
    op: str  # one of OPS
    time: str  # ISO-8601 UTC, seconds resolution, e.g. "2026-11-23T17:42:00Z"
    parent: str | None  # sha256 hex of the parent entry's file bytes; None for version 1
    files: dict[str, str]  # each file the commit added: path relative to the ledger root -> sha256
    body: dict[str, Any]  # op-specific JSON data
    hash: str  # sha256 hex of this entry's own file bytes
    operator: str | None = None  # who committed it; None in entries older than the field

    def to_json(self) -> dict[str, Any]:
        """Returns every field, ``hash`` included, as plain JSON data (for ``log --json``)."""
        data: dict[str, Any] = json.loads(canonical_json(self._content()))
        data["hash"] = self.hash
        return data

    def _content(self) -> dict[str, Any]:
        content = {
            "version": self.version,
            "op": self.op,
            "time": self.time,
            "parent": self.parent,
            "files": self.files,
            "body": self.body,
        }
        if self.operator is not None:
            content["operator"] = self.operator
        return content


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`Journal.verify`; ``path`` is relative to the ledger root."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"


def _relative_path_problem(path: object) -> str | None:
    """Says why ``path`` is not a plain relative POSIX path inside the ledger, or None."""
    if not isinstance(path, str) or not path:
        return f"{path!r} is not a non-empty string"
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        return f"{path!r} is not a relative POSIX path"
    if any(part in ("", ".", "..") for part in parts):
        return f"{path!r} has an empty, '.' or '..' component"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in ledger JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def _entry_problem(data: object, version: int) -> str | None:
    """Says what is wrong with a decoded entry that should be ``version``, or None."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    if set(data) - _OPTIONAL_KEYS != _KEYS:
        missing, extra = sorted(_KEYS - set(data)), sorted(set(data) - _KEYS - _OPTIONAL_KEYS)
        return f"has missing keys {missing} / unexpected keys {extra}"
    if "operator" in data:
        try:
            check_operator(data["operator"], "operator")
        except BadInputError as e:
            return f"has an unusable operator: {e}"
    found = data["version"]
    if not isinstance(found, int) or isinstance(found, bool) or found != version:
        return f"records version {found!r} but its file name says {version}"
    if data["op"] not in OPS:
        return f"has op {data['op']!r}, not one of {', '.join(OPS)}"
    time = data["time"]
    if not isinstance(time, str) or not _TIME_PATTERN.fullmatch(time):
        return f"has time {time!r}, not YYYY-MM-DDTHH:MM:SSZ"
    try:
        datetime.strptime(time, _TIME_FORMAT)
    except ValueError:
        return f"has time {time!r}, which is not a real UTC time"
    parent = data["parent"]
    if version == 1 and parent is not None:
        return f"is version 1 but names a parent {parent!r}"
    if version > 1 and not (isinstance(parent, str) and _HEX64.fullmatch(parent)):
        return f"has parent {parent!r}, not a sha256 hex digest"
    files = data["files"]
    if not isinstance(files, dict):
        return "has 'files' that is not an object"
    for path, digest in files.items():
        why = _relative_path_problem(path)
        if why is not None:
            return f"lists a file {why}"
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            return f"lists file {path!r} with hash {digest!r}, not a sha256 hex digest"
    body = data["body"]
    if not isinstance(body, dict):
        return "has 'body' that is not an object"
    if data["op"] == "gc" and "deleted_files" in body:
        deleted = body["deleted_files"]
        if not isinstance(deleted, list):
            return "is a gc whose deleted_files is not a list"
        for path in deleted:
            why = _relative_path_problem(path)
            if why is not None:
                return f"is a gc whose deleted_files has {why}"
    if not (isinstance(data["digest"], str) and _HEX64.fullmatch(data["digest"])):
        return "has a 'digest' that is not a sha256 hex digest"
    return None


def parse_entry(raw: bytes, version: int, where: Path | str) -> Entry:
    """Decodes and validates entry ``version`` from its file's bytes; every failure is an
    IntegrityError naming ``where``."""
    entry = _parse_sound_entry(raw, version)
    if entry is not None:
        return entry
    return _parse_entry_strictly(raw, version, where)


def _parse_sound_entry(raw: bytes, version: int) -> Entry | None:
    """The entry, when ``raw`` passes every check :func:`_parse_entry_strictly` makes; None
    when any may fail (that function then names the failure in its own words).

    Reading a 1,000-request journal is most of ``diff`` and ``log``, so the sound case
    takes shortcuts that accept exactly what the strict path accepts: a file equal to the
    canonical form of what it decodes to has no duplicate key and no NaN (neither
    survives re-encoding), and its content without ``digest`` is its own bytes with
    that one member cut out, so nothing is serialised twice.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or _fast_entry_problem(data, version):
        return None
    try:
        if canonical_json(data) != raw:
            return None
    except (TypeError, ValueError, RecursionError):
        return None
    digest = data["digest"]
    # Keys are sorted and "body" < "digest" < "files", so the top-level member sits
    # between them; nothing after it (a files object of strings, then scalars) can
    # hold this pattern, so the last match is that member.
    member = f',"digest":"{digest}"'.encode()
    at = raw.rfind(member + b',"files":{')
    if at < 0 or sha256_bytes(raw[:at] + raw[at + len(member) :]) != digest:
        return None
    return _entry(version, data, raw)


# Paths joined with NUL (which no sound path holds): one match checks them all.
_PLAIN_PATH = r"(?!\.\.?(?:/|\x00|\Z))[^/\\\x00]+"
_PLAIN_PATHS = re.compile(rf"{_PLAIN_PATH}(?:/{_PLAIN_PATH})*(?:\x00{_PLAIN_PATH}(?:/{_PLAIN_PATH})*)*")
_HEX_RUN = re.compile(r"[0-9a-f]*")


def _plain_paths(paths: list[Any]) -> bool:
    """Whether every one of ``paths`` passes :func:`_relative_path_problem` (False: ask it)."""
    if not paths:
        return True
    if not all(isinstance(p, str) for p in paths):
        return False
    joined = "\x00".join(paths)
    return joined.count("\x00") == len(paths) - 1 and _PLAIN_PATHS.fullmatch(joined) is not None


def _fast_entry_problem(data: dict[str, Any], version: int) -> bool:
    """True unless :func:`_entry_problem` is sure to find nothing (the bulk checks at once)."""
    files, body = data.get("files"), data.get("body")
    if not isinstance(files, dict) or not isinstance(body, dict):
        return True
    digests = list(files.values())
    if not all(isinstance(d, str) and len(d) == 64 for d in digests):
        return True
    if not _HEX_RUN.fullmatch("".join(digests)) or not _plain_paths(list(files)):
        return True
    if data.get("op") == "gc" and "deleted_files" in body:
        deleted = body["deleted_files"]
        if not isinstance(deleted, list) or not _plain_paths(deleted):
            return True
        body = {**body, "deleted_files": []}
    # The rest (a few scalars) as the strict path checks them, the paths and digests known good.
    return _entry_problem({**data, "files": {}, "body": body}, version) is not None


def _parse_entry_strictly(raw: bytes, version: int, where: Path | str) -> Entry:
    try:
        data = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
        problem = _entry_problem(data, version)
        canonical = None if problem else canonical_json(data)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
        raise IntegrityError(f"journal entry {where} is not valid UTF-8 JSON: {e}") from e
    if problem is not None:
        raise IntegrityError(f"journal entry {where} {problem}")
    if canonical != raw:
        raise IntegrityError(f"journal entry {where} is not in canonical form; it was altered")
    content = {key: value for key, value in data.items() if key != "digest"}
    if sha256_bytes(canonical_json(content)) != data["digest"]:
        raise IntegrityError(f"journal entry {where} does not match its digest; it was altered")
    return _entry(version, data, raw)


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

    def entries(self) -> list[Entry]:
        """Returns all entries in version order, parsed and validated.

        Raises:
            IntegrityError: an entry file is malformed, altered or missing from the numbering;
                the message names the file.
        """
        result: list[Entry] = []
        scanned_all = list(self._scan())
        for i, scanned in enumerate(scanned_all):
            if scanned.error is not None:
                if i == len(scanned_all) - 1 and scanned.entry is None and self._unparsable(scanned):
                    raise self._torn(scanned.version, scanned.path, scanned.error, result)
                raise scanned.error
            if scanned.entry is not None:
                result.append(scanned.entry)
        return result

    def readable(self) -> tuple[list[Entry], TornEntryError | None]:
        """The entries, and None; or, when only the newest entry file is torn, the entries
        before it and that file's error (older versions stay readable by number).

        Raises:
            IntegrityError: any other damage, or a torn version 1.
        """
        try:
            return self.entries(), None
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

    def verify(self, root: Path) -> list[Problem]:
        """Checks the hash chain and every file each entry recorded, in journal order.

        Args:
            root: the directory the entries' file paths are relative to (the ledger root).

        Returns:
            Problems, the first naming the first broken file; empty when all is well.
            A file that a later ``gc`` entry lists in ``body["deleted_files"]`` may be missing.
        """
        root = Path(root)
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
        hashes = _hash_files(root, named)
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


def hash_workers() -> int:
    """Threads for hashing many files: sha256 and the codecs release the GIL, so a
    verify of a large ledger uses the cores it has (at most 8)."""
    return max(1, min(8, os.cpu_count() or 1))


def hash_files(root: Path, paths: set[str]) -> dict[str, str | OSError]:
    """sha256 of each ledger-relative file, or the OSError reading it raised (on threads)."""
    return _hash_files(root, paths)


def _hash_files(root: Path, paths: set[str]) -> dict[str, str | OSError]:
    """sha256 of each ledger-relative file, or the OSError reading it raised."""

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


def _entry(version: int, data: Mapping[str, Any], raw: bytes) -> Entry:
    """The Entry a checked file holds: ``data`` parsed from ``raw``, its hash the file's."""
    return Entry(
        version=version,
        op=data["op"],
        time=data["time"],
        parent=data["parent"],
        files=data["files"],
        body=data["body"],
        hash=sha256_bytes(raw),
        operator=data.get("operator"),
    )
