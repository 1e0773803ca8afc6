"""REFs: a version number, a request id, ``HEAD`` or ``HEAD~N``, resolved against the journal;
and the ids a REF or an array path may name, checked as plain strings.

A REF is resolved from the entries alone (no array is read), so the read verbs
resolve one without importing torch or zarr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvw_ledger.errors import BadInputError, RefNotFoundError, TornEntryError
from kvw_ledger.journal import Entry

__all__ = ["HEAD_REF", "check_id", "check_request_id", "names_version", "resolve"]

HEAD_REF = re.compile(r"HEAD(?:~([0-9]+))?")  # ASCII digits only, as version numbers
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def resolve(ref: str | int, entries: Sequence[Entry], torn: TornEntryError | None = None) -> int:
    """Turns a REF into the version it names among ``entries`` (the whole journal, in order).

    ``torn`` is the newest entry file when it is torn (``entries`` then end before it):
    HEAD, HEAD~N, its version and a request id not found before it all name it, and
    raise it.

    Raises:
        RefNotFoundError: the REF names nothing in this journal.
        TornEntryError: the REF names (or counts back from) the torn entry.
    """
    last = entries[-1].version
    text = str(ref).strip()
    match = HEAD_REF.fullmatch(text)
    if torn is not None and torn.version != last + 1:
        torn = None
    if torn is not None and (match or (text.isascii() and text.isdigit() and _small_int(text) == torn.version)):
        raise torn  # HEAD, and what HEAD~N counts back from, is the torn entry
    if match:
        back = _small_int(match.group(1) or "0")
        if back is None or back >= last:
            raise RefNotFoundError(f"{text} goes back past version 1 (HEAD is version {last})")
        return last - back
    if text.isascii() and text.isdigit():
        version = _small_int(text)
        if version is None or not 1 <= version <= last:
            raise RefNotFoundError(f"version {version or text} does not exist; versions are 1..{last}")
        return version
    for entry in entries:
        if entry.op == "forget" and entry.body.get("request") == text:
            return entry.version
    if torn is not None:
        raise torn  # the request may be the torn entry's
    raise RefNotFoundError(
        f"{text!r} is not a version, a request id, HEAD or HEAD~N of this ledger "
        "(see `kvw-ledger log`)"
    )


def names_version(ref: str | int, version: int) -> bool:
    """Whether ``ref`` is ``HEAD``, ``HEAD~0`` or the number ``version``, without a replay."""
    text = str(ref).strip()
    return text in ("HEAD", "HEAD~0") or (text.isascii() and text.isdigit() and text.lstrip("0") == str(version))


def _small_int(digits: str) -> int | None:
    """ASCII digits as an int, or None past any journal's length (int() refuses > 4300 digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None


def check_id(value: str, what: str = "request id") -> str:
    """Validate a request or stats id; return it unchanged.

    Raises:
        BadInputError: naming the id, if it is not 1-128 of ``A-Za-z0-9._-``
            starting with a letter or digit.
    """
    if isinstance(value, str) and not value.strip():
        raise BadInputError(
            f"the {what} {value!r} is empty or blank; give --id a name such as req-1, "
            "or leave --id out for the default"
        )
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise BadInputError(
            f"bad {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def check_request_id(request_id: str) -> str:
    """A request id must not read as another kind of REF."""
    check_id(request_id)
    if request_id.isdigit() or HEAD_REF.fullmatch(request_id):
        raise BadInputError(
            f"request id {request_id!r} reads as a version REF; choose an id with a letter, e.g. req-{request_id}"
        )
    return request_id
