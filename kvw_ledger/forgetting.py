"""``forget``: one deletion request answered on the model at HEAD (KVW, the staged
checks, the commit), and ``--target-forget``'s trials of gamma on the loaded model,
each from HEAD (the search itself is :mod:`kvw_ledger.target`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kvw_ledger import data, refs, session, staging, weights
from kvw_ledger.devices import Placement
from kvw_ledger.distributed import LOCAL, World
from kvw_ledger.errors import BadInputError, RefNotFoundError
from kvw_ledger.journal import Entry
from kvw_ledger.kvw import KVWConfig, run_kvw
from kvw_ledger.loading import max_length
from kvw_ledger.replay import LedgerState
from kvw_ledger.sites import site_weight
from kvw_ledger.stability import StabilityLimits
from kvw_ledger.store import Store
from kvw_ledger.target import TargetSearch, Trial, search
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def search_gamma(
    ledger: Ledger,
    state: LedgerState,
    model: Any,
    processor: Any,
    config: KVWConfig,
    spec: TargetSearch,
    forget_probe: str | Path,
    limits: StabilityLimits,
    weaken: Callable[[KVWConfig], Any],
    staged_sums: Callable[[Any], Weakening],
    start: Weakening,
    progress: bool,
) -> tuple[KVWConfig, Any, dict[str, Any]]:
    """``forget --target-forget``: trials on the loaded model, each from HEAD; returns the
    chosen config, its result (the model left holding it) and the search's record."""
    from kvw_ledger.evaluate import evaluate_split  # generation: only this search needs it

    results: dict[float, Any] = {}
    warn = dataclasses.replace(limits, on_fail="warn")

    def trial(gamma: float) -> Trial:
        weights.materialize(ledger, model, start)  # each trial starts at HEAD
        candidate = dataclasses.replace(config, gamma=gamma)
        result = weaken(candidate)
        figures = evaluate_split(model, processor, forget_probe, multiple_choice=False)
        accuracy = max(f["gen_acc"] for f in figures.values())  # the worst modality
        report = staging.check_staged(ledger, state, staged_sums(result), warn, model=model,
                                    processor=processor, progress=progress)
        failed = [c.describe() for c in report.failures()]
        results.clear()  # only the newest is kept: a trace per trial could be large
        results[gamma] = result
        return Trial(gamma, accuracy, report.passed, failed)

    chosen, trials = search(trial, config.gamma, spec)
    if chosen.gamma not in results:  # a later trial replaced it: weaken once more
        weights.materialize(ledger, model, start)
        results[chosen.gamma] = weaken(dataclasses.replace(config, gamma=chosen.gamma))
    record = {
        "forget_acc": spec.target,
        "metric": "greedy generation accuracy on the forget probe, worst modality",
        "probe_fingerprint": data.fingerprint(data.read_records(forget_probe)),
        "chosen_gamma": chosen.gamma,
        "trials": [t.to_json() for t in trials],
    }
    return dataclasses.replace(config, gamma=chosen.gamma), results[chosen.gamma], record


