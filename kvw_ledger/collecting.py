"""``gc``: the arrays of reverted requests deleted, after an entry that names them
(the journal keeps their hashes as tombstones, so ``verify`` still passes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvw_ledger import staging
from kvw_ledger.errors import BadInputError
from kvw_ledger.journal import Entry
from kvw_ledger.replay import request_prefixes

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def gc(ledger: Ledger, *, reverted: bool = True) -> Entry:
    """The body of :meth:`Ledger.gc`, which documents it."""
    if not reverted:
        raise BadInputError("gc needs --reverted (the only kind of garbage it collects)")
    with ledger._session("gc") as tx:
        entries = ledger.entries()
        head = entries[-1]
        state = ledger.state(head.version)
        staging.check_reads(ledger, "gc", state, base=False)  # its head refresh sums the active requests
        victims = sorted(r for r in state.reverted if r not in state.active and r not in state.deleted)
        prefixes = {r: request_prefixes(r, entries) for r in [*victims, *state.deleted]}
        on_disk = ledger.store.files()
        deleted_files = sorted(
            f for r in victims for prefix in prefixes[r] for f in on_disk if f.startswith(f"{prefix}/")
        )
        body = {"deleted": victims, "deleted_files": deleted_files, "active": state.active}
        entry = tx.commit("gc", body, {}, parent=head)  # the active set is unchanged; no deleted array is needed
        # Delete only after the commit: a crash in between leaves files the journal already
        # calls deleted (the next gc removes them), never a missing file an entry still needs.
        # Requests deleted by an earlier gc are swept again for such leftovers.
        for held in prefixes.values():
            for prefix in held:
                ledger.store.delete(prefix)
        return entry
