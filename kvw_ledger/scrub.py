"""verify's reading of every array, spread over worker processes.

At 1,000 requests verify decodes some 50,000 small arrays. Each costs ~0.2 ms of
zstd, sha256 and file reads, and those calls are too short to overlap in threads
(each returns to a GIL the other thread holds), so the work runs in forked
processes when there is enough of it. A worker reads with NumPy alone
(:mod:`kvw_ledger._chunks`): it must not touch torch's thread pool or zarr's
event-loop thread, neither of which survives a fork. Whatever only torch or zarr
reads (another layout, an unusual dtype, 0-d log-scales) is handed back to the
caller, which reads it as it always has.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import signal
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from kvw_ledger import _chunks
from kvw_ledger._chunks import Digests
from kvw_ledger._tree import check_name
from kvw_ledger.errors import IntegrityError, KVWLedgerError, RefNotFoundError

__all__ = ["PROCESS_MIN_ARRAYS", "Chain", "Findings", "Reads"]

# Below this many arrays a fork costs more than it saves (and tests verify small ledgers).
PROCESS_MIN_ARRAYS = 4096
_BATCH = 256  # arrays per task: at 50,000 arrays a task per array costs seconds

Hash = str | IntegrityError | None  # an array's content hash; None when absent, the error when unreadable


@dataclass(frozen=True)
class Chain:
    """The exponent arrays of one site that sum to the head, in chain order."""

    site: str
    names: tuple[str, ...]
    n_vectors: int


@dataclass
class Findings:
    """What :class:`Reads` read: file digests, content hashes and chain sums, and what it left."""

    digests: Digests = field(default_factory=dict)
    hashes: dict[str, Hash] = field(default_factory=dict)
    sums: dict[str, np.ndarray | KVWLedgerError] = field(default_factory=dict)
    redo: list[str] = field(default_factory=list)  # arrays only torch or zarr reads
    redo_chains: list[str] = field(default_factory=list)  # sites whose chain holds such an array

    def add(self, other: Findings) -> None:
        """Takes in another task's findings (tasks share no array)."""
        self.digests.update(other.digests)
        self.hashes.update(other.hashes)
        self.sums.update(other.sums)
        self.redo += other.redo
        self.redo_chains += other.redo_chains


class _Foreign(Exception):
    """The array needs torch or zarr to be read."""


class Reads:
    """Arrays handed to workers as they are known; :meth:`results` waits for them all.
    The workers exist once the block is entered (forked then, so a thread started
    inside it cannot hold a lock a worker inherits).

    Each array is read once: the content hash of each in ``wanted``, each chain's
    float32 sum in chain order, and the sha256 of every file read. A missing array's
    hash is None and a damaged one's the IntegrityError; a chain whose array cannot
    be read sums to that error.

    Args:
        root: the ledger directory.
        wanted: the arrays whose content hash is asked for.
        stored: each torch dtype's name -> the NumPy dtype it is stored as; an array of
            a dtype not in it is left in ``redo``, as is any layout only zarr reads.
        workers: how many processes (or, for a small ledger, threads) share the reads.
        expected: about how many arrays will be handed in (processes pay off from
            :data:`PROCESS_MIN_ARRAYS`).
    """

    def __init__(
        self, root: Path, wanted: set[str], stored: Mapping[str, np.dtype], *, workers: int, expected: int
    ) -> None:
        self._root, self._wanted, self._stored = str(root), wanted, stored
        self._workers, self._expected = workers, expected
        self._futures: list[Future[Findings]] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Reads:
        self._pool = self._stack.enter_context(_executor(self._workers, self._expected))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stack.__exit__(kind, error, trace)

    def alone(self, names: Sequence[str]) -> None:
        """Arrays to hash only."""
        for i in range(0, len(names), _BATCH):
            self._submit(list(names[i : i + _BATCH]), [])

    def chains(self, chains: Sequence[Chain]) -> None:
        """Exponent arrays to hash (those wanted) and sum per site."""
        for chain in chains:
            self._submit([], [chain])

    def results(self) -> Findings:
        """Everything found so far, once every read handed in has finished."""
        found = Findings()
        for future in self._futures:
            found.add(future.result())
        return found

    def _submit(self, alone: list[str], chains: list[Chain]) -> None:
        self._futures.append(self._pool.submit(_task, self._root, alone, chains, self._wanted, self._stored))


@contextlib.contextmanager
def _executor(workers: int, count: int) -> Iterator[Executor]:
    """Forked processes for a large ledger where fork exists (Linux); threads otherwise."""
    pool: Executor
    frozen = False
    if workers < 2 or count < PROCESS_MIN_ARRAYS or "fork" not in multiprocessing.get_all_start_methods():
        pool = ThreadPoolExecutor(max_workers=workers)
    else:
        # A forked worker's garbage collector would otherwise walk (and so copy) every
        # object of the parent's heap: the journal's entries alone are 100,000 objects.
        gc.freeze()
        frozen = True
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_sigint
        )
        pool.submit(int)  # forks every worker now, before the caller starts another thread
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # a Ctrl-C stops the reads, not after them
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if frozen:
            gc.unfreeze()


def _ignore_sigint() -> None:
    """The parent alone answers Ctrl-C (and stops the workers), so none prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _task(
    root: str, alone: list[str], chains: list[Chain], wanted: set[str], stored: Mapping[str, np.dtype]
) -> Findings:
    found = Findings()
    for name in alone:
        _hash_alone(root, name, found, stored)
    for chain in chains:
        _sum_chain(root, chain, wanted, found, stored)
    return found


def _hash_alone(root: str, name: str, found: Findings, stored: Mapping[str, np.dtype]) -> None:
    try:
        found.hashes[name] = _read(root, name, found.digests, stored)[1]
    except _Foreign:
        found.redo.append(name)
    except RefNotFoundError:
        found.hashes[name] = None  # a missing array's files are reported by the journal
    except IntegrityError as e:
        found.hashes[name] = e


def _sum_chain(root: str, chain: Chain, wanted: set[str], found: Findings, stored: Mapping[str, np.dtype]) -> None:
    """As the head's sum was made: ``total += exponents`` per request, in float32, in order
    (NumPy's float32 add rounds as torch's does, element by element)."""
    total = np.zeros(chain.n_vectors, dtype=np.float32)
    for i, name in enumerate(chain.names):
        try:
            data, digest = _read(root, name, found.digests, stored)
        except _Foreign:
            found.redo_chains.append(chain.site)
            return
        except KVWLedgerError as e:
            found.sums[chain.site] = e
            if name in wanted:
                found.hashes[name] = e if isinstance(e, IntegrityError) else None
            for rest in chain.names[i + 1 :]:
                if rest in wanted:
                    _hash_alone(root, rest, found, stored)
            return
        if data.dtype != np.float32 or data.shape != total.shape:
            found.redo_chains.append(chain.site)  # torch's broadcasting and promotion decide
            return
        if name in wanted:
            found.hashes[name] = digest
        total += data
    found.sums[chain.site] = total


def _read(root: str, name: str, digests: Digests, stored: Mapping[str, np.dtype]) -> tuple[np.ndarray, str]:
    """An array's stored bits and content hash, as ``_codec.read_hashed`` gives them."""
    check_name(name)
    _, _, attr, layout = _chunks.read_meta(root, name, digests)
    if layout is None or stored.get(attr) != layout[2]:
        raise _Foreign(name)
    data = _chunks.read_own_chunks(root, name, layout, digests)
    return data, _chunks.array_digest(attr, data)
