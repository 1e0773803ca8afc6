"""REFs: a version number, a request id, ``HEAD`` or ``HEAD~N``, resolved against the journal.

A REF is resolved from the entries alone (no array is read), so the read verbs
resolve one without importing torch or zarr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvw_ledger.errors import RefNotFoundError, TornEntryError
from kvw_ledger.journal import Entry

__all__ = ["HEAD_REF", "names_version", "resolve"]

HEAD_REF = re.compile(r"HEAD(?:~([0-9]+))?")  # ASCII digits only, as version numbers


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
