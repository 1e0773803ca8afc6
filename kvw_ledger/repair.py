"""``repair``: a torn newest journal entry moved aside, with a record of what was done."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

from kvw_ledger import sums
from kvw_ledger._fs import fsync_dir
from kvw_ledger.errors import BadInputError, IntegrityError, TornEntryError
from kvw_ledger.journal import canonical_json
from kvw_ledger.lock import WriterLock
from kvw_ledger.session import unnamed

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def repair(ledger: Ledger) -> dict[str, Any]:
    """The body of :meth:`Ledger.repair`, which documents it."""
    if ledger.remote is not None:
        raise BadInputError(f"repair works on a ledger directory, not on {ledger.remote.url}")
    with WriterLock(ledger.path, operation="repair", on_stale=ledger._on_stale).holding(ledger.lock_timeout, ledger.on_wait):
        try:
            newest = ledger.journal.head()
        except TornEntryError as e:
            torn = e
        else:
            try:
                ledger.journal.entries()
            except IntegrityError as e:
                raise IntegrityError(
                    f"{e}. repair only moves a torn newest entry aside, and the newest "
                    f"({f'journal/{newest.version:08d}.json' if newest else 'none'}) is valid: it "
                    "changes nothing here. Restore the damaged entry from a backup "
                    "(`kvw-ledger verify` lists the damage)"
                ) from e
            return {"repaired": False, "newest": None if newest is None else f"journal/{newest.version:08d}.json",
                    "message": "nothing to repair: the newest journal entry is valid"}
        try:
            ledger.journal.entries()
        except TornEntryError as e:
            if e.version != torn.version or e.valid is None:
                raise
        if torn.version == 1:
            raise torn
        from kvw_ledger.ledger import _utc_now  # looked up here: tests patch the clock

        stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
        folder = ledger.path / "repair" / f"{stamp}-v{torn.version:08d}"
        folder.mkdir(mode=0o700, parents=True)
        source = ledger.path / torn.path
        raw = source.read_bytes()
        record: dict[str, Any] = {
            "repaired": True,
            "time": stamp,
            "moved": torn.path,
            "to": f"{folder.relative_to(ledger.path).as_posix()}/{source.name}",
            "sha256": hashlib.sha256(raw).hexdigest(),
            "bytes": len(raw),
            "why": str(torn),
            "head_after": torn.version - 1,
        }
        os.rename(source, folder / source.name)
        fsync_dir(source.parent)
        ledger.torn = None
        leftovers = unnamed(ledger)  # what the torn entry's write added: kept, not deleted
        for prefix in leftovers:
            (folder / "files" / prefix).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.rename(ledger.path / prefix, folder / "files" / prefix)
        record["moved_arrays"] = leftovers
        (folder / "record.json").write_bytes(canonical_json(record))
        fsync_dir(folder)
        sums.write_head(ledger, ledger.head())
        return record
