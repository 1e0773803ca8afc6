"""``verify``: the chain, every file and array, the head cache and the base, re-checked.

Every file is read once: the bytes of an array's files are hashed for the journal's
check and decoded for the array's content hash. The arrays the head cache is the
sum of (the current exponents and log-scales of the requests active at its version)
are read per site in chain order, hashed against their entries and summed as they
are read, so checking the head costs no second read of the request arrays. The
reads run in worker processes for a large ledger (``scrub.py``), beside a thread
that lists the files and checks the base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvw_ledger._codec import Digests, stored_dtypes
from kvw_ledger._fs import hash_files, hash_workers
from kvw_ledger.errors import IntegrityError, KVWLedgerError, RefNotFoundError
from kvw_ledger.journal import Entry, Problem
from kvw_ledger.model_files import raw_bits as _bits
from kvw_ledger.replay import LedgerState, apply, replay
from kvw_ledger.scrub import Chain, Reads
from kvw_ledger.store import HeadCache, Store

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger

__all__ = ["VerifyReport", "verify_ledger"]

_Hash = str | IntegrityError | None  # an array's content hash; None when absent, the error when unreadable


@dataclass
class VerifyReport:
    """The findings of :meth:`Ledger.verify`; ``ok`` when no finding is an error."""

    problems: list[Problem]
    checked_entries: int
    checked_arrays: int

    @property
    def ok(self) -> bool:
        """True when nothing is broken (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for ``verify --json``."""
        return {
            "ok": self.ok,
            "checked_entries": self.checked_entries,
            "checked_arrays": self.checked_arrays,
            "problems": [
                {"path": p.path, "message": p.message, "severity": p.severity}
                for p in self.problems
            ],
        }


def verify_ledger(ledger: Ledger, model_dir: str | Path | None, check_model: bool) -> VerifyReport:
    """See :meth:`Ledger.verify`."""
    try:
        scanned = ledger.journal.scan()  # read once for the entries and the chain check
        entries, _ = ledger.journal.readable(scanned)
    except IntegrityError as e:
        return VerifyReport([*ledger.journal.verify(ledger.path), Problem("journal", str(e))], 0, 0)
    # The head and base checks trust the sites and locations in the root zarr.json,
    # so it is checked first; the journal's check below reports it in its own words.
    digests: Digests = dict(hash_files(ledger.path, {"zarr.json"}))
    trusted = all(e.files["zarr.json"] == digests["zarr.json"] for e in entries if "zarr.json" in e.files)
    head = _HeadSum(ledger, entries if trusted else [])
    # The listing and the base check need nothing the array reads find, so they run
    # beside them (the reads are in worker processes, or threads that wait on I/O).
    with ThreadPoolExecutor(max_workers=1) as beside:
        futures: list[Future[Any]] = []

        def start_beside() -> None:
            futures.append(beside.submit(ledger.store.files))
            if check_model and trusted:
                futures.append(beside.submit(_verify_base, ledger, model_dir))

        # Every array is decoded from the same bytes its files are hashed from, once.
        contents = head.hash_and_sum({a for e in entries for a in e.body.get("arrays", {})}, digests, start_beside)
        files, base_problems = futures[0].result(), futures[1].result() if len(futures) > 1 else []
    problems = list(ledger.journal.verify(ledger.path, digests=digests, scanned=scanned))
    named: set[str] = set()
    checked = 0
    state = LedgerState(0)
    for entry in entries:
        named.update(entry.files)
        named.update(entry.body.get("deleted_files", []))
        for array, expected in entry.body.get("arrays", {}).items():
            actual = contents[array]
            if actual is None:
                continue  # a missing array's files are already reported by the journal
            checked += 1
            if isinstance(actual, IntegrityError):
                problems.append(Problem(array, str(actual)))
                continue
            if actual != expected:
                problems.append(
                    Problem(array, f"array content hash {actual[:12]}... != recorded {expected[:12]}...")
                )
        apply(state, entry)
        if list(entry.body.get("active", state.active)) != state.active:
            problems.append(
                Problem(
                    f"journal/{entry.version:08d}.json",
                    f"records active requests {entry.body.get('active')} but replay gives {state.active}",
                )
            )
    if trusted:
        problems.extend(head.problems())
    for path in files:
        if path not in named and not path.startswith("head/"):
            problems.append(
                Problem(path, "no journal entry names this file (left by an interrupted write)", "warning")
            )
    problems.extend(base_problems)
    if ledger.remote is not None:
        problems.extend(ledger.remote.verify())
    return VerifyReport(problems, len(entries), checked)


class _HeadSum:
    """The head cache's check: sealed, naming an entry of the journal, equal to the
    replayed sum there (summed while :meth:`hash_and_sum` reads the arrays).

    A head older than HEAD (a crash between a commit and the head refresh) or none
    at all (a crash inside the swap) is a warning; anything else is damage.
    """

    def __init__(self, ledger: Ledger, entries: Sequence[Entry]) -> None:
        self.ledger, self.store, self.entries = ledger, ledger.store, entries
        self.found: list[Problem] = []
        self.cached: HeadCache | None = None
        self.chains: dict[str, list[str]] = {}  # site -> exponent arrays to sum, chain order
        self.scale_chains: dict[str, list[str]] = {}  # site -> log-scale arrays to sum, chain order
        self.sums: dict[str, torch.Tensor | KVWLedgerError] = {}
        self.scale_sums: dict[str, torch.Tensor | KVWLedgerError] = {}
        self.missing: KVWLedgerError | None = None  # a request with no arrays left (gc)
        self.at: LedgerState | None = None  # the state at the head cache's version, when checked
        if not entries:
            return  # not to be checked
        self.found = [Problem(path, message) for path, message in self.store.check_head()]
        if self.found:
            return
        try:
            self.cached = self.store.read_head_cache()
        except IntegrityError as e:
            self.found = [Problem("head", str(e))]
            return
        if self.cached is None:
            self.found = [
                Problem(
                    "head",
                    "the head cache is missing (a write was interrupted); the next write rebuilds it",
                    "warning",
                )
            ]
            return
        version, digest = self.cached.version, self.cached.digest
        if not 1 <= version <= len(entries) or entries[version - 1].hash != digest:
            self.found = [
                Problem(
                    "head/zarr.json",
                    f"the head cache names version {version} (entry sha256 {digest[:12]}...), "
                    "which is not an entry of this journal",
                )
            ]
            self.cached = None
            return
        self.at = replay(entries, version)

    def _prefixes(self) -> set[str]:
        """Where the arrays the head is the sum of lie (the requests active at its version)."""
        at = self.at
        if at is None:
            return set()
        scales = (at.log_scales.get(r) for r in at.active)
        return {*(at.exponent_prefix(r) for r in at.active), *(p for p in scales if p is not None)}

    def _plan(self) -> None:
        """Which arrays, in which order, sum to the head (as ``Ledger.sums`` reads them)."""
        if self.at is None:
            return
        try:
            self._list(self.at)
        except KVWLedgerError as e:  # a damaged group of a request's arrays, also reported by name
            self.missing = e
            self.chains, self.scale_chains = {}, {}

    def _list(self, at: LedgerState) -> None:
        for request_id in at.active:
            for prefix, chains, what in (
                (at.exponent_prefix(request_id), self.chains, "exponents"),
                (at.log_scales.get(request_id), self.scale_chains, "log-scales"),
            ):
                if prefix is None:
                    continue
                names = self.store.list_arrays(prefix)
                if not names and self.missing is None:
                    self.missing = RefNotFoundError(
                        f"the {what} of request {request_id!r} are gone (deleted by gc, or never written); "
                        "versions where it was active can no longer be rebuilt"
                    )
                for name in names:
                    chains.setdefault(name.rsplit("/", 1)[1], []).append(name)

    def hash_and_sum(self, arrays: set[str], digests: Digests, started: Callable[[], None]) -> dict[str, _Hash]:
        """Each of ``arrays``' content hash; the head's sums are computed on the way, and
        every file read is hashed into ``digests``. ``started`` is called once the
        readers exist: a thread it starts cannot be inside a lock when they fork."""
        prefixes = self._prefixes()
        maybe = {a for a in arrays if _under(a, prefixes)}
        sites = {s.name: s.n_vectors for s in self.ledger.sites}
        workers, stored = hash_workers(), stored_dtypes()
        with Reads(self.store.path, arrays, stored, workers=workers, expected=len(arrays)) as reads:
            started()
            reads.alone(sorted(arrays - maybe))  # read while the head's arrays are listed
            self._plan()
            chained = {n for c in (*self.chains.values(), *self.scale_chains.values()) for n in c}
            reads.alone(sorted(maybe - chained))
            reads.chains([Chain(site, tuple(names), sites.get(site, 0)) for site, names in self.chains.items()])
            found = reads.results()
        digests.update(found.digests)
        hashes: dict[str, _Hash] = dict(found.hashes)
        for site, total in found.sums.items():
            self.sums[site] = torch.from_numpy(total) if isinstance(total, np.ndarray) else total
        # What only torch or zarr reads, read here as it always was: the 0-d log-scales,
        # other layouts and dtypes.
        for array in found.redo:
            hashes[array] = _read_hash(self.store, array, digests)[1]
        for site in found.redo_chains:
            zero = torch.zeros(sites.get(site, 0), dtype=torch.float32)
            self._chain(site, self.chains[site], self.sums, zero, arrays, hashes, digests)
        for site, names in self.scale_chains.items():
            self._chain(site, names, self.scale_sums, torch.zeros((), dtype=torch.float32), arrays, hashes, digests)
        for array in arrays:
            hashes.setdefault(array, None)
        return hashes

    def _chain(
        self,
        site: str,
        names: list[str],
        sums: dict[str, torch.Tensor | KVWLedgerError],
        zero: torch.Tensor,
        arrays: set[str],
        hashes: dict[str, _Hash],
        digests: Digests,
    ) -> None:
        """One site's chain summed through torch, as ``Ledger.sums`` adds it."""
        total = zero
        for i, name in enumerate(names):
            try:
                value, digest = self.store.read_hashed(name, digests=digests)
            except KVWLedgerError as e:
                sums[site] = e
                if name in arrays:
                    hashes[name] = e if isinstance(e, IntegrityError) else None
                for rest in names[i + 1 :]:
                    if rest in arrays:
                        hashes[rest] = _read_hash(self.store, rest, digests)[1]
                return
            if name in arrays:
                hashes[name] = digest
            if zero.dim() == 0:  # a log-scale: as Weakening adds them
                total = total + value.reshape(())
            else:
                total += value  # (n_vectors,), in place as the sums always were
        sums[site] = total

    def problems(self) -> list[Problem]:
        """What :meth:`hash_and_sum` found wrong with the head cache."""
        if self.found or self.cached is None:
            return self.found
        version, last = self.cached.version, len(self.entries)
        stale = Problem(
            "head",
            f"the head cache is of version {version}, HEAD is {last} (a write was interrupted); "
            "the next write rebuilds it",
            "warning",
        )
        failed = self.missing or next(
            (v for v in (*self.sums.values(), *self.scale_sums.values()) if isinstance(v, KVWLedgerError)), None
        )
        if failed is not None:  # a damaged request array, also reported by name
            if version < last:
                return [stale]  # its requests may since have been deleted by gc
            return [Problem("head", f"cannot be checked against the request arrays: {failed}")]
        tensors, scales = self.cached.weakening.exponents, self.cached.weakening.log_scales
        for site in self.ledger.sites:
            value = self.sums.get(site.name, torch.zeros(site.n_vectors, dtype=torch.float32))
            got = tensors.get(site.name)
            if (
                got is None
                or not isinstance(value, torch.Tensor)
                or not torch.equal(got.view(torch.int32), value.view(torch.int32))
            ):
                return [
                    Problem(
                        Store.head_path(site.name),
                        f"the head cache differs from the sum of active exponents at version {version}",
                    )
                ]
        for name in sorted(set(scales) | set(self.scale_sums)):
            got, want = scales.get(name), self.scale_sums.get(name)
            if (
                got is None
                or not isinstance(want, torch.Tensor)
                or not torch.equal(got.view(torch.int32), want.view(torch.int32))
            ):
                return [
                    Problem(
                        Store.head_path(name),
                        f"the head cache's log-scale differs from the sum of active log-scales at version {version}",
                    )
                ]
        return [stale] if version < last else []


def _under(array: str, prefixes: set[str]) -> bool:
    """Whether ``array`` is at or under one of ``prefixes``."""
    parts = array.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def _read_hash(store: Store, array: str, digests: Digests) -> tuple[str, _Hash]:
    try:
        # read_array raises RefNotFoundError exactly where has_array says False, so asking
        # has_array first only read each array's zarr.json twice.
        return array, store.content_hash(array, digests=digests)
    except RefNotFoundError:
        return array, None
    except IntegrityError as e:
        return array, e


def _verify_base(ledger: Ledger, model_dir: str | Path | None) -> list[Problem]:
    """Each stored base against the model directory's tensor, bit for bit."""
    directory = ledger.model_dir(model_dir)
    if not directory.is_dir():
        return [Problem(str(directory), "the model directory is gone; the base was not checked against it", "warning")]
    try:
        ledger._check_model_dir(directory, cached=False)  # verify trusts no remembered digest
    except KVWLedgerError as e:
        return [Problem(str(directory), str(e))]
    from safetensors import safe_open

    problems = []
    for name, loc in ledger.locations.items():
        with safe_open(str(directory / loc.file), "pt") as fh:
            original = fh.get_tensor(loc.key)
        try:
            stored = ledger.base(name)
        except KVWLedgerError as e:
            problems.append(Problem(Store.base_path(name), str(e)))
            continue
        if original.shape != stored.shape or not torch.equal(_bits(original), _bits(stored)):
            problems.append(Problem(Store.base_path(name), f"differs from {loc.key} in {loc.file}"))
    return problems

