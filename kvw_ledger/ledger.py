"""The ledger: versioned KVW requests over an immutable base, with a hash-chained journal.

A version is a journal position. The effective value matrix of a site at a version
is ``base * exp(-sum of the active requests' exponents)``, computed in float32 from
the base and cast once, so revert and replay are bit-exact and nothing is ever
divided to undo a request. Requests made with ``rescale`` also keep a per-site
log-scale s, summed like the exponents: the factor is then ``exp(S - W)``.
Every write follows one protocol: take the writer lock, write arrays, append the
journal entry (the commit point), then refresh the head cache (the sum at the newest
version, see :mod:`kvw_ledger.sums`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvw_ledger import (
    collecting,
    creating,
    exporting,
    forgetting,
    model_files,
    rederive,
    refs,
    repair,
    retaining,
    staging,
    sums,
    views,
    weights,
)
from kvw_ledger.devices import Placement
from kvw_ledger.distributed import LOCAL, World
from kvw_ledger.errors import IntegrityError, RequestStateError, TornEntryError
from kvw_ledger.journal import Entry, Journal
from kvw_ledger.kvw import KVWConfig, weakened
from kvw_ledger.loading import DeviceMap
from kvw_ledger.reader import LedgerReader
from kvw_ledger.remote import Remote
from kvw_ledger.replay import LedgerState, RequestInfo, replay
from kvw_ledger.session import WriteSession, open_session
from kvw_ledger.sites import Site
from kvw_ledger.stability import OnFail, StabilityLimits
from kvw_ledger.store import Store
from kvw_ledger.target import TargetSearch
from kvw_ledger.verify import VerifyReport, verify_ledger
from kvw_ledger.weakening import Weakening

__all__ = ["Ledger", "LedgerState", "RequestInfo", "VerifyReport"]


def _utc_now() -> _dt.datetime:
    """The journal's default clock, looked up when a ledger is opened (tests patch it)."""
    return _dt.datetime.now(_dt.UTC)


