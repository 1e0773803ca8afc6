"""The summed :class:`Weakening` at a version: the head cache when it stands for HEAD,
else the active requests' arrays read and added in chain order.

The head cache keeps HEAD's sum so that reading HEAD costs one read per site,
whatever the number of requests; it is trusted only while its version and entry
hash are the newest entry's, and a damaged one is only slower (``verify`` reports
it). Every other version is replayed from the journal and summed from zero, in the
order the requests were applied, so the bits are those the head cache holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvw_ledger import refs
from kvw_ledger.errors import IntegrityError, RefNotFoundError, TornEntryError
from kvw_ledger.journal import Entry
from kvw_ledger.lock import WriterLock
from kvw_ledger.replay import LedgerState
from kvw_ledger.store import HeadCache
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def summed(ledger: Ledger, at: str | int) -> tuple[int, Weakening]:
    """The body of :meth:`Ledger.sums`, which documents it."""
    try:
        head: Entry | None = ledger.head()
    except TornEntryError:
        head = None  # older versions replay from the valid entries; HEAD refuses in resolve()
    if head is not None and refs.names_version(at, head.version):
        cached = head_cache(ledger, head)
        if cached is not None:
            return head.version, cached.weakening
    state = ledger.state(at)
    if head is not None and state.version == head.version and not refs.names_version(at, head.version):
        cached = head_cache(ledger, head)  # a request id that names HEAD
        if cached is not None:
            return state.version, cached.weakening
    return state.version, total(ledger, state)


def head_cache(ledger: Ledger, head: Entry) -> HeadCache | None:
    """The head cache if it stands for ``head`` (same version and entry hash)."""
    try:
        cached = ledger.store.read_head_cache()
    except IntegrityError:
        return None  # a damaged cache is only slower: `verify` reports it
    if cached is None or cached.version != head.version or cached.digest != head.hash:
        return None
    return cached


def write_head(ledger: Ledger, entry: Entry, weakening: Weakening | None = None) -> None:
    """Caches the sum at ``entry``: the one given (from a staged step), else replayed."""
    if weakening is None:
        weakening = total(ledger, ledger.state(entry.version))
    ledger.store.write_head(weakening, entry.version, entry.hash)


def refresh_head(ledger: Ledger) -> None:
    """Rebuilds a mirror's head cache when a pull moved HEAD past it."""
    head = ledger.head()
    if head_cache(ledger, head) is None:
        with WriterLock(ledger.path, operation="head").holding(ledger.lock_timeout, ledger.on_wait):
            if head_cache(ledger, ledger.head()) is None:
                write_head(ledger, ledger.head())


def total(ledger: Ledger, state: LedgerState, active: Sequence[str] | None = None) -> Weakening:
    """Sums the current arrays of ``active`` (default: the state's) in chain order."""
    chain = state.active if active is None else active
    return Weakening.total(ledger.sites, (request(ledger, r, state) for r in chain))


def request(ledger: Ledger, request_id: str, state: LedgerState) -> Weakening:
    """One request's current exponents and log-scales at ``state``."""
    return Weakening(request_exponents(ledger, request_id, state), request_log_scales(ledger, request_id, state))


def request_exponents(ledger: Ledger, request_id: str, state: LedgerState) -> dict[str, torch.Tensor]:
    """The body of :meth:`Ledger.request_exponents`, which documents it."""
    return _arrays(ledger, state.exponent_prefix(request_id), request_id, "exponents")


def request_log_scales(ledger: Ledger, request_id: str, state: LedgerState) -> dict[str, torch.Tensor]:
    """The body of :meth:`Ledger.request_log_scales`, which documents it."""
    prefix = state.log_scales.get(request_id)
    return {} if prefix is None else _arrays(ledger, prefix, request_id, "log-scales")


def scaled_sites(ledger: Ledger, request_id: str, state: LedgerState) -> set[str]:
    """The sites ``request_id`` holds a log-scale for at ``state`` (listed, not read)."""
    prefix = state.log_scales.get(request_id)
    return set() if prefix is None else {n.rsplit("/", 1)[1] for n in ledger.store.list_arrays(prefix)}


def _arrays(ledger: Ledger, prefix: str, request_id: str, what: str) -> dict[str, torch.Tensor]:
    """site -> array for every array under ``prefix`` (one request's ``what``)."""
    arrays = ledger.store.read_sites(prefix)
    if not arrays:
        raise RefNotFoundError(
            f"the {what} of request {request_id!r} are gone (deleted by gc, or never written); "
            "versions where it was active can no longer be rebuilt"
        )
    return arrays