def forget(
    ledger: Ledger,
    data_path: str | Path,
    *,
    request_id: str | None = None,
    reason: str = "",
    config: KVWConfig | None = None,
    retain_stats: str | None = None,
    limits: StabilityLimits | None = None,
    forget_probe: str | Path | None = None,
    label_eos: bool | None = None,
    target: TargetSearch | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    world: World = LOCAL,
) -> Entry:
    """The body of :meth:`Ledger.forget`, which documents it."""
    staging.check_limits_type(limits)
    config = config or KVWConfig()
    placement = Placement.resolve(weights.rank_device(device, world), dtype)
    if target is not None and forget_probe is None:
        raise BadInputError("--target-forget needs --forget-probe FILE, the records it measures")
    if target is not None and world.parallel:
        raise BadInputError("--target-forget searches in one process; under torchrun give --gamma")
    progress = progress and world.is_main
    records = world.call(data.read_records, data_path)
    probe_records = world.call(data.read_records, forget_probe) if forget_probe is not None else None
    with session.parallel_write(ledger, "forget", world) as write:
        head = write.head
        state = ledger.state(head.version)
        checked = staging.resolve_limits(ledger, state, limits)  # bad limits fail before the forward passes
        request_id = refs.check_request_id(f"request-{head.version + 1}" if request_id is None else request_id)
        if request_id in state.requests:
            raise BadInputError(f"request {request_id!r} already exists; choose another --id")
        stats_id = retain_stats or state.latest_retain
        if stats_id is None:
            raise BadInputError(
                "no retain statistics are registered; run `kvw-ledger retain LEDGER RETAIN.jsonl` first"
            )
        if stats_id not in state.retain_stats:
            raise RefNotFoundError(f"retain stats {stats_id!r} do not exist in this ledger")
        staging.check_reads(ledger, "forget", state, stats=stats_id)
        stats_label_eos = staging.labels_eos(state.retain_info[stats_id])
        label_eos = stats_label_eos if label_eos is None else label_eos
        staging.same_positions("the request", label_eos, stats_id, stats_label_eos)
        retain_means = ledger.retain_means(stats_id)
        fingerprint = data.fingerprint(records)
        same = [r for r in state.active if state.requests[r].body.get("data_fingerprint") == fingerprint]
        if same and world.is_main:
            ledger._warn(
                f"{data_path} holds the same records as active request {same[0]!r} "
                f"(data fingerprint {fingerprint[:12]}...); forgetting it again weakens the same "
                "vectors further. The match is recorded in the entry"
            )
        model, processor = weights.load(ledger, model_dir, head.version, placement, progress)
        encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
        examples = data.encode_all(encoder, records)
        _, start = ledger.sums(head.version)
        tx = ledger._tx  # None on the ranks of a data-parallel job that do not write
        if tx is not None and start.is_zero() and weights.holds_base_dtype(ledger, model):
            # Nothing active: load() left the checked files' weights, the bases bit for
            # bit. Copying them spares decompressing every base from the store.
            tx.bases.update(
                {s.name: site_weight(model, s).detach().to("cpu", copy=True) for s in ledger.sites}
            )
        write.ready()
        bases = {s.name: ledger.base(s.name) for s in ledger.sites}

        def weaken(config: KVWConfig) -> Any:
            return run_kvw(
                model, ledger.sites, examples, retain_means, config, pad_token_id=encoder.pad_token_id,
                base=bases, start=dict(start.exponents), start_log_scale=dict(start.log_scales),
                progress=progress, world=world,
            )

        def staged_sums(result: Any) -> Weakening:
            return start + Weakening(result.exponents, result.log_scales or {})

        searched: dict[str, Any] | None = None
        if target is None:
            result = weaken(config)
        else:
            config, result, searched = search_gamma(ledger, state, model, processor, config, target, cast(Path, forget_probe), checked, weaken, staged_sums,
                start, progress,
            )
        if not world.is_main:
            return session.entry_at(ledger, write.finish())
        staged = staged_sums(result)
        report = staging.check_staged(ledger, state, staged, checked, model=model, processor=processor,
            forget_records=probe_records, forget_label_eos=label_eos, placement=placement, progress=progress,
        )
        tx = ledger._current()
        tx.claim(Store.request_path(request_id))
        files, arrays = {}, {}
        for kind, written in (
            ("exponent", result.exponents), ("trace", result.trace or {}), ("log_scale", result.log_scales or {})
        ):
            kind_files, kind_arrays = ledger.store.write_sites(Store.request_path(request_id, kind), written)
            files.update(kind_files)
            arrays.update(kind_arrays)
        files.update(ledger.store.group_files(Store.request_path(request_id)))
        active = [*state.active, request_id]
        body = {
            "request": request_id,
            "reason": reason,
            "params": config.to_dict(),
            "retain_stats": stats_id,
            "data_fingerprint": fingerprint,
            **({"same_data_as": same} if same else {}),
            "label_eos": label_eos,  # absent in older entries: they labelled it
            "records": len(records),
            "batches": result.n_batches,
            "tokens": result.n_tokens,
            "arrays": arrays,
            "active": active,
            "stability": report.to_json(),
        }
        if searched is not None:
            body["target"] = searched
        return tx.commit("forget", body, files, parent=head, weakening=staged)
