"""One write to a ledger, from taking the writer lock to the head refresh after its commit.

A :class:`WriteSession` holds what lives only as long as one write: its SIGINT
guard, the prefixes it claimed, the entry it committed and the bases it read. The
long-lived :class:`~kvw_ledger.ledger.Ledger` opens one per verb::

    with self._session("forget") as tx:
        tx.claim(...)            # owns a prefix until the commit (removed if the write fails)
        ...                      # write arrays
        tx.commit(op, body, files, parent=head, weakening=staged)

Ctrl-C before the commit point aborts the write, which leaves nothing behind; from
the commit point on it is held until the write has finished (see
:mod:`kvw_ledger.interrupts`). A URL ledger's write also runs under the URL's
lock, after a pull, followed by a push (see :mod:`kvw_ledger.remote`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger import sums
from kvw_ledger.distributed import Step, World, is_shared
from kvw_ledger.errors import KVWLedgerError, StorageError
from kvw_ledger.interrupts import InterruptGuard
from kvw_ledger.journal import Entry, default_operator
from kvw_ledger.lock import WriterLock
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger

__all__ = ["PER_WRITE_GROUPS", "WriteSession", "entry_at", "open_session", "parallel_write", "unnamed"]

PER_WRITE_GROUPS = ("requests", "retain", "rederived", "probes")  # a write adds one child to one


class WriteSession:
    """The state of one write on ``ledger``; see the module docstring."""

    def __init__(self, ledger: Ledger, operation: str, guard: InterruptGuard) -> None:
        self.ledger = ledger
        self.operation = operation
        self.guard = guard
        self.claimed: list[str] = []  # prefixes this write owns until it commits
        self.committed: Entry | None = None  # the entry this write committed, if any
        self.bases: dict[str, torch.Tensor] = {}  # bases read during this write (immutable)

    def base(self, site: str) -> torch.Tensor:
        """The base of ``site``, read from the store once in this write (it never changes)."""
        if site not in self.bases:
            self.bases[site] = self.ledger.store.read_base(site)
        return self.bases[site]

    def claim(self, prefix: str) -> None:
        """Removes what an interrupted writer left under ``prefix``, and owns it until commit.

        Groups above ``prefix`` that do not exist yet (``rederived/`` on a first
        re-derivation) are owned too, so a failed write leaves not even their metadata.
        """
        store = self.ledger.store
        store.discard(prefix)
        parts = prefix.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            group = "/".join(parts[:depth])
            if not (store.path / group).exists():
                self.claimed.append(group)
                break
        self.claimed.append(prefix)

    def release_claims(self) -> None:
        """Removes everything this write claimed (it failed before its commit)."""
        for prefix in reversed(self.claimed):
            with contextlib.suppress(OSError, KVWLedgerError):
                self.ledger.store.discard(prefix)

    def append(self, op: str, body: dict[str, Any], files: dict[str, str], *, parent: Entry) -> Entry:
        """Appends the journal entry: the commit point. Claimed arrays now belong to it.

        From here to the end of the write, Ctrl-C is held.
        """
        self.guard.hold()
        entry = self.ledger.journal.append(op, body, files, parent=parent, operator=self.ledger.operator)
        self.claimed = []
        self.committed = entry
        return entry

    def commit(
        self,
        op: str,
        body: dict[str, Any],
        files: dict[str, str],
        *,
        parent: Entry,
        weakening: Weakening | None = None,
    ) -> Entry:
        """:meth:`append`, then the head cache for the new entry (see :meth:`write_head`)."""
        entry = self.append(op, body, files, parent=parent)
        self.write_head(entry, weakening)
        return entry

    def write_head(self, entry: Entry, weakening: Weakening | None = None) -> None:
        """Caches the sum at ``entry``: ``weakening`` (a staged step's), else replayed."""
        sums.write_head(self.ledger, entry, weakening)


@contextlib.contextmanager
def open_session(ledger: Ledger, operation: str) -> Iterator[WriteSession]:
    """One write on ``ledger`` (see the module docstring); the session it yields is also
    ``ledger._tx`` until the write ends."""
    if ledger.operator is None:
        default_operator()  # a bad $KVW_LEDGER_OPERATOR fails before any work, not at the commit
    tx = WriteSession(ledger, operation, InterruptGuard())
    ledger._tx = tx
    try:
        yield from _guarded(tx)
    finally:
        committed = tx.committed
        if committed is not None and tx.guard.pending:
            ledger._warn(
                f"interrupted after version {committed.version} was committed; the write was "
                "finished first"
            )
        if not (committed is not None and ledger.hold_interrupts_after_commit):
            tx.guard.end()
        ledger._tx = None


def _guarded(tx: WriteSession) -> Iterator[WriteSession]:
    ledger, operation = tx.ledger, tx.operation
    remote = ledger.remote
    if remote is None:
        with _local(tx):
            yield tx
        return
    with remote.lock(operation, ledger.lock_timeout, ledger.on_wait):
        with WriterLock(ledger.path, operation="pull").holding(ledger.lock_timeout, ledger.on_wait):
            remote.pull(ledger.path, progress=True)
        remote.push(ledger.path, progress=True)  # what an earlier write committed here but could not publish
        with _local(tx):
            yield tx
        try:
            remote.push(ledger.path, progress=True)
        except (OSError, KVWLedgerError) as e:
            raise StorageError(
                f"{operation} was committed in the local copy {ledger.path} but not published to "
                f"{remote.url} ({e}); the next write there publishes it"
            ) from e


@contextlib.contextmanager
def _local(tx: WriteSession) -> Iterator[None]:
    """Holds the writer lock (waiting up to ``lock_timeout`` for it) around one write.

    Anything a failed write claimed is removed again, and a storage failure (full
    disk, read-only directory) becomes a StorageError: the ledger is left as it
    was. Before the write, what an interrupted or killed writer left (scratch
    directories, arrays no entry names) is removed.
    """
    ledger, guard = tx.ledger, tx.guard
    lock = WriterLock(ledger.path, operation=tx.operation, on_stale=ledger._on_stale)
    lock.acquire(ledger.lock_timeout, ledger.on_wait, guard)
    try:
        ledger.journal.head()  # a torn newest entry: refuse (TornEntryError) before touching anything
        ledger.store.clean_temp()  # a crashed writer's scratch; the lock makes us the only writer
        ledger.journal.clean_temp()
        for prefix in unnamed(ledger):
            ledger.store.discard(prefix)
        yield
    except OSError as e:
        guard.hold()  # the cleanup below is never cut short
        if not isinstance(e, KVWLedgerError):
            tx.release_claims()
            done = tx.committed
            outcome = (
                f"version {done.version} was committed, but the cleanup after it failed; the next "
                "write retries it"
                if done is not None
                else f"nothing was committed by {tx.operation}"
            )
            raise StorageError(
                f"could not write to the ledger at {ledger.path} ({e.strerror or e}); {outcome}"
            ) from e
        tx.release_claims()
        raise
    except BaseException:
        guard.hold()
        tx.release_claims()
        raise
    finally:
        guard.hold()
        tx.claimed = []
        tx.bases = {}
        lock.release()


def unnamed(ledger: Ledger) -> list[str]:
    """The children of the per-write groups (requests/, retain/, rederived/, probes/), or
    whole groups, that no journal entry names: the leftovers of an interrupted or killed
    writer, whatever verb it ran."""
    named: set[str] = set()
    for entry in ledger.entries():
        named.update(entry.files)
        named.update(entry.body.get("deleted_files", []))  # gc's tombstones: gc sweeps them
    owners = {"/".join(path.split("/")[:2]) for path in named}
    found = []
    for group in PER_WRITE_GROUPS:
        top = ledger.path / group
        if not top.is_dir():
            continue
        children = []
        for child in sorted(os.listdir(top)):
            prefix = f"{group}/{child}"
            if not (prefix in owners or (child == "zarr.json" and prefix in named)):
                children.append(prefix)
        found += [group] if len(children) == len(os.listdir(top)) else children
    return found


@contextlib.contextmanager
def parallel_write(ledger: Ledger, operation: str, world: World) -> Iterator[Step]:
    """:func:`open_session` for one rank of a data-parallel job (one process: just that).

    Rank 0 takes the write and finds HEAD under its lock; every rank gets that entry
    as ``step.head``. The body calls ``step.ready()`` before its forward passes, and
    on every rank but 0, ``step.finish()`` after them. Rank 0's commit (or any
    rank's error) then reaches every rank.
    """
    step = Step(world)
    tx: WriteSession | None = None
    if not world.parallel:
        with open_session(ledger, operation):
            step.head = ledger.head()
            yield step
        return
    try:
        with contextlib.ExitStack() as held:
            with world.together() as plan:
                if world.is_main:
                    tx = held.enter_context(open_session(ledger, operation))
                    plan.value = ledger.head().version
            with world.together():
                step.head = ledger.head() if world.is_main else entry_at(ledger, plan.main)
            yield step
    except Exception as e:
        if not step.finished and not is_shared(e):
            step.finish(error=e)  # tells the others, and raises here
        raise
    if not step.finished:
        step.finish(tx.committed.version if tx is not None and tx.committed is not None else None)


def entry_at(ledger: Ledger, version: int) -> Entry:
    """Entry ``version``; a URL ledger's mirror catches up first if it lacks it
    (another rank's writer may have pulled past this rank's mirror)."""
    if ledger.remote is not None and ledger.head().version < version:
        with WriterLock(ledger.path, operation="pull").holding(ledger.lock_timeout, ledger.on_wait):
            ledger.remote.pull(ledger.path, progress=False)
    return ledger.journal.get(version)
