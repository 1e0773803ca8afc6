"""``verify``: the chain, every file and array, the head cache and the base, re-checked.

Every array is read once. The arrays the head cache is the sum of (the current
exponents and log-scales of the requests active at its version) are read per site
in chain order, hashed against their entries and summed as they are read, so
checking the head costs no second read of the request arrays; the others are
hashed on their own. Both run on threads (sha256 and the codecs release the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger._codec import Digests
from kvw_ledger.errors import IntegrityError, KVWLedgerError, RefNotFoundError
from kvw_ledger.journal import Entry, Problem, hash_files, hash_workers
from kvw_ledger.model_files import raw_bits as _bits
from kvw_ledger.replay import LedgerState, apply, replay
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
        entries = ledger.entries()
    except IntegrityError as e:
        return VerifyReport([*ledger.journal.verify(ledger.path), Problem("journal", str(e))], 0, 0)
    # The head and base checks trust the sites and locations in the root zarr.json,
    # so it is checked first; the journal's check below reports it in its own words.
    digests: Digests = dict(hash_files(ledger.path, {"zarr.json"}))
    trusted = all(e.files["zarr.json"] == digests["zarr.json"] for e in entries if "zarr.json" in e.files)
    head = _HeadSum(ledger, entries if trusted else [])
    # Every array is decoded from the same bytes its files are hashed from, once.
    contents = head.hash_and_sum({a for e in entries for a in e.body.get("arrays", {})}, digests)
    problems = list(ledger.journal.verify(ledger.path, digests=digests))
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
    for path in ledger.store.files():
        if path not in named and not path.startswith("head/"):
            problems.append(
                Problem(path, "no journal entry names this file (left by an interrupted write)", "warning")
            )
    if check_model and trusted:
        problems.extend(_verify_base(ledger, model_dir))
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
        try:
            self._plan(replay(entries, version))
        except KVWLedgerError as e:  # a damaged group of a request's arrays, also reported by name
            self.missing = e
            self.chains, self.scale_chains = {}, {}

    def _plan(self, at: LedgerState) -> None:
        """Which arrays, in which order, sum to the head at ``at`` (as ``Ledger.sums`` reads them)."""
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

    def hash_and_sum(self, arrays: set[str], digests: Digests) -> dict[str, _Hash]:
        """Each of ``arrays``' content hash; the head's sums are computed on the way, and
        every file read is hashed into ``digests``."""
        hashes: dict[str, _Hash] = {}
        alone = set(arrays) - {n for c in (*self.chains.values(), *self.scale_chains.values()) for n in c}

        def batch(some: list[str]) -> None:
            for array in some:
                hashes[array] = _read_hash(self.store, array, digests)[1]

        def chain(site: str, names: list[str], sums: dict[str, torch.Tensor | KVWLedgerError], zero: torch.Tensor) -> None:
            total = zero
            for name in names:
                try:
                    value, digest = self.store.read_hashed(name, digests=digests)
                except KVWLedgerError as e:
                    sums[site] = e
                    if name in arrays:
                        hashes[name] = e if isinstance(e, IntegrityError) else None
                    for rest in names[names.index(name) + 1 :]:
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

        with ThreadPoolExecutor(max_workers=hash_workers()) as pool:
            # Batches, not a task per array: at 50,000 small arrays the futures cost seconds.
            ordered = sorted(alone)
            futures = [pool.submit(batch, ordered[i : i + 64]) for i in range(0, len(ordered), 64)]
            sites = {s.name: s for s in self.ledger.sites}
            for site, names in self.chains.items():
                n = sites[site].n_vectors if site in sites else 0
                futures.append(pool.submit(chain, site, names, self.sums, torch.zeros(n, dtype=torch.float32)))
            for site, names in self.scale_chains.items():
                futures.append(
                    pool.submit(chain, site, names, self.scale_sums, torch.zeros((), dtype=torch.float32))
                )
            for f in futures:
                f.result()
        for array in arrays:
            hashes.setdefault(array, None)
        return hashes

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

