"""The checks a write makes before it commits: the files it reads, hashed against
their entries, and the staged HEAD held to the stability limits.

A write stages the sum it would commit; nothing is written until these pass (or
``on_fail`` is warn). ``Ledger.forget``, ``revert`` and ``rederive`` call them;
``probe`` registers the probe sets and limits they hold a step to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger import data, weights
from kvw_ledger._fs import hash_files
from kvw_ledger.devices import Placement
from kvw_ledger.errors import BadInputError, IntegrityError, StabilityCheckError
from kvw_ledger.journal import Entry
from kvw_ledger.loading import max_length
from kvw_ledger.replay import LedgerState
from kvw_ledger.stability import (
    StabilityLimits,
    StabilityReport,
    check_attenuation,
    check_exponents,
    check_log_scales,
    check_zeroed,
    compare_probes,
    overflowing,
    probe_metrics,
)
from kvw_ledger.store import Store
from kvw_ledger.weakening import Weakening

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def resolve_limits(ledger: Ledger, state: LedgerState, given: StabilityLimits | None) -> StabilityLimits:
    """``given``, else the defaults overridden by the ledger's limits (set with ``probe``)."""
    if given is not None:
        return given
    unknown = set(state.limits) - set(StabilityLimits.__dataclass_fields__)
    if unknown:
        raise BadInputError(f"unknown stability limit(s): {', '.join(sorted(unknown))}")
    return StabilityLimits(**state.limits)


def limits(ledger: Ledger, given: Mapping[str, Any]) -> StabilityLimits:
    """The body of :meth:`Ledger.limits`, which documents it (``given``: limit -> value or None)."""
    state = ledger.state()
    return StabilityLimits(**{**resolve_limits(ledger, state, None).to_dict(),
                              **{k: v for k, v in given.items() if v is not None}})


def check_reads(
    ledger: Ledger,
    operation: str,
    state: LedgerState,
    *,
    base: bool = True,
    stats: str | None = None,
    traces: Iterable[str] = (),
) -> None:
    """Refuses a write that would read or build on a damaged file.

    Hashes exactly the files this write reads, each against the sha256 its journal
    entry recorded: the base (when ``base``), the retain stats ``stats``, the
    current arrays of the requests active at ``state`` (HEAD is their sum), the C_f
    traces of ``traces``, the probe sets, and the sealed head cache. A full check
    of everything is `verify`'s job; this one costs what the write reads anyway.

    Raises:
        IntegrityError: naming the first damaged file; nothing was written.
    """
    recorded: dict[str, tuple[str, int]] = {}
    deleted: set[str] = set()
    for entry in ledger.entries():
        recorded.update({path: (digest, entry.version) for path, digest in entry.files.items()})
        deleted.update(entry.body.get("deleted_files", []))
    prefixes = [Store.base_path()] if base else []
    if stats is not None:
        prefixes.append(Store.retain_path(stats))
    for request_id in state.active:
        prefixes.append(state.exponent_prefix(request_id))
        if request_id in state.log_scales:
            prefixes.append(state.log_scales[request_id])
    prefixes += [state.traces[r] for r in traces if r in state.traces]
    prefixes += [p["path"].rsplit("/", 1)[0] for p in state.probes.values()]
    wanted = sorted(
        path for path in recorded if path not in deleted and any(path.startswith(f"{x}/") for x in prefixes)
    )
    problems = [(path, why) for path, why in ledger.store.check_head()]
    for path, actual in hash_files(ledger.path, set(wanted)).items():
        expected, version = recorded[path]
        if isinstance(actual, FileNotFoundError):
            problems.append((path, f"is missing; journal/{version:08d}.json recorded it"))
        elif isinstance(actual, OSError):
            problems.append((path, f"cannot be read ({actual.strerror or actual})"))
        elif actual != expected:
            problems.append((path, f"has sha256 {actual[:12]}... but journal/{version:08d}.json recorded {expected[:12]}..."))
    if problems:
        path, why = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise IntegrityError(
            f"{operation} refused: {path} {why}{more}; the ledger is damaged and {operation} "
            f"would build on it. Nothing was written. Run `kvw-ledger verify {ledger.location}` "
            "to list the damage, and restore the file from a backup"
        )


