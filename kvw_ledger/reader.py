"""A ledger opened for its journal only: the read path that imports neither torch nor zarr.

``log`` and ``show`` read JSON files (the journal and the root ``zarr.json``), so
they start in the time Python and click take. :class:`kvw_ledger.ledger.Ledger`
opens through the same checks and adds the arrays on top.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvw_ledger import refs
from kvw_ledger.errors import IntegrityError, LedgerNotFoundError, RefNotFoundError, TornEntryError
from kvw_ledger.journal import Entry, Journal, sha256_file
from kvw_ledger.root import read_root_attrs

if TYPE_CHECKING:
    from kvw_ledger.remote import Remote

__all__ = ["LedgerReader", "check_root_attrs"]

LOCK_TIMEOUT = 600.0  # seconds a pull waits for another writer of the same mirror


@dataclass
class LedgerReader:
    """The journal and root attributes of one ledger; for a URL, of its pulled mirror."""

    path: Path  # the ledger directory (a URL ledger's local mirror)
    journal: Journal
    attrs: dict[str, Any]  # the root zarr.json's attributes, format version checked
    remote: Remote | None = None  # set when the ledger lives at a URL
    torn: TornEntryError | None = None  # set by entries() when the newest entry file is torn

    @classmethod
    def open(
        cls,
        location: str | Path,
        *,
        clock: Callable[[], _dt.datetime] | None = None,
        check_root: bool = True,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> LedgerReader:
        """Opens the ledger at ``location`` (a directory or an fsspec URL); readers never lock.

        A URL is first pulled into its mirror (under the mirror's lock). With
        ``check_root`` the root ``zarr.json`` must be the one init recorded.

        Raises:
            LedgerNotFoundError: nothing at ``location`` is a ledger.
            FormatVersionError: it was written by a newer kvw-ledger.
            IntegrityError: ``check_root`` and the root differs from init's record.
        """
        remote = None
        path = Path(location)
        if "://" in str(location):  # remote.py (and fsspec) only for URLs: `log` stays quick
            from kvw_ledger.remote import Remote, is_url, local_path

            if is_url(location):
                remote = Remote(str(location))
                path = _pull(remote, lock_timeout)
            else:
                path = local_path(location)
        attrs = read_root_attrs(path)
        if not (path / "journal").is_dir():
            raise LedgerNotFoundError(f"{path} has no journal; it is not a kvw-ledger ledger")
        journal = Journal(path) if clock is None else Journal(path, clock=clock)
        if check_root:
            check_root_attrs(path, journal)
        return cls(path, journal, attrs, remote)

    def entries(self) -> list[Entry]:
        """Every journal entry, in version order; with a torn newest entry file, the
        entries before it, and :attr:`torn` set (see :meth:`Journal.readable`)."""
        entries, self.torn = self.journal.readable()
        return entries

    def entry(self, ref: str | int) -> Entry:
        """The entry of the version ``ref`` names (see :mod:`kvw_ledger.refs`)."""
        entries = self.entries()
        return entries[refs.resolve(ref, entries, self.torn) - 1]


def check_root_attrs(path: Path, journal: Journal) -> None:
    """The sites, tensor locations and fingerprint every verb trusts must be those of init.

    Raises:
        IntegrityError: init never committed, or ``zarr.json`` differs from its record.
    """
    root = path / "zarr.json"
    try:
        init = journal.get(1)
    except RefNotFoundError as e:
        raise IntegrityError(
            f"{path}: init never committed (interrupted?); remove the directory and run init again"
        ) from e
    if init.files.get("zarr.json") != sha256_file(root):
        raise IntegrityError(f"{root} differs from what init recorded; the ledger is damaged")


def _pull(remote: Remote, lock_timeout: float) -> Path:
    """Brings the URL's mirror up to the URL and returns it; a new mirror that fails is removed."""
    from kvw_ledger.lock import WriterLock
    from kvw_ledger.remote import mirror_dir

    mirror = mirror_dir(remote.url)
    fresh = not mirror.exists()
    mirror.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with WriterLock(mirror, operation="pull").holding(lock_timeout):
            remote.pull(mirror, progress=True)  # shown on a terminal only
    except BaseException:
        if fresh:
            shutil.rmtree(mirror, ignore_errors=True)
        raise
    return mirror

