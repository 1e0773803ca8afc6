"""Re-derivation: recomputing active requests with other retain statistics.

Fast mode rebuilds a request's exponents from its stored per-batch C_f trace and
the new C_r (no forward pass); exact mode re-runs the progressive loop on the model
as re-derived so far. ``rederive`` and ``revert --retain-with`` both write one
``rederived/v<N>/`` group and commit it in their single entry; ``revert`` lives
here for that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger import data, refs, retaining, staging, sums, weights
from kvw_ledger.devices import Placement
from kvw_ledger.errors import BadInputError, RefNotFoundError, RequestStateError
from kvw_ledger.journal import Entry
from kvw_ledger.kvw import KVWConfig, column_log_norms, exponents_from_trace, log_scale, run_kvw
from kvw_ledger.loading import max_length
from kvw_ledger.replay import LedgerState
from kvw_ledger.stability import StabilityLimits
from kvw_ledger.store import Store
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def revert_retain_with(
    ledger: Ledger,
    state: LedgerState,
    head: Entry,
    active: Sequence[str],
    records: Sequence[data.Record],
    retain_id: str | None,
    body: dict[str, Any],
    files: dict[str, str],
    model_dir: str | Path | None,
    placement: Placement,
    progress: bool,
) -> Weakening:
    """The retain stats and re-derivation of ``revert --retain-with``, written into
    ``body`` and ``files``; returns the staged sum."""
    previous = state.latest_retain
    if previous is None:
        raise BadInputError(
            "--retain-with replaces the retain statistics, but none are registered; "
            "revert without it"
        )
    stats_id = refs.check_id(retain_id or f"retain-{head.version + 1}", "retain stats id")
    if stats_id in state.retain_stats:
        raise BadInputError(f"retain stats {stats_id!r} already exist; choose another --retain-id")
    like = state.retain_info[previous]
    label_eos = staging.labels_eos(like)
    for other in active:
        if other not in state.traces:
            raise BadInputError(
                f"request {other!r} has no C_f trace, so it cannot be re-derived fast; revert "
                "without --retain-with, then `kvw-ledger rederive LEDGER --retain-stats ID "
                f"--exact {other}=DATA.jsonl`"
            )
        staging.same_positions(f"request {other!r}", staging.labels_eos(state.requests[other].body), previous, label_eos)
    model, processor = weights.load(ledger, model_dir, like["measured_at"], placement, progress)
    statistic = like.get("statistic", "mean")
    retain_files, retain_body = retaining.measure_retain(ledger, model, processor, records, stats_id, like["measured_at"], like["batch_size"], statistic,
        label_eos, progress,
    )
    del model
    retain_means = ledger.retain_means(stats_id)
    derived = rederive_chain(ledger, state, active, set(active), retain_means, {}, None, None, progress)
    rederived_files, rederived_arrays, changes = write_rederived(ledger, head.version + 1, state, derived, {})
    files.update(retain_files)
    files.update(rederived_files)
    # The registration and the re-derivation, each as its own entry would record it.
    body["retain"] = retain_body
    body["rederived"] = {"stats": stats_id, "requests": changes}
    body["arrays"] = {**retain_body["arrays"], **rederived_arrays}
    return derived.staged


def rederive(
    ledger: Ledger,
    stats_id: str,
    request_ids: Sequence[str] = (),
    *,
    exact: Mapping[str, str | Path] | None = None,
    limits: StabilityLimits | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Entry:
    """The body of :meth:`Ledger.rederive`, which documents it."""
    staging.check_limits_type(limits)
    exact = dict(exact or {})
    placement = Placement.resolve(device, dtype)
    with ledger._session("rederive") as tx:
        head = ledger.head()
        state = ledger.state(head.version)
        if stats_id not in state.retain_stats:
            raise RefNotFoundError(
                f"retain stats {stats_id!r} do not exist in this ledger; register them with "
                "`kvw-ledger retain LEDGER DATA --id ID` (see `kvw-ledger log`)"
            )
        checked = staging.resolve_limits(ledger, state, limits)
        chosen = list(request_ids) or list(state.active)
        if not chosen and not exact:
            raise BadInputError("no request is active; there is nothing to re-derive")
        for request_id in [*chosen, *exact]:
            if request_id not in state.requests:
                raise RequestStateError(f"no request {request_id!r} in this ledger (see `kvw-ledger log`)")
            if request_id not in state.active:
                raise RequestStateError(
                    f"request {request_id!r} is reverted; only active requests are re-derived"
                )
        ordered = [r for r in state.active if r in chosen or r in exact]
        for request_id in ordered:
            if request_id not in exact and request_id not in state.traces:
                raise BadInputError(
                    f"request {request_id!r} has no C_f trace; pass --exact {request_id}=DATA.jsonl"
                )
        staging.check_reads(ledger, "rederive", state, stats=stats_id, traces=[r for r in ordered if r not in exact])
        for request_id in ordered:
            staging.same_positions(f"request {request_id!r}", staging.labels_eos(state.requests[request_id].body),
                            stats_id, staging.labels_eos(state.retain_info[stats_id]))
        retain_means = ledger.retain_means(stats_id)
        exact_records = {r: read_exact(ledger, state, r, path) for r, path in exact.items()}
        model: Any = None
        processor: Any = None
        if exact_records:
            model, processor = weights.load(ledger, model_dir, 1, placement, progress)
        derived = rederive_chain(ledger, state, state.active, set(ordered), retain_means, exact_records, model, processor, progress
        )
        if model is not None:  # it holds the last exact request's loop, not the staged HEAD
            weights.materialize(ledger, model, derived.staged)
        report = staging.check_staged(ledger, state, derived.staged, checked, model=model,
                                    processor=processor, model_dir=model_dir, placement=placement,
                                    progress=progress)
        files, arrays, changes = write_rederived(ledger, head.version + 1, state, derived, exact)
        body = {"stats": stats_id, "requests": changes, "arrays": arrays, "active": state.active,
                "stability": report.to_json()}
        return tx.commit("rederive", body, files, parent=head, weakening=derived.staged)


def rederive_chain(
    ledger: Ledger,
    state: LedgerState,
    chain: Sequence[str],
    redo: set[str],
    retain_means: Mapping[str, torch.Tensor],
    exact_records: Mapping[str, Sequence[data.Record]],
    model: Any,
    processor: Any,
    progress: bool,
) -> Rederived:
    """Re-derives the requests in ``redo`` along ``chain`` (the active requests, in
    order), fast from their traces or exactly (``exact_records``, on ``model``)."""
    derived = Rederived()
    new, new_traces, new_scales = derived.exponents, derived.traces, derived.log_scales
    log_sq: dict[str, torch.Tensor] = {}  # site -> column_log_norms of its base
    # One pass in chain order: ``running`` is the sum of the requests before the
    # current one, as re-derived so far; at the end, the staged HEAD.
    running = Weakening.zero(ledger.sites)
    for request_id in chain:
        if request_id in redo:
            params = KVWConfig.from_dict(state.requests[request_id].body["params"])
            if request_id in exact_records:
                weights.materialize(ledger, model, running)
                encoder = data.Encoder(processor, max_length(model),
                                       label_eos=staging.labels_eos(state.requests[request_id].body))
                result = run_kvw(
                    model, ledger.sites, data.encode_all(encoder, exact_records[request_id]), retain_means,
                    params, pad_token_id=encoder.pad_token_id,
                    base={s.name: ledger.base(s.name) for s in ledger.sites}, start=dict(running.exponents),
                    start_log_scale=dict(running.log_scales), progress=progress,
                )
                new[request_id] = result.exponents
                new_traces[request_id] = result.trace or {}
                if result.log_scales is not None:
                    new_scales[request_id] = result.log_scales
            else:
                traces = {n.rsplit("/", 1)[1]: ledger.store.read_array(n)
                          for n in ledger.store.list_arrays(state.traces[request_id])}
                new[request_id] = {site: exponents_from_trace(t, retain_means[site], params)
                                   for site, t in traces.items()}
                if params.rescale:  # s restores the norm the site had before this request
                    for site in new[request_id]:
                        if site not in log_sq:
                            log_sq[site] = column_log_norms(ledger.base(site), ledger._sites_by_name[site].axis)
                    new_scales[request_id] = {
                        site: log_scale(log_sq[site], running.exponents[site], running.exponents[site] + w)
                        for site, w in new[request_id].items()
                    }
        exps = new[request_id] if request_id in new else ledger.request_exponents(request_id, state)
        scales = (new_scales[request_id] if request_id in new_scales
                  else ledger.request_log_scales(request_id, state))
        running = running + Weakening(exps, scales)
    derived.staged = running
    return derived


def write_rederived(
    ledger, version: int, state: LedgerState, derived: Rederived, exact: Mapping[str, Any]
) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """Writes the re-derived arrays of the entry ``version``: (files, arrays, per-request changes)."""
    top = Store.rederived_path(version)
    ledger._current().claim(top)
    files: dict[str, str] = {}
    arrays: dict[str, str] = {}
    changes: dict[str, Any] = {}

    def write(request_id: str, kind: str, values: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, str]]:
        prefix = Store.rederived_path(version, request_id, kind)
        written, hashes = ledger.store.write_sites(prefix, values)
        files.update(written)
        arrays.update(hashes)
        return prefix, hashes

    def old_hashes(prefix: str) -> dict[str, str]:
        return {n: ledger.store.content_hash(n) for n in ledger.store.list_arrays(prefix)}

    for request_id, exps in derived.exponents.items():
        change: dict[str, Any] = {"mode": "exact" if request_id in exact else "fast"}
        old = old_hashes(state.exponents[request_id])
        change["exponent"], new = write(request_id, "exponent", exps)
        change.update({"old": old, "new": new})
        if request_id in derived.log_scales:
            old_prefix = state.log_scales.get(request_id)
            old_scales = old_hashes(old_prefix) if old_prefix else {}
            change["log_scale"], new_scales = write(request_id, "log_scale", derived.log_scales[request_id])
            change.update({"old_log_scale": old_scales, "new_log_scale": new_scales})
        if derived.traces.get(request_id):
            change["trace"], _ = write(request_id, "trace", derived.traces[request_id])
        changes[request_id] = change
    files.update(ledger.store.group_files(top))
    return files, arrays, changes


def read_exact(ledger: Ledger, state: LedgerState, request_id: str, path: str | Path) -> list[data.Record]:
    records = data.read_records(path)
    recorded = state.requests[request_id].body["data_fingerprint"]
    if data.fingerprint(records) != recorded:
        raise BadInputError(
            f"{path} is not the data request {request_id!r} was applied with (fingerprint differs); "
            "exact re-derivation needs the same records and images"
        )
    return records


@dataclass
class Rederived:
    """What one re-derivation computed, per request (the requests re-derived only)."""

    exponents: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    traces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # exact mode only
    log_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # rescaled ones
    staged: Weakening = field(default_factory=Weakening)  # the chain's sum: the staged HEAD


def revert(
    ledger: Ledger,
    request_id: str,
    *,
    reason: str = "",
    retain_with: str | Path | None = None,
    retain_id: str | None = None,
    limits: StabilityLimits | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Entry:
    """The body of :meth:`Ledger.revert`, which documents it."""
    staging.check_limits_type(limits)
    placement = Placement.resolve(device, dtype)
    records = data.read_records(retain_with) if retain_with is not None else None
    with ledger._session("revert") as tx:
        head = ledger.head()
        state = ledger.state(head.version)
        if request_id not in state.requests:
            raise RequestStateError(
                f"no request {request_id!r} in this ledger (see `kvw-ledger log`)"
            )
        if request_id not in state.active:
            raise RequestStateError(f"request {request_id!r} is already reverted")
        checked = staging.resolve_limits(ledger, state, limits)
        staging.check_reads(ledger, "revert", state)
        active = [r for r in state.active if r != request_id]
        body: dict[str, Any] = {"request": request_id, "reason": reason, "active": active}
        files: dict[str, str] = {}
        if records is None:
            staged = sums.total(ledger, state, active)
        else:
            staged = revert_retain_with(ledger, state, head, active, records, retain_id, body, files, model_dir, placement, progress
            )
        report = staging.check_staged(ledger, state, staged, checked, model_dir=model_dir, placement=placement,
            progress=progress,
        )
        body["stability"] = report.to_json()
        return tx.commit("revert", body, files, parent=head, weakening=staged)
