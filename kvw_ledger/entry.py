"""One journal entry: its schema, its one byte form, and the parsers that hold a file to it.

An entry file is the canonical JSON (:func:`canonical_json`) of its content plus
``digest``, the sha256 of that content without the key. :func:`parse_entry` accepts
exactly the files :class:`kvw_ledger.journal.Journal` writes: a sound file takes a fast
path, and anything else is checked strictly and named in an :class:`IntegrityError`.
The operator (who committed) and the time format live here too, as the schema's fields.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kvw_ledger._fs import sha256_bytes
from kvw_ledger.errors import BadInputError, IntegrityError

__all__ = [
    "OPS",
    "Entry",
    "Problem",
    "canonical_json",
    "check_operator",
    "default_operator",
    "format_time",
    "parse_entry",
    "utc_now",
]


OPS = ("init", "retain", "forget", "revert", "rederive", "gc", "probe", "audit")

_KEYS = frozenset({"version", "op", "time", "parent", "files", "body", "digest"})
# Entries written before operators were recorded lack this key; they still parse and verify.
_OPTIONAL_KEYS = frozenset({"operator"})
OPERATOR_ENV = "KVW_LEDGER_OPERATOR"
_MAX_OPERATOR = 200
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


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