class Ledger:
    """A ledger directory: open one with :meth:`open`, make one with :meth:`create`."""

    def __init__(self, store: Store, journal: Journal) -> None:
        self.store = store
        self.journal = journal
        self.path = store.path
        attrs = store.attrs
        try:
            self.sites: list[Site] = [Site.from_dict(s) for s in attrs["sites"]]
            self.model_info: dict[str, Any] = dict(attrs["model"])
            self.locations: dict[str, model_files.TensorLocation] = {
                name: model_files.TensorLocation(**loc) for name, loc in attrs["locations"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(
                f"{store.path / 'zarr.json'}: the ledger attributes are malformed ({e!r}); "
                "the ledger is damaged"
            ) from e
        self._sites_by_name = {s.name: s for s in self.sites}

    # --- creating and opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        model_dir: str | Path,
        *,
        towers: str = "language",
        site_glob: str | None = None,
        progress: bool = True,
        clock: Callable[[], _dt.datetime] | None = None,
        device_map: DeviceMap | None = None,
        operator: str | None = None,
    ) -> Ledger:
        """Creates a ledger for the model in ``model_dir`` and commits version 1 (init).

        The base value matrices are copied from the model's weight files, bit-exact.
        ``clock`` stamps journal entries (default: the current UTC time); ``operator``
        names who acts in them (default ``$KVW_LEDGER_OPERATOR``, else user@host). With
        ``device_map`` the model is loaded by accelerate (see :attr:`device_map`).

        Raises:
            LedgerExistsError: ``path`` exists and is not empty.
            UnknownArchitectureError: no FFN value projection was found.
        """
        return creating.create(
            cls, path, model_dir, towers=towers, site_glob=site_glob, progress=progress, clock=clock,
            device_map=device_map, operator=operator,
        )

    @classmethod
    def open(
        cls, path: str | Path, *, clock: Callable[[], _dt.datetime] | None = None, check_root: bool = True
    ) -> Ledger:
        """Opens an existing ledger (readers never lock); ``clock`` stamps new entries.

        With ``check_root`` the root attributes (sites, tensor locations, model
        fingerprint) must be those init recorded; ``verify`` opens without it so that
        it can report the damage instead of stopping at it.

        Raises:
            LedgerNotFoundError: nothing at ``path`` is a ledger.
            FormatVersionError: it was written by a newer kvw-ledger.
        """
        reader = LedgerReader.open(path, clock=clock or _utc_now, check_root=check_root, lock_timeout=cls.lock_timeout)
        ledger = cls(Store(reader.path, reader.attrs), reader.journal)
        if reader.remote is not None:
            ledger.remote = reader.remote
            sums.refresh_head(ledger)
        return ledger

    @property
    def location(self) -> str:
        """Where the ledger lives: its URL, or its directory."""
        return self.remote.url if self.remote is not None else str(self.path)

    # --- reading history ------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every journal entry, in version order.

        When only the newest entry file is torn (not a valid entry), the entries before
        it, with :attr:`torn` set: those versions stay readable by number, while HEAD and
        every write refuse, naming the file (see :meth:`repair`).
        """
        entries, self.torn = self.journal.readable()
        return entries

    torn: TornEntryError | None = None  # set by entries() when the newest entry file is torn

    def head(self) -> Entry:
        """The newest entry."""
        head = self.journal.head()
        if head is None:
            raise IntegrityError(f"{self.path / 'journal'}: the journal is empty")
        return head

    def resolve(self, ref: str | int, entries: Sequence[Entry] | None = None) -> int:
        """Turns a REF (a version number, a request id, ``HEAD`` or ``HEAD~N``) into a version.

        Raises:
            RefNotFoundError: the REF names nothing in this ledger.
        """
        return refs.resolve(ref, list(entries) if entries is not None else self.entries(), self.torn)

    def state(self, at: str | int = "HEAD") -> LedgerState:
        """Replays the journal up to ``at``."""
        entries = self.entries()
        return replay(entries, self.resolve(at, entries))

    def show(self, ref: str | int) -> dict[str, Any]:
        """Version ``ref``: its entry, the files it added and, for a forget, per site what
        its request weakened (the dict ``show --json`` prints; see :func:`views.show`)."""
        return views.show(self.entries(), ref, lambda: self.store)

    def diff(self, ref_a: str | int, ref_b: str | int, *, top: int = 5) -> dict[str, Any]:
        """How version ``ref_b`` differs from ``ref_a``: requests added and removed, and per
        site the exponents that changed (the dict ``diff --json`` prints; see :func:`views.diff`)."""
        entries = self.entries()
        a, b = (replay(entries, self.resolve(ref, entries)) for ref in (ref_a, ref_b))
        return views.diff(self.sites, a, b, self.request_weakening, lambda r, s: sums.scaled_sites(self, r, s), top)

    # --- weights ----------------------------------------------------------------------

    def exponents(self, at: str | int = "HEAD") -> dict[str, torch.Tensor]:
        """Sum of the active requests' exponents per site at ``at`` (float32, CPU).

        At HEAD this is the cached head (one read per site, whatever the number of
        requests); elsewhere the active requests are summed in the order applied.
        """
        return dict(self.sums(at)[1].exponents)

    def log_scales(self, at: str | int = "HEAD") -> dict[str, torch.Tensor]:
        """Sum of the active requests' log-scales per site at ``at`` (float32 scalars, CPU).

        Only sites that an active request made with ``rescale`` weakened are present;
        the others have no scale (the factor is ``exp(-exponent)``).
        """
        return dict(self.sums(at)[1].log_scales)

    def sums(self, at: str | int = "HEAD") -> tuple[int, Weakening]:
        """(version, the active requests' summed :class:`Weakening`) at ``at``.

        ``HEAD`` (or its version number) reads the newest journal entry and the head
        cache only, so its cost does not grow with the number of requests; any other
        REF, or a stale or damaged cache, replays the journal and sums the requests.
        """
        return sums.summed(self, at)

    def request_weakening(self, request_id: str, state: LedgerState | None = None) -> Weakening:
        """One request's current exponents and log-scales (see :meth:`request_exponents`)."""
        return sums.request(self, request_id, state or self.state())

    def request_log_scales(self, request_id: str, state: LedgerState | None = None) -> dict[str, torch.Tensor]:
        """One request's current log-scales per site; empty unless it was made with ``rescale``.

        Raises:
            RefNotFoundError: the request's arrays were deleted by ``gc``.
        """
        return sums.request_log_scales(self, request_id, state or self.state())

    def request_exponents(self, request_id: str, state: LedgerState | None = None) -> dict[str, torch.Tensor]:
        """One request's current exponents per site (sites outside its layers are absent).

        Raises:
            RefNotFoundError: the request's arrays were deleted by ``gc``.
        """
        return sums.request_exponents(self, request_id, state or self.state())

    def base(self, site: str) -> torch.Tensor:
        """The value matrix of ``site`` as first seen (original dtype).

        Within one write each base is read once (it is immutable); the KVW loop and
        the stability checks share it.
        """
        return self._tx.base(site) if self._tx is not None else self.store.read_base(site)

    def effective(self, site: str, weakening: Weakening) -> torch.Tensor:
        """``base * exp(S - W)`` of ``weakening`` for one site, in float32, cast once."""
        return weakened(self.base(site), weakening, site, self._sites_by_name[site].axis)

    def materialize(self, model: nn.Module, at: str | int = "HEAD") -> int:
        """Writes the value matrices of version ``at`` into a live model, from the base.

        Returns:
            The version materialised.
        """
        version, weakening = self.sums(at)
        weights.materialize(self, model, weakening)
        return version

    # --- the model --------------------------------------------------------------------

    def model_dir(self, override: str | Path | None = None) -> Path:
        """The model directory to use: ``override``, else the one given to ``init``."""
        return Path(override if override is not None else self.model_info["dir"]).resolve()

    def load(
        self,
        model_dir: str | Path | None = None,
        at: str | int = "HEAD",
        *,
        progress: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> tuple[nn.Module, Any]:
        """Loads the model (fingerprint checked) materialised at ``at``, and its processor.

        ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, bfloat16, float16,
        float32) say where and how the model is loaded; auto is the first GPU (else the
        CPU) and the model's own dtype. In another dtype than the checkpoint's, the sites
        hold ``base * exp(-w)`` computed in float32 and cast once into that dtype.

        Raises:
            BadInputError: a bad ``device`` or ``dtype`` (see :class:`Placement`).
        """
        return weights.load(self, model_dir, at, Placement.resolve(device, dtype), progress)

    def _check_model_dir(self, directory: Path, progress: bool = True, *, cached: bool = True) -> None:
        """See :func:`kvw_ledger.weights.check_model_dir`."""
        weights.check_model_dir(self, directory, progress, cached=cached)

    # --- verbs that write -------------------------------------------------------------

    def retain(
        self,
        data_path: str | Path,
        *,
        stats_id: str | None = None,
        at: str | int = "HEAD",
        batch_size: int = 1,
        statistic: str = "mean",
        label_eos: bool = False,
        model_dir: str | Path | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        world: World = LOCAL,
    ) -> Entry:
        """Measures retain statistics (C_r per site) on version ``at`` and registers them.

        ``statistic`` is what the accessor compares with (see :mod:`kvw_ledger.retain_stat`):
        the pooled mean (the paper's), or a per-neuron quantile or maximum of batch means
        at ``batch_size``. ``label_eos`` also counts the positions that predict the eos
        or end-of-turn token; requests that use these stats must be made the same way.
        ``device`` and ``dtype`` place the model as :meth:`load` does. Under data
        parallel (``world``) each rank measures its share of every batch and rank 0
        alone commits; every rank returns its entry (or raises its error).
        """
        return retaining.retain(
            self, data_path, stats_id=stats_id, at=at, batch_size=batch_size, statistic=statistic,
            label_eos=label_eos, model_dir=model_dir, progress=progress, device=device, dtype=dtype,
            world=world,
        )

    def forget(
        self,
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
        """Answers one deletion request: KVW on the model at HEAD, checks, then a commit.

        Args:
            limits: the stability limits of this call (default: the ledger's, see
                :meth:`limits`; ``ledger.limits(on_fail="warn")`` changes one of them).
            forget_probe: a JSONL file whose figures are recorded as efficacy.
            device, dtype: where and how the model runs (see :meth:`load`); the stored
                base and exponents do not depend on them.
            world: the data-parallel job this process is a rank of: every rank runs the
                progressive loop on its share of each batch, rank 0 alone checks and
                commits, and every rank returns its entry (or raises its error).
            label_eos: also count the positions that predict the eos (default: as the
                retain statistics were measured, which must agree).
            target: search gamma (from ``config.gamma``) for the smallest that brings the
                forget probe's generation accuracy to ``target.target`` within the
                stability limits, and commit that (see :mod:`kvw_ledger.target`); needs
                ``forget_probe``. The search is recorded in the entry.

        Raises:
            BadInputError: no retain statistics are registered, the id is taken, or
                the data is unusable.
            StabilityCheckError: the staged HEAD failed a check and ``on_fail`` is abort;
                nothing was written.
            TargetNotReachedError: with ``target``, no gamma reached it within the limits;
                nothing was written.
        """
        return forgetting.forget(
            self, data_path, request_id=request_id, reason=reason, config=config,
            retain_stats=retain_stats, limits=limits, forget_probe=forget_probe, label_eos=label_eos,
            target=target, model_dir=model_dir, progress=progress, device=device, dtype=dtype, world=world,
        )

    def revert(
        self,
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
        """Takes one request back; later requests stay. History is appended, never rewritten.

        With ``retain_with`` (a retain set that again holds the withdrawn request's
        data: its person has withdrawn the request, so it is retain data again) the same
        entry also measures and registers retain statistics on it, made as the latest
        registered ones were (statistic, batch size, positions, version measured on),
        and re-derives every other active request fast from its C_f trace with them:
        one commit point, so an interrupted revert leaves nothing.

        Raises:
            RequestStateError: the request does not exist or is not active.
            BadInputError: with ``retain_with``, no retain stats are registered, the id
                is taken, or another active request has no C_f trace.
            StabilityCheckError: the staged HEAD failed a check (on_fail abort).
        """
        return rederive.revert(
            self, request_id, reason=reason, retain_with=retain_with, retain_id=retain_id, limits=limits,
            model_dir=model_dir, progress=progress, device=device, dtype=dtype,
        )

    def probe(
        self,
        *,
        retain: str | Path | None = None,
        general: str | Path | None = None,
        limits: StabilityLimits | None = None,
        model_dir: str | Path | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Entry:
        """Registers probe sets (kept in the ledger) and/or ledger-wide stability limits.

        The probes are measured on the base and on HEAD now; later checks compare
        each staged step with both.
        """
        return staging.probe(
            self, retain=retain, general=general, limits=limits, model_dir=model_dir, progress=progress,
            device=device, dtype=dtype,
        )

    def record_audit(self, body: Mapping[str, Any]) -> Entry:
        """Commits an audit's figures (see :mod:`kvw_ledger.audit`) as an ``audit`` entry.

        It adds no file and changes no weight: the active set and the head cache's
        sums stay those of the version before it.

        Raises:
            RequestStateError: ``body["request"]`` is no request of this ledger.
        """
        with self._session("audit") as tx:
            head = self.head()
            state = self.state(head.version)
            if body.get("request") not in state.requests:
                raise RequestStateError(f"no request {body.get('request')!r} in this ledger")
            _, weakening = self.sums(head.version)
            return tx.commit("audit", {**body, "active": state.active}, {}, parent=head, weakening=weakening)

    def export(
        self,
        out_dir: str | Path,
        *,
        at: str | int = "HEAD",
        model_dir: str | Path | None = None,
        progress: bool = True,
        format: str = "safetensors",
    ) -> int:
        """Writes version ``at`` as a Hugging Face model directory, one shard at a time;
        returns the version exported (``out_dir`` holds it, with its provenance).

        The weight files come from the model directory (fingerprint-checked, so they
        are the base); only the sites' tensors change. No ledger array goes in.

        ``format="peft"`` writes the version instead as a peft IA3 adapter on the
        value projections (``exp(S - W)`` per value vector, see :mod:`kvw_ledger.adapter`),
        to load with ``PeftModel.from_pretrained(base, out_dir)`` on the base model.

        Raises:
            BadInputError: an unknown format, or a site IA3 cannot express (named).
        """
        return exporting.export(self, out_dir, at=at, model_dir=model_dir, progress=progress, format=format)

    def tensor_hashes(
        self, at: str | int = "HEAD", *, model_dir: str | Path | None = None, progress: bool = True
    ) -> dict[str, str]:
        """sha256 of every weight tensor that ``export(at=...)`` writes, by checkpoint key.

        Computed as the export computes them (the same transform of the same checkpoint
        tensors), one tensor at a time, without writing an export: each hash is of the
        tensor's raw bytes, which a safetensors file stores as they are.
        """
        return exporting.tensor_hashes(self, at, model_dir=model_dir, progress=progress)

    def rederive(
        self,
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
        """Recomputes requests with other retain statistics, as one atomic entry.

        Requests (default: every active one) are re-derived in chain order. Fast mode
        uses each request's stored per-batch C_f trace with the new C_r, no forward
        pass; a request in ``exact`` (id -> its forget data) re-runs the progressive
        loop on the model as re-derived so far, and its data must be the data it was
        applied with.

        Raises:
            RequestStateError: a named request is not active.
            BadInputError: a request has no trace and no exact data, or exact data
                differs from the recorded fingerprint.
        """
        return rederive.rederive(
            self, stats_id, request_ids, exact=exact, limits=limits, model_dir=model_dir,
            progress=progress, device=device, dtype=dtype,
        )

    def retain_means(self, stats_id: str) -> dict[str, torch.Tensor]:
        """The registered retain statistic ``stats_id``, per site."""
        return self.store.read_sites(Store.retain_path(stats_id), [s.name for s in self.sites])

    def gc(self, *, reverted: bool = True) -> Entry:
        """Deletes the arrays (exponents and traces) of reverted requests.

        The journal keeps tombstones: every entry still names the deleted files and
        their hashes, and this entry lists them, so ``verify`` still passes. Versions
        at which a deleted request was active can no longer be rebuilt.
        """
        return collecting.gc(self, reverted=reverted)

    def repair(self) -> dict[str, Any]:
        """Moves a torn newest journal entry aside, with a record of what was done.

        Acts only when the newest entry file is not a valid entry: it goes, with the
        arrays no remaining entry names (what that write added), into
        ``repair/<time>-v<version>/`` beside a ``record.json``; the head cache is rebuilt
        for the version before it. A valid newest entry is never touched.

        Returns:
            The record (``{"repaired": False, ...}`` when there was nothing to repair).

        Raises:
            IntegrityError: some other entry is damaged or missing, which repair never
                changes; the message names it.
            BadInputError: a URL ledger (repair its mirror's source by hand).
        """
        return repair.repair(self)

    # --- verification -----------------------------------------------------------------

    def verify(self, *, model_dir: str | Path | None = None, check_model: bool = True) -> VerifyReport:
        """Re-hashes the chain, every file and array, the head cache and the base.

        Arrays and files that no entry names (left by a crash) are warnings.
        """
        return verify_ledger(self, model_dir, check_model)

    # --- internals --------------------------------------------------------------------

    def limits(
        self,
        *,
        max_attenuation: float | None = None,
        max_retain_drop: float | None = None,
        max_nll_increase: float | None = None,
        max_zeroed: float | None = None,
        zero_floor: float | None = None,
        on_fail: OnFail | None = None,
    ) -> StabilityLimits:
        """The ledger's stability limits at HEAD (the defaults, then those registered with
        :meth:`probe`), with the limits given here in their place.

        ``ledger.forget(data, limits=ledger.limits(on_fail="warn"))`` keeps every other
        limit the ledger has.

        Raises:
            BadInputError: a limit is out of range.
        """
        return staging.limits(self, {
            "max_attenuation": max_attenuation, "max_retain_drop": max_retain_drop, "max_nll_increase": max_nll_increase,
            "max_zeroed": max_zeroed, "zero_floor": zero_floor, "on_fail": on_fail,
        })

    def _session(self, operation: str) -> contextlib.AbstractContextManager[WriteSession]:
        """One write (see :mod:`kvw_ledger.session`): ``with self._session(op) as tx``."""
        return open_session(self, operation)

    def _current(self) -> WriteSession:
        """The write this handle has open (a verb's helpers run inside one)."""
        if self._tx is None:
            raise RuntimeError("no write is open on this ledger")
        return self._tx

    lock_timeout: float = 600.0  # seconds a writer waits for another writer to finish
    device_map: DeviceMap | None = None  # how load() places the model (accelerate); None: the CPU
    offload_folder: str | None = None  # where load() offloads layers mapped to "disk" (None: a temp dir)
    operator: str | None = None  # who this handle's writes name; None: journal.default_operator()
    # The CLI sets this: a process that exits right after its write keeps holding Ctrl-C
    # once the write has committed, so nothing can turn a committed write into exit 130.
    hold_interrupts_after_commit: bool = False
    remote: Remote | None = None  # set when the ledger lives at a URL; self.path is then its mirror
    on_wait: Callable[[str], None] | None = None
    _tx: WriteSession | None = None  # the write open on this handle, while one is

    on_stale: Callable[[str], None] | None = None
    on_warning: Callable[[str], None] | None = None  # told what a verb noticed but went on with

    def _on_stale(self, message: str) -> None:
        if self.on_stale is not None:
            self.on_stale(message)

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
