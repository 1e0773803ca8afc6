"""Journal replay: what is true at a version, found by applying its entries in order.

A :class:`LedgerState` is built from the entries alone (no array is read). Every
reader that walks versions (``history``, the demo, ``diff``, ``verify``) applies
the journal once with :func:`states` instead of replaying it from the start for
each version.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvw_ledger.bodies import (
    ForgetBody,
    GcBody,
    ProbeBody,
    RederiveBody,
    RetainBody,
    RevertBody,
    parse,
)
from kvw_ledger.journal import Entry
from kvw_ledger.layout import rederived_path, request_path

__all__ = ["LedgerState", "RequestInfo", "apply", "replay", "request_prefixes", "states"]


@dataclass(frozen=True)
class RequestInfo:
    """One deletion request as the journal records it."""

    id: str
    version: int  # the entry that applied it
    body: Mapping[str, Any]


@dataclass
class LedgerState:
    """What is true at one version, found by replaying the journal up to it."""

    version: int
    active: list[str] = field(default_factory=list)  # request ids, in the order applied
    requests: dict[str, RequestInfo] = field(default_factory=dict)  # every request so far
    reverted: set[str] = field(default_factory=set)
    retain_stats: dict[str, int] = field(default_factory=dict)  # stats id -> version
    retain_info: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # stats id -> its entry body
    latest_retain: str | None = None
    exponents: dict[str, str] = field(default_factory=dict)  # request -> prefix of its current exponent arrays
    traces: dict[str, str] = field(default_factory=dict)  # request -> prefix of its current C_f traces
    log_scales: dict[str, str] = field(default_factory=dict)  # request -> prefix of its log-scales (rescale only)
    deleted: dict[str, int] = field(default_factory=dict)  # request -> version of the gc that deleted it
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> stored probe set
    limits: dict[str, Any] = field(default_factory=dict)  # ledger-wide stability limits
    probe_figures: dict[str, dict[str, float]] = field(default_factory=dict)  # latest measured

    def exponent_prefix(self, request_id: str) -> str:
        """Where the current exponents of ``request_id`` are (its own, or a re-derivation's)."""
        return self.exponents.get(request_id, request_path(request_id, "exponent"))


def replay(entries: Sequence[Entry], version: int) -> LedgerState:
    """The state after the first ``version`` entries."""
    state = LedgerState(version)
    for entry in entries[:version]:
        apply(state, entry)
    return state


def states(entries: Sequence[Entry]) -> Iterator[tuple[Entry, LedgerState]]:
    """Each entry with the state after it, in one pass (O(N) for N versions).

    The state is one object advanced in place: a caller that keeps a version's
    figures copies them before the next step.
    """
    state = LedgerState(0)
    for entry in entries:
        apply(state, entry)
        yield entry, state


def apply(state: LedgerState, entry: Entry) -> None:
    """Advances a replay by one entry."""
    body = parse(entry)
    state.version = entry.version
    if isinstance(body, RetainBody):
        _register(state, body, entry.version)
    elif isinstance(body, ForgetBody):
        request_id = body.request
        state.requests[request_id] = RequestInfo(request_id, entry.version, body.raw)
        state.active.append(request_id)
        state.exponents[request_id] = request_path(request_id, "exponent")
        for kind, held in (("trace", state.traces), ("log_scale", state.log_scales)):
            prefix = request_path(request_id, kind)
            if any(name.startswith(f"{prefix}/") for name in body.arrays):
                held[request_id] = prefix
    elif isinstance(body, RevertBody):
        if body.request in state.active:
            state.active.remove(body.request)
        state.reverted.add(body.request)
        if body.retain is not None:  # revert --retain-with: retain stats registered in the same entry
            _register(state, body.retain, entry.version)
        _apply_rederived(state, body.rederived)
    elif isinstance(body, RederiveBody):
        _apply_rederived(state, body.requests)
    elif isinstance(body, GcBody):
        for request_id in body.deleted:
            state.deleted[request_id] = entry.version
    elif isinstance(body, ProbeBody):
        state.probes.update(body.probes)
        state.limits.update(body.limits)
    figures = body.figures
    if figures:
        state.probe_figures = dict(figures)


def _register(state: LedgerState, body: RetainBody, version: int) -> None:
    """Retain stats registered at ``version`` (a retain, or a revert --retain-with)."""
    state.retain_stats[body.stats] = version
    state.retain_info[body.stats] = body.raw
    state.latest_retain = body.stats


def _apply_rederived(state: LedgerState, changes: Mapping[str, Any]) -> None:
    """Points each re-derived request at its new arrays (a rederive, or a revert --retain-with)."""
    for request_id, change in changes.items():
        state.exponents[request_id] = change["exponent"]
        if change.get("trace"):
            state.traces[request_id] = change["trace"]
        if change.get("log_scale"):
            state.log_scales[request_id] = change["log_scale"]


def request_prefixes(request_id: str, entries: Sequence[Entry]) -> list[str]:
    """Every store prefix holding arrays of one request: its own, and each re-derivation's."""
    prefixes = [request_path(request_id)]
    for entry in entries:
        changes = entry.body["requests"] if entry.op == "rederive" else entry.body.get("rederived", {}).get("requests", {})
        if entry.op in ("rederive", "revert") and request_id in changes:
            prefixes.append(rederived_path(entry.version, request_id))
    return prefixes