def check_staged(
    ledger: Ledger,
    state: LedgerState,
    weakening: Weakening,
    limits: StabilityLimits,
    *,
    model: Any = None,
    processor: Any = None,
    forget_records: Sequence[data.Record] | None = None,
    forget_label_eos: bool = False,
    model_dir: str | Path | None = None,
    placement: Placement | None = None,
    progress: bool = True,
) -> StabilityReport:
    """Checks a staged HEAD; raises StabilityCheckError on failure unless on_fail is warn.

    ``model`` (when given) already holds the staged weights; ``forget_records``
    are measured as efficacy, never held to a limit.
    """
    report = StabilityReport()
    staged, staged_scales = weakening.exponents, weakening.log_scales
    bad = overflowing(staged)
    if bad is not None:
        raise StabilityCheckError(
            f"the step was not committed: {bad}. Its strength is far too high (a lower --gamma, "
            "fewer --epochs or narrower --layers); such a step is refused even with --on-fail warn"
        )
    report.checks += check_exponents(staged)
    report.checks += check_log_scales(staged_scales)
    axes = {s.name: s.axis for s in ledger.sites}
    bases = {name: ledger.base(name) for name in staged}
    checks, report.attenuation = check_attenuation(bases, weakening, axes, limits.max_attenuation)
    report.checks += checks
    checks, _ = check_zeroed(weakening, limits.max_zeroed, limits.zero_floor)
    report.checks += checks
    if state.probes or forget_records is not None:
        if model is None:
            model, processor = weights.load(ledger, model_dir, 1, placement or Placement.resolve(), progress)
            weights.materialize(ledger, model, weakening)
        # Each probe is encoded as its base figures were measured.
        sets = {kind: (ledger.store.read_probe(p["path"]), labels_eos(p)) for kind, p in state.probes.items()}
        if forget_records is not None:
            sets["forget"] = (list(forget_records), forget_label_eos)
        for kind, (records, label_eos) in sets.items():
            encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
            report.probes[kind] = probe_metrics(model, data.encode_all(encoder, records), encoder.pad_token_id)
        base = {kind: p["base"] for kind, p in state.probes.items()}
        report.checks += compare_probes(report.probes, base, state.probe_figures, limits)
    report.on_fail = limits.on_fail
    if not report.passed and limits.on_fail == "abort":
        failed = "; ".join(c.describe() for c in report.failures())
        raise StabilityCheckError(
            f"the step failed {len(report.failures())} stability check(s) and was not committed: {failed}. "
            "Weaken less (a lower --gamma or narrower --layers for forget), raise the limit, "
            "or pass --on-fail warn to commit anyway"
        )
    return report


def labels_eos(body: Mapping[str, Any]) -> bool:
    """Whether a retain, forget or probe record labelled the eos; entries from before the
    option existed did."""
    return bool(body.get("label_eos", True))


def same_positions(what: str, label_eos: bool, stats_id: str, stats_label_eos: bool) -> None:
    """C_f and C_r must count the same positions, or the accessor compares unlike means."""
    if label_eos != stats_label_eos:
        flag = "with --label-eos" if stats_label_eos else "without --label-eos"
        raise BadInputError(
            f"{what} {'labels' if label_eos else 'does not label'} the eos token, but retain stats "
            f"{stats_id!r} were measured {flag}; use the same setting, or register retain stats "
            "measured with it (`kvw-ledger retain LEDGER DATA --id ID [--label-eos]`)"
        )


def check_limits_type(limits: object) -> None:
    """Limits are one typed value; a mapping (the old form) is refused saying what to pass."""
    if limits is not None and not isinstance(limits, StabilityLimits):
        raise BadInputError(
            f"limits must be a StabilityLimits, not {type(limits).__name__}; pass "
            "ledger.limits(max_attenuation=..., on_fail=...) or StabilityLimits(...)"
        )


def probe(
    ledger: Ledger,
    *,
    retain: str | Path | None = None,
    general: str | Path | None = None,
    limits: StabilityLimits | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Entry:
    """The body of :meth:`Ledger.probe`, which documents it."""
    placement = Placement.resolve(device, dtype)
    sources = {k: v for k, v in (("retain", retain), ("general", general)) if v is not None}
    check_limits_type(limits)
    if not sources and limits is None:
        raise BadInputError(
            "probe has nothing to do; pass --retain FILE, --general FILE or a limit such as "
            "--max-attenuation 0.3"
        )
    for source in sources.values():
        data.read_records(source)  # a bad file fails before the model loads
    with ledger._session("probe") as tx:
        head = ledger.head()
        state = ledger.state(head.version)
        current = resolve_limits(ledger, state, None).to_dict()
        # Only the limits this changes are recorded: replay merges them over earlier ones.
        given = {k: v for k, v in (limits.to_dict() if limits else {}).items() if current[k] != v}
        check_reads(ledger, "probe", state)
        version = head.version + 1
        files: dict[str, str] = {}
        stored: dict[str, dict[str, Any]] = {}
        figures: dict[str, dict[str, float]] = {}
        if sources:
            model, processor = weights.load(ledger, model_dir, 1, placement, progress)
            encoder = data.Encoder(processor, max_length(model))
            for kind, source in sources.items():
                tx.claim(Store.probe_path(version, kind))
                path, written = ledger.store.write_probe(version, kind, source)
                files.update(written)
                records = ledger.store.read_probe(path)
                stored[kind] = {"path": path, "records": len(records), "data_fingerprint": data.fingerprint(records),
                                "label_eos": False}  # absent in older entries: they labelled it
            examples = {k: data.encode_all(encoder, ledger.store.read_probe(v["path"])) for k, v in stored.items()}
            for kind, ex in examples.items():
                stored[kind]["base"] = probe_metrics(model, ex, encoder.pad_token_id)
            ledger.materialize(model, head.version)
            for kind, ex in examples.items():
                figures[kind] = probe_metrics(model, ex, encoder.pad_token_id)
        body = {"probes": stored, "limits": given, "figures": {**state.probe_figures, **figures},
                "active": state.active}
        return tx.commit("probe", body, files, parent=head)
