"""The ledger: versioned KVW requests over an immutable base, with a hash-chained journal.

A version is a journal position. The effective value matrix of a site at a version
is ``base * exp(-sum of the active requests' exponents)``, computed in float32 from
the base and cast once, so revert and replay are bit-exact and nothing is ever
divided to undo a request. Requests made with ``rescale`` also keep a per-site
log-scale s, summed like the exponents: the factor is then ``exp(S - W)``.
Every write follows one protocol: take the writer lock,
write arrays, append the journal entry (the commit point), then refresh the head
cache (the sum of active exponents at the newest version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from kvw_ledger import coefficients, data, model_files, probes, refs, retain_stat, views
from kvw_ledger.devices import Placement
from kvw_ledger.distributed import LOCAL, Step, World, is_shared
from kvw_ledger.errors import (
    BadInputError,
    IntegrityError,
    KVWLedgerError,
    LedgerExistsError,
    ModelMismatchError,
    RefNotFoundError,
    RequestStateError,
    StabilityCheckError,
    StorageError,
    TornEntryError,
)
from kvw_ledger.export import export_model
from kvw_ledger.fingerprint_cache import CACHE_NAME, FingerprintCache
from kvw_ledger.interrupts import InterruptGuard
from kvw_ledger.journal import (
    Entry,
    Journal,
    Problem,
    canonical_json,
    check_operator,
    default_operator,
    fsync_dir,
    hash_files,
    hash_workers,
)
from kvw_ledger.kvw import (
    KVWConfig,
    column_log_norms,
    exponents_from_trace,
    log_scale,
    run_kvw,
    weakened,
)
from kvw_ledger.loading import DeviceMap, load_model, load_processor, max_length
from kvw_ledger.lock import WriterLock, acquire_within, held_within
from kvw_ledger.reader import LedgerReader
from kvw_ledger.remote import Remote, is_url, local_path, mirror_dir
from kvw_ledger.sites import Site, discover_sites, site_weight
from kvw_ledger.stability import (
    OnFail,
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
from kvw_ledger.store import HeadCache, Store, check_id
from kvw_ledger.target import TargetSearch, Trial, search

__all__ = ["Ledger", "LedgerState", "RequestInfo", "VerifyReport"]

EXPORT_FORMATS = ("safetensors", "peft")  # export: a full model directory, or a peft IA3 adapter
_PER_WRITE_GROUPS = ("requests", "retain", "rederived", "probes")  # a write adds one child to one


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
        if is_url(path):
            return cls._create_remote(
                str(path), model_dir, towers=towers, site_glob=site_glob, progress=progress, clock=clock,
                device_map=device_map,
                operator=operator,
            )
        path = local_path(path)
        if operator is not None:
            check_operator(operator)  # before the model is read
        model_dir = Path(model_dir).resolve()
        model_files.weight_files(model_dir)  # refuses pickle-only weights, saying how to convert
        model = load_model(model_dir, progress=progress, device_map=device_map)
        sites = discover_sites(model, towers, site_glob)
        wanted = {s.name: site_weight(model, s) for s in sites}
        locations = model_files.locate_tensors(model_dir, wanted)
        fingerprint = model_files.fingerprint(model_dir, progress)
        attrs: dict[str, Any] = {
            "model": {
                "dir": str(model_dir),
                "fingerprint": fingerprint,
                "model_type": str(getattr(model.config, "model_type", "")),
                "class": type(model).__name__,
            },
            "towers": towers,
            "site_glob": site_glob,
            "sites": [s.to_dict() for s in sites],
            "locations": {n: {"file": loc.file, "key": loc.key} for n, loc in locations.items()},
        }
        store = Store.create(Path(path), attrs)
        ledger = cls(store, Journal(store.path, clock=clock or _utc_now))
        ledger.operator = operator
        try:
            with WriterLock(store.path, operation="init"):
                files = {"zarr.json": _sha256(store.path / "zarr.json")}
                hashes = {}
                for site in sites:
                    record = store.write_array(f"base/{site.name}", wanted[site.name].detach().cpu())
                    files.update(record.files)
                    hashes[site.name] = record.sha256
                files.update(store.group_files("base"))
                body = {
                    "model_type": attrs["model"]["model_type"],
                    "model_fingerprint": fingerprint,
                    "sites": len(sites),
                    "arrays": {f"base/{n}": h for n, h in hashes.items()},
                    "active": [],
                }
                entry = ledger.journal.append("init", body, files, parent=None, operator=operator)
                ledger._write_head(entry)
        except BaseException as e:
            # The directory is ours (create refuses existing ones): leave nothing half made.
            shutil.rmtree(store.path, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, KVWLedgerError):
                raise StorageError(f"could not write the ledger at {store.path} ({e.strerror or e})") from e
            raise
        del model
        return ledger

    @classmethod
    def _create_remote(cls, url: str, model_dir: str | Path, **options: Any) -> Ledger:
        """``create`` at a URL: made in a fresh mirror, then published under the URL's lock."""
        remote = Remote(url)
        if remote.exists():
            raise LedgerExistsError(f"{remote.url} already holds a ledger; choose a new URL for the ledger")
        mirror = mirror_dir(remote.url)
        shutil.rmtree(mirror, ignore_errors=True)  # a mirror of a ledger no longer at the URL
        ledger = cls.create(mirror, model_dir, **options)
        try:
            with remote.lock("init"):
                if remote.versions():
                    raise LedgerExistsError(f"another writer created a ledger at {remote.url} first")
                remote.push(mirror, options.get("progress", True))
        except BaseException:
            shutil.rmtree(mirror, ignore_errors=True)
            raise
        ledger.remote = remote
        return ledger

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
        reader = LedgerReader.open(
            path, clock=clock or _utc_now, check_root=check_root, lock_timeout=cls.lock_timeout
        )
        ledger = cls(Store(reader.path, reader.attrs), reader.journal)
        if reader.remote is not None:
            ledger.remote = reader.remote
            ledger._refresh_head()
        return ledger

    @property
    def location(self) -> str:
        """Where the ledger lives: its URL, or its directory."""
        return self.remote.url if self.remote is not None else str(self.path)

    def _refresh_head(self) -> None:
        """Rebuilds a mirror's head cache when a pull moved HEAD past it."""
        head = self.head()
        if self._head_cache(head) is None:
            with held_within(WriterLock(self.path, operation="head"), self.lock_timeout, self.on_wait):
                if self._head_cache(self.head()) is None:
                    self._write_head(self.head())

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
        version = self.resolve(at, entries)
        state = LedgerState(version)
        for entry in entries[:version]:
            _apply(state, entry)
        return state

    def show(self, ref: str | int) -> dict[str, Any]:
        """Version ``ref``: its entry, the files it added and, for a forget, per site what
        its request weakened (the dict ``show --json`` prints; see :func:`views.show`)."""
        return views.show(self.entries(), ref, lambda: self.store)

    def diff(self, ref_a: str | int, ref_b: str | int, *, top: int = 5) -> dict[str, Any]:
        """How version ``ref_b`` differs from ``ref_a``: requests added and removed, and per
        site the exponents that changed (the dict ``diff --json`` prints; see :func:`views.diff`)."""
        return views.diff(self, ref_a, ref_b, top)

    # --- weights ----------------------------------------------------------------------

    def exponents(self, at: str | int = "HEAD") -> dict[str, torch.Tensor]:
        """Sum of the active requests' exponents per site at ``at`` (float32, CPU).

        At HEAD this is the cached head (one read per site, whatever the number of
        requests); elsewhere the active requests are summed in the order applied.
        """
        return self.sums(at)[1]

    def log_scales(self, at: str | int = "HEAD") -> dict[str, torch.Tensor]:
        """Sum of the active requests' log-scales per site at ``at`` (float32 scalars, CPU).

        Only sites that an active request made with ``rescale`` weakened are present;
        the others have no scale (the factor is ``exp(-exponent)``).
        """
        return self.sums(at)[2]

    def sums(
        self, at: str | int = "HEAD"
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(version, exponent sums, log-scale sums) at ``at``.

        ``HEAD`` (or its version number) reads the newest journal entry and the head
        cache only, so its cost does not grow with the number of requests; any other
        REF, or a stale or damaged cache, replays the journal and sums the requests.
        """
        try:
            head: Entry | None = self.head()
        except TornEntryError:
            head = None  # older versions replay from the valid entries; HEAD refuses in resolve()
        if head is not None and refs.names_version(at, head.version):
            cached = self._head_cache(head)
            if cached is not None:
                return head.version, cached.exponents, cached.log_scales
        state = self.state(at)
        if head is not None and state.version == head.version and not refs.names_version(at, head.version):
            cached = self._head_cache(head)  # a request id that names HEAD
            if cached is not None:
                return state.version, cached.exponents, cached.log_scales
        return state.version, self._sum_exponents(state), self._sum_log_scales(state)

    def _head_cache(self, head: Entry) -> HeadCache | None:
        """The head cache if it stands for ``head`` (same version and entry hash)."""
        try:
            cached = self.store.read_head_cache()
        except IntegrityError:
            return None  # a damaged cache is only slower: `verify` reports it
        if cached is None or cached.version != head.version or cached.digest != head.hash:
            return None
        return cached

    def _sum_log_scales(
        self, state: LedgerState, active: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Sums the current log-scales of ``active`` (default: the state's) in chain order."""
        return _add_scales(
            self.request_log_scales(r, state) for r in (state.active if active is None else active)
        )

    def request_log_scales(
        self, request_id: str, state: LedgerState | None = None
    ) -> dict[str, torch.Tensor]:
        """One request's current log-scales per site; empty unless it was made with ``rescale``.

        Raises:
            RefNotFoundError: the request's arrays were deleted by ``gc``.
        """
        state = state or self.state()
        prefix = state.log_scales.get(request_id)
        return {} if prefix is None else self._request_arrays(prefix, request_id, "log-scales")

    def _sum_exponents(
        self, state: LedgerState, active: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Sums the current exponents of ``active`` (default: the state's) in chain order."""
        total = {s.name: torch.zeros(s.n_vectors, dtype=torch.float32) for s in self.sites}
        for request_id in state.active if active is None else active:
            for site, value in self.request_exponents(request_id, state).items():
                total[site] += value
        return total

    def request_exponents(self, request_id: str, state: LedgerState | None = None) -> dict[str, torch.Tensor]:
        """One request's current exponents per site (sites outside its layers are absent).

        Raises:
            RefNotFoundError: the request's arrays were deleted by ``gc``.
        """
        state = state or self.state()
        prefix = state.exponents.get(request_id, f"requests/{request_id}/exponent")
        return self._request_arrays(prefix, request_id, "exponents")

    def _request_arrays(self, prefix: str, request_id: str, what: str) -> dict[str, torch.Tensor]:
        """site -> array for every array under ``prefix`` (one request's ``what``)."""
        names = self.store.list_arrays(prefix)
        if not names:
            raise RefNotFoundError(
                f"the {what} of request {request_id!r} are gone (deleted by gc, or never written); "
                "versions where it was active can no longer be rebuilt"
            )
        return {name.rsplit("/", 1)[1]: self.store.read_array(name) for name in names}

    def base(self, site: str) -> torch.Tensor:
        """The value matrix of ``site`` as first seen (original dtype).

        Within one write each base is read once (it is immutable); the KVW loop and
        the stability checks share it.
        """
        cache = self._base_cache
        if cache is not None and site in cache:
            return cache[site]
        value = self.store.read_array(f"base/{site}")
        if cache is not None:
            cache[site] = value
        return value

    def effective(
        self, site: str, exponent: torch.Tensor, log_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``base * exp(log_scale - exponent)`` for one site, in float32, cast once."""
        return weakened(self.base(site), exponent, self._sites_by_name[site].axis, log_scale)

    def materialize(self, model: nn.Module, at: str | int = "HEAD") -> int:
        """Writes the value matrices of version ``at`` into a live model, from the base.

        Returns:
            The version materialised.
        """
        version, exponents, scales = self.sums(at)
        self._materialize_exponents(model, exponents, scales)
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
        return self._load(model_dir, at, Placement.resolve(device, dtype), progress)

    def _load(
        self, model_dir: str | Path | None, at: str | int, placement: Placement, progress: bool
    ) -> tuple[nn.Module, Any]:
        directory = self.model_dir(model_dir)
        self._check_model_dir(directory, progress)
        model = load_model(
            directory, progress=progress, placement=placement,
            device_map=self.device_map, offload_folder=self.offload_folder,
        )  # a device_map (accelerate) overrides placement's device
        _, exponents, scales = self.sums(at)
        if scales or any(bool(w.any()) for w in exponents.values()):
            self._materialize_exponents(model, exponents, scales)
        # else the version is the base, and the checked files hold exactly the base
        # (base * exp(-0) is the base, bit for bit, and widening or rounding it into
        # another dtype is the one cast from_pretrained made): nothing to read or write.
        return model, load_processor(directory)

    def _model_holds_base_dtype(self, model: nn.Module) -> bool:
        """Whether every site's weight has its stored base's dtype (no --dtype cast at load)."""
        return all(
            str(site_weight(model, s).dtype).removeprefix("torch.")
            == self.store.array_attrs(f"base/{s.name}").get("dtype")
            for s in self.sites
        )

    def _check_model_dir(self, directory: Path, progress: bool = True, *, cached: bool = True) -> None:
        """The model directory must hold the model init saw: same architecture, same bytes.

        With ``cached``, files the ledger's fingerprint cache trusts are not read again
        (see :mod:`kvw_ledger.fingerprint_cache`); ``verify`` passes False and hashes all.

        Raises:
            ModelMismatchError: another architecture, or a weight file or config that differs.
        """
        recorded = self.model_info.get("model_type")
        try:
            found = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            found = None  # check_fingerprint names what is wrong with the directory
        if recorded and found and found != recorded:
            raise ModelMismatchError(
                f"{directory} holds a {found} model, but this ledger was made for a {recorded} model "
                f"({self.model_info.get('dir')}); pass that model directory, or create a new ledger"
            )
        cache = FingerprintCache.open(self.path / CACHE_NAME) if cached else None
        model_files.check_fingerprint(
            directory, self.model_info["fingerprint"], progress, cache, init_dir=self.model_info.get("dir")
        )

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
        placement = Placement.resolve(_rank_device(device, world), dtype)  # fails before anything runs
        retain_stat.check_statistic(statistic)
        if statistic != "mean" and world.parallel:
            raise BadInputError(
                f"--statistic {statistic} is measured in one process; under torchrun use --statistic mean"
            )
        progress = progress and world.is_main
        records = world.call(data.read_records, data_path)
        with self._parallel_write("retain", world) as write:
            entries = self.entries()[: write.head.version]
            version = self.resolve(at, entries)
            head = entries[-1]
            stats_id = check_id(f"retain-{head.version + 1}" if stats_id is None else stats_id, "retain stats id")
            state = self.state(head.version)
            if stats_id in state.retain_stats:
                raise BadInputError(f"retain stats {stats_id!r} already exist; choose another --id")
            self._check_reads("retain", self.state(version))
            model, processor = self._load(model_dir, version, placement, progress)
            encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
            examples = data.encode_all(encoder, records)
            batches = _batches(examples, batch_size, encoder.pad_token_id, world)
            total = -(-len(examples) // batch_size)
            write.ready()
            if statistic == "mean":
                measured = coefficients.collect(
                    model, self.sites, batches, total=total, desc="retain", progress=progress,
                    world=world, pad_token_id=encoder.pad_token_id,
                )
                if not world.is_main:
                    return self._entry(write.finish())
                means = measured.means()
                values = {s.name: means[s.name].cpu() for s in self.sites}
                counts = {s.name: int(measured.counts[s.name]) for s in self.sites}
                n_batches = total
            else:
                stat = retain_stat.measure(
                    model, self.sites, examples, statistic, batch_size, encoder.pad_token_id, progress=progress
                )
                values, counts, n_batches = stat.values, stat.counts, stat.batches
            files, body = self._write_retain(
                records, stats_id, version, batch_size, statistic, label_eos, values, counts, n_batches
            )
            body["active"] = state.active
            entry = self._commit("retain", body, files, parent=head)
            self._write_head(entry)  # same active set, new version
            return entry

    def _measure_retain(
        self,
        model: Any,
        processor: Any,
        records: Sequence[data.Record],
        stats_id: str,
        version: int,
        batch_size: int,
        statistic: str,
        label_eos: bool,
        progress: bool,
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """Measures and writes ``retain/<stats_id>`` on ``model`` (at ``version``), in this
        process: the files written and the body of the entry that registers them (less
        ``active``)."""
        encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
        examples = data.encode_all(encoder, records)
        measured = retain_stat.measure(
            model, self.sites, examples, statistic, batch_size, encoder.pad_token_id, progress=progress
        )
        return self._write_retain(
            records, stats_id, version, batch_size, statistic, label_eos, measured.values,
            measured.counts, measured.batches,
        )

    def _write_retain(
        self,
        records: Sequence[data.Record],
        stats_id: str,
        version: int,
        batch_size: int,
        statistic: str,
        label_eos: bool,
        values: Mapping[str, torch.Tensor],
        counts: Mapping[str, int],
        n_batches: int,
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """Writes measured retain statistics as ``retain/<stats_id>``: (files, entry body less ``active``)."""
        self._claim(f"retain/{stats_id}")
        files, hashes = {}, {}
        for site in self.sites:
            record = self.store.write_array(f"retain/{stats_id}/{site.name}", values[site.name])
            files.update(record.files)
            hashes[f"retain/{stats_id}/{site.name}"] = record.sha256
        files.update(self.store.group_files(f"retain/{stats_id}"))
        body: dict[str, Any] = {
            "stats": stats_id,
            "measured_at": version,
            "data_fingerprint": data.fingerprint(records),
            "records": len(records),
            "tokens": dict(counts),
            "batch_size": batch_size,
            "arrays": hashes,
            # Absent in entries older than these options: the mean, with the eos labelled.
            "statistic": statistic,
            "label_eos": label_eos,
        }
        if statistic != "mean":
            body["batches"] = n_batches
            body["shuffle_seed"] = retain_stat.SHUFFLE_SEED
        return files, body

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
        _check_limits_type(limits)
        config = config or KVWConfig()
        placement = Placement.resolve(_rank_device(device, world), dtype)
        if target is not None and forget_probe is None:
            raise BadInputError("--target-forget needs --forget-probe FILE, the records it measures")
        if target is not None and world.parallel:
            raise BadInputError("--target-forget searches in one process; under torchrun give --gamma")
        progress = progress and world.is_main
        records = world.call(data.read_records, data_path)
        probe_records = world.call(data.read_records, forget_probe) if forget_probe is not None else None
        with self._parallel_write("forget", world) as write:
            head = write.head
            state = self.state(head.version)
            checked = self._limits(state, limits)  # bad limits fail before the forward passes
            request_id = _check_request_id(f"request-{head.version + 1}" if request_id is None else request_id)
            if request_id in state.requests:
                raise BadInputError(f"request {request_id!r} already exists; choose another --id")
            stats_id = retain_stats or state.latest_retain
            if stats_id is None:
                raise BadInputError(
                    "no retain statistics are registered; run `kvw-ledger retain LEDGER RETAIN.jsonl` first"
                )
            if stats_id not in state.retain_stats:
                raise RefNotFoundError(f"retain stats {stats_id!r} do not exist in this ledger")
            self._check_reads("forget", state, stats=stats_id)
            stats_label_eos = _label_eos(state.retain_info[stats_id])
            label_eos = stats_label_eos if label_eos is None else label_eos
            _same_positions("the request", label_eos, stats_id, stats_label_eos)
            retain_means = {
                s.name: self.store.read_array(f"retain/{stats_id}/{s.name}") for s in self.sites
            }
            fingerprint = data.fingerprint(records)
            same = [r for r in state.active if state.requests[r].body.get("data_fingerprint") == fingerprint]
            if same and world.is_main:
                self._warn(
                    f"{data_path} holds the same records as active request {same[0]!r} "
                    f"(data fingerprint {fingerprint[:12]}...); forgetting it again weakens the same "
                    "vectors further. The match is recorded in the entry"
                )
            model, processor = self._load(model_dir, head.version, placement, progress)
            encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
            examples = data.encode_all(encoder, records)
            _, start, start_scales = self.sums(head.version)
            if (
                self._base_cache is not None
                and not start_scales
                and not any(bool(w.any()) for w in start.values())
                and self._model_holds_base_dtype(model)
            ):
                # Nothing active: load() left the checked files' weights, the bases bit for
                # bit. Copying them spares decompressing every base from the store.
                self._base_cache.update(
                    {s.name: site_weight(model, s).detach().to("cpu", copy=True) for s in self.sites}
                )
            write.ready()
            bases = {s.name: self.base(s.name) for s in self.sites}

            def weaken(config: KVWConfig) -> Any:
                return run_kvw(
                    model, self.sites, examples, retain_means, config, pad_token_id=encoder.pad_token_id,
                    base=bases, start=start, start_log_scale=start_scales, progress=progress, world=world,
                )

            def staged_sums(result: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
                staged = {n: start[n] + result.exponents[n] if n in result.exponents else start[n] for n in start}
                return staged, _add_scales([start_scales, result.log_scales or {}])

            searched: dict[str, Any] | None = None
            if target is None:
                result = weaken(config)
            else:
                config, result, searched = self._search_gamma(
                    state, model, processor, config, target, cast(Path, forget_probe), checked, weaken, staged_sums,
                    start, start_scales, progress,
                )
            if not world.is_main:
                return self._entry(write.finish())
            staged, staged_scales = staged_sums(result)
            report = self._check_staged(
                state, staged, checked, staged_scales, model=model, processor=processor,
                forget_records=probe_records, forget_label_eos=label_eos, placement=placement, progress=progress,
            )
            self._claim(f"requests/{request_id}")
            files, arrays = {}, {}
            for site_name, exponent in result.exponents.items():
                record = self.store.write_array(
                    f"requests/{request_id}/exponent/{site_name}", exponent
                )
                files.update(record.files)
                arrays[record.name] = record.sha256
            for site_name, trace in (result.trace or {}).items():
                record = self.store.write_array(f"requests/{request_id}/trace/{site_name}", trace)
                files.update(record.files)
                arrays[record.name] = record.sha256
            for site_name, scale in (result.log_scales or {}).items():
                record = self.store.write_array(f"requests/{request_id}/log_scale/{site_name}", scale)
                files.update(record.files)
                arrays[record.name] = record.sha256
            files.update(self.store.group_files(f"requests/{request_id}"))
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
            entry = self._commit("forget", body, files, parent=head)
            self._write_head(entry, staged, staged_scales)
            return entry

    def _search_gamma(
        self,
        state: LedgerState,
        model: Any,
        processor: Any,
        config: KVWConfig,
        spec: TargetSearch,
        forget_probe: str | Path,
        limits: StabilityLimits,
        weaken: Callable[[KVWConfig], Any],
        staged_sums: Callable[[Any], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
        start: Mapping[str, torch.Tensor],
        start_scales: Mapping[str, torch.Tensor],
        progress: bool,
    ) -> tuple[KVWConfig, Any, dict[str, Any]]:
        """``forget --target-forget``: trials on the loaded model, each from HEAD; returns the
        chosen config, its result (the model left holding it) and the search's record."""
        from kvw_ledger.evaluate import evaluate_split  # generation: only this search needs it

        results: dict[float, Any] = {}
        warn = dataclasses.replace(limits, on_fail="warn")

        def trial(gamma: float) -> Trial:
            self._materialize_exponents(model, start, start_scales)  # each trial starts at HEAD
            candidate = dataclasses.replace(config, gamma=gamma)
            result = weaken(candidate)
            figures = evaluate_split(model, processor, forget_probe, multiple_choice=False)
            accuracy = max(f["gen_acc"] for f in figures.values())  # the worst modality
            staged, staged_scales = staged_sums(result)
            report = self._check_staged(state, staged, warn, staged_scales, model=model,
                                        processor=processor, progress=progress)
            failed = [c.describe() for c in report.failures()]
            results.clear()  # only the newest is kept: a trace per trial could be large
            results[gamma] = result
            return Trial(gamma, accuracy, report.passed, failed)

        chosen, trials = search(trial, config.gamma, spec)
        if chosen.gamma not in results:  # a later trial replaced it: weaken once more
            self._materialize_exponents(model, start, start_scales)
            results[chosen.gamma] = weaken(dataclasses.replace(config, gamma=chosen.gamma))
        record = {
            "forget_acc": spec.target,
            "metric": "greedy generation accuracy on the forget probe, worst modality",
            "probe_fingerprint": data.fingerprint(data.read_records(forget_probe)),
            "chosen_gamma": chosen.gamma,
            "trials": [t.to_json() for t in trials],
        }
        return dataclasses.replace(config, gamma=chosen.gamma), results[chosen.gamma], record

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
        _check_limits_type(limits)
        placement = Placement.resolve(device, dtype)
        records = data.read_records(retain_with) if retain_with is not None else None
        with self._writing("revert"):
            head = self.head()
            state = self.state(head.version)
            if request_id not in state.requests:
                raise RequestStateError(
                    f"no request {request_id!r} in this ledger (see `kvw-ledger log`)"
                )
            if request_id not in state.active:
                raise RequestStateError(f"request {request_id!r} is already reverted")
            checked = self._limits(state, limits)
            self._check_reads("revert", state)
            active = [r for r in state.active if r != request_id]
            body: dict[str, Any] = {"request": request_id, "reason": reason, "active": active}
            files: dict[str, str] = {}
            if records is None:
                staged = self._sum_exponents(state, active)
                staged_scales = self._sum_log_scales(state, active)
            else:
                staged, staged_scales = self._revert_retain_with(
                    state, head, active, records, retain_id, body, files, model_dir, placement, progress
                )
            report = self._check_staged(
                state, staged, checked, staged_scales, model_dir=model_dir, placement=placement,
                progress=progress,
            )
            body["stability"] = report.to_json()
            entry = self._commit("revert", body, files, parent=head)
            self._write_head(entry, staged, staged_scales)
            return entry

    def _revert_retain_with(
        self,
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
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The retain stats and re-derivation of ``revert --retain-with``, written into
        ``body`` and ``files``; returns the staged sums."""
        previous = state.latest_retain
        if previous is None:
            raise BadInputError(
                "--retain-with replaces the retain statistics, but none are registered; "
                "revert without it"
            )
        stats_id = check_id(retain_id or f"retain-{head.version + 1}", "retain stats id")
        if stats_id in state.retain_stats:
            raise BadInputError(f"retain stats {stats_id!r} already exist; choose another --retain-id")
        like = state.retain_info[previous]
        label_eos = _label_eos(like)
        for other in active:
            if other not in state.traces:
                raise BadInputError(
                    f"request {other!r} has no C_f trace, so it cannot be re-derived fast; revert "
                    "without --retain-with, then `kvw-ledger rederive LEDGER --retain-stats ID "
                    f"--exact {other}=DATA.jsonl`"
                )
            _same_positions(f"request {other!r}", _label_eos(state.requests[other].body), previous, label_eos)
        model, processor = self._load(model_dir, like["measured_at"], placement, progress)
        statistic = like.get("statistic", "mean")
        retain_files, retain_body = self._measure_retain(
            model, processor, records, stats_id, like["measured_at"], like["batch_size"], statistic,
            label_eos, progress,
        )
        del model
        retain_means = {s.name: self.store.read_array(f"retain/{stats_id}/{s.name}") for s in self.sites}
        derived = self._rederive_chain(state, active, set(active), retain_means, {}, None, None, progress)
        prefix = f"rederived/v{head.version + 1}"
        rederived_files, rederived_arrays, changes = self._write_rederived(prefix, state, derived, {})
        files.update(retain_files)
        files.update(rederived_files)
        # The registration and the re-derivation, each as its own entry would record it.
        body["retain"] = retain_body
        body["rederived"] = {"stats": stats_id, "requests": changes}
        body["arrays"] = {**retain_body["arrays"], **rederived_arrays}
        return derived.staged, derived.staged_scales

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
        placement = Placement.resolve(device, dtype)
        sources = {k: v for k, v in (("retain", retain), ("general", general)) if v is not None}
        _check_limits_type(limits)
        if not sources and limits is None:
            raise BadInputError(
                "probe has nothing to do; pass --retain FILE, --general FILE or a limit such as "
                "--max-attenuation 0.3"
            )
        for source in sources.values():
            data.read_records(source)  # a bad file fails before the model loads
        with self._writing("probe"):
            head = self.head()
            state = self.state(head.version)
            current = self._limits(state, None).to_dict()
            # Only the limits this changes are recorded: replay merges them over earlier ones.
            given = {k: v for k, v in (limits.to_dict() if limits else {}).items() if current[k] != v}
            self._check_reads("probe", state)
            version = head.version + 1
            files: dict[str, str] = {}
            stored: dict[str, dict[str, Any]] = {}
            figures: dict[str, dict[str, float]] = {}
            if sources:
                model, processor = self._load(model_dir, 1, placement, progress)
                encoder = data.Encoder(processor, max_length(model))
                for kind, source in sources.items():
                    self._claim(f"probes/v{version}/{kind}")
                    path, written = probes.store_probe(self.path, version, kind, source)
                    files.update(written)
                    records = probes.read_probe(self.path, path)
                    stored[kind] = {"path": path, "records": len(records), "data_fingerprint": data.fingerprint(records),
                                    "label_eos": False}  # absent in older entries: they labelled it
                examples = {k: data.encode_all(encoder, probes.read_probe(self.path, v["path"])) for k, v in stored.items()}
                for kind, ex in examples.items():
                    stored[kind]["base"] = probe_metrics(model, ex, encoder.pad_token_id)
                self.materialize(model, head.version)
                for kind, ex in examples.items():
                    figures[kind] = probe_metrics(model, ex, encoder.pad_token_id)
            body = {"probes": stored, "limits": given, "figures": {**state.probe_figures, **figures},
                    "active": state.active}
            entry = self._commit("probe", body, files, parent=head)
            self._write_head(entry)
            return entry

    def record_audit(self, body: Mapping[str, Any]) -> Entry:
        """Commits an audit's figures (see :mod:`kvw_ledger.audit`) as an ``audit`` entry.

        It adds no file and changes no weight: the active set and the head cache's
        sums stay those of the version before it.

        Raises:
            RequestStateError: ``body["request"]`` is no request of this ledger.
        """
        with self._writing("audit"):
            head = self.head()
            state = self.state(head.version)
            if body.get("request") not in state.requests:
                raise RequestStateError(f"no request {body.get('request')!r} in this ledger")
            _, exponents, scales = self.sums(head.version)
            entry = self._commit("audit", {**body, "active": state.active}, {}, parent=head)
            self._write_head(entry, exponents, scales)
            return entry

    def export(
        self,
        out_dir: str | Path,
        *,
        at: str | int = "HEAD",
        model_dir: str | Path | None = None,
        progress: bool = True,
        format: str = "safetensors",
    ) -> Path:
        """Writes version ``at`` as a Hugging Face model directory, one shard at a time.

        The weight files come from the model directory (fingerprint-checked, so they
        are the base); only the sites' tensors change. No ledger array goes in.

        ``format="peft"`` writes the version instead as a peft IA3 adapter on the
        value projections (``exp(S - W)`` per value vector, see :mod:`kvw_ledger.adapter`),
        to load with ``PeftModel.from_pretrained(base, out_dir)`` on the base model.

        Raises:
            BadInputError: an unknown format, or a site IA3 cannot express (named).
        """
        if format not in EXPORT_FORMATS:
            raise BadInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
        entries = self.entries()
        version = self.resolve(at, entries)
        if format == "peft":
            return self._export_adapter(out_dir, version, entries, model_dir)
        directory = self.model_dir(model_dir)
        self._check_model_dir(directory, progress)
        transform, by_location = self._export_transform(version)
        state = self.state(version)
        provenance = {
            "ledger_version": version,
            "entry_hash": entries[version - 1].hash,
            "head_hash": entries[-1].hash,
            "active_requests": state.active,
            "tool": "kvw-ledger",
        }
        try:
            return export_model(
                directory, out_dir, transform, provenance, progress=progress,
                touches=lambda file, key: (file, key) in by_location,
            )
        except OSError as e:
            if isinstance(e, KVWLedgerError):
                raise
            # export_model built it in a temporary sibling and removed that: nothing is left
            raise StorageError(
                f"could not write the export to {out_dir} ({e.strerror or e}); nothing was exported"
            ) from e

    def _export_adapter(
        self, out_dir: str | Path, version: int, entries: Sequence[Entry], model_dir: str | Path | None
    ) -> Path:
        from kvw_ledger.adapter import check_ia3_sites, write_ia3_adapter

        check_ia3_sites(self.sites)  # before any array is read
        _, exponents, scales = self.sums(version)
        zero = torch.zeros((), dtype=torch.float32)
        factors = {
            s.name: torch.exp(scales.get(s.name, zero).to(torch.float32) - exponents[s.name])
            for s in self.sites
        }
        provenance = {
            "ledger_version": version,
            "entry_hash": entries[version - 1].hash,
            "head_hash": entries[-1].hash,
            "active_requests": self.state(version).active,
            "model_fingerprint": self.model_info["fingerprint"],
            "format": "peft-ia3",
            "tool": "kvw-ledger",
        }
        base = str(self.model_dir(model_dir))
        try:
            return write_ia3_adapter(out_dir, self.sites, factors, base, provenance)
        except OSError as e:
            if isinstance(e, KVWLedgerError):
                raise
            raise StorageError(
                f"could not write the adapter to {out_dir} ({e.strerror or e}); nothing was exported"
            ) from e

    def _export_transform(
        self, version: int
    ) -> tuple[Callable[[str, str, torch.Tensor], torch.Tensor | None], dict[tuple[str, str], str]]:
        """What an export of ``version`` does to each checkpoint tensor (None: left as is),
        and the (file, key) of every site's tensor."""
        _, exponents, scales = self.sums(version)
        by_location = {(loc.file, loc.key): name for name, loc in self.locations.items()}

        def transform(file: str, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
            name = by_location.get((file, key))
            if name is None:
                return None
            return weakened(tensor, exponents[name], self._sites_by_name[name].axis, scales.get(name))

        return transform, by_location

    def tensor_hashes(
        self, at: str | int = "HEAD", *, model_dir: str | Path | None = None, progress: bool = True
    ) -> dict[str, str]:
        """sha256 of every weight tensor that ``export(at=...)`` writes, by checkpoint key.

        Computed as the export computes them (the same transform of the same checkpoint
        tensors), one tensor at a time, without writing an export: each hash is of the
        tensor's raw bytes, which a safetensors file stores as they are.
        """
        from safetensors import safe_open

        version = self.resolve(at)
        directory = self.model_dir(model_dir)
        self._check_model_dir(directory, progress)
        transform, _ = self._export_transform(version)
        hashes: dict[str, str] = {}
        for path in model_files.weight_files(directory):
            with safe_open(str(path), "pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = fh.get_tensor(key)
                    changed = transform(path.name, key, tensor)
                    value = tensor if changed is None else changed
                    hashes[key] = hashlib.sha256(_bits(value).numpy().tobytes()).hexdigest()
        return dict(sorted(hashes.items()))

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
        _check_limits_type(limits)
        exact = dict(exact or {})
        placement = Placement.resolve(device, dtype)
        with self._writing("rederive"):
            head = self.head()
            state = self.state(head.version)
            if stats_id not in state.retain_stats:
                raise RefNotFoundError(
                    f"retain stats {stats_id!r} do not exist in this ledger; register them with "
                    "`kvw-ledger retain LEDGER DATA --id ID` (see `kvw-ledger log`)"
                )
            checked = self._limits(state, limits)
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
            self._check_reads("rederive", state, stats=stats_id, traces=[r for r in ordered if r not in exact])
            for request_id in ordered:
                _same_positions(f"request {request_id!r}", _label_eos(state.requests[request_id].body),
                                stats_id, _label_eos(state.retain_info[stats_id]))
            retain_means = {s.name: self.store.read_array(f"retain/{stats_id}/{s.name}") for s in self.sites}
            exact_records = {r: self._exact_records(state, r, path) for r, path in exact.items()}
            model: Any = None
            processor: Any = None
            if exact_records:
                model, processor = self._load(model_dir, 1, placement, progress)
            derived = self._rederive_chain(
                state, state.active, set(ordered), retain_means, exact_records, model, processor, progress
            )
            if model is not None:  # it holds the last exact request's loop, not the staged HEAD
                self._materialize_exponents(model, derived.staged, derived.staged_scales)
            report = self._check_staged(state, derived.staged, checked, derived.staged_scales, model=model,
                                        processor=processor, model_dir=model_dir, placement=placement,
                                        progress=progress)
            files, arrays, changes = self._write_rederived(f"rederived/v{head.version + 1}", state, derived, exact)
            body = {"stats": stats_id, "requests": changes, "arrays": arrays, "active": state.active,
                    "stability": report.to_json()}
            entry = self._commit("rederive", body, files, parent=head)
            self._write_head(entry, derived.staged, derived.staged_scales)
            return entry

    def _rederive_chain(
        self,
        state: LedgerState,
        chain: Sequence[str],
        redo: set[str],
        retain_means: Mapping[str, torch.Tensor],
        exact_records: Mapping[str, Sequence[data.Record]],
        model: Any,
        processor: Any,
        progress: bool,
    ) -> _Rederived:
        """Re-derives the requests in ``redo`` along ``chain`` (the active requests, in
        order), fast from their traces or exactly (``exact_records``, on ``model``)."""
        derived = _Rederived()
        new, new_traces, new_scales = derived.exponents, derived.traces, derived.log_scales
        log_sq: dict[str, torch.Tensor] = {}  # site -> column_log_norms of its base
        # One pass in chain order: ``running`` is the sum (exponents, log-scales) of the
        # requests before the current one, as re-derived so far; at the end, the staged HEAD.
        running = _add(self.sites, [])
        running_scales: dict[str, torch.Tensor] = {}
        for request_id in chain:
            if request_id in redo:
                params = KVWConfig.from_dict(state.requests[request_id].body["params"])
                if request_id in exact_records:
                    start, start_scales = dict(running), dict(running_scales)
                    self._materialize_exponents(model, start, start_scales)
                    encoder = data.Encoder(processor, max_length(model),
                                           label_eos=_label_eos(state.requests[request_id].body))
                    result = run_kvw(
                        model, self.sites, data.encode_all(encoder, exact_records[request_id]), retain_means,
                        params, pad_token_id=encoder.pad_token_id,
                        base={s.name: self.base(s.name) for s in self.sites}, start=start,
                        start_log_scale=start_scales, progress=progress,
                    )
                    new[request_id] = result.exponents
                    new_traces[request_id] = result.trace or {}
                    if result.log_scales is not None:
                        new_scales[request_id] = result.log_scales
                else:
                    traces = {n.rsplit("/", 1)[1]: self.store.read_array(n)
                              for n in self.store.list_arrays(state.traces[request_id])}
                    new[request_id] = {site: exponents_from_trace(t, retain_means[site], params)
                                       for site, t in traces.items()}
                    if params.rescale:  # s restores the norm the site had before this request
                        for site in new[request_id]:
                            if site not in log_sq:
                                log_sq[site] = column_log_norms(self.base(site), self._sites_by_name[site].axis)
                        new_scales[request_id] = {
                            site: log_scale(log_sq[site], running[site], running[site] + w)
                            for site, w in new[request_id].items()
                        }
            exps = new[request_id] if request_id in new else self.request_exponents(request_id, state)
            scales = (new_scales[request_id] if request_id in new_scales
                      else self.request_log_scales(request_id, state))
            running = _add(self.sites, [running, exps])
            running_scales = _add_scales([running_scales, scales])
        derived.staged, derived.staged_scales = running, running_scales
        return derived

    def _write_rederived(
        self, prefix: str, state: LedgerState, derived: _Rederived, exact: Mapping[str, Any]
    ) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
        """Writes re-derived arrays under ``prefix``: (files, arrays, per-request changes)."""
        self._claim(prefix)
        files: dict[str, str] = {}
        arrays: dict[str, str] = {}
        changes: dict[str, Any] = {}
        new_scales = derived.log_scales
        for request_id, exps in derived.exponents.items():
            old = {n: self.store.content_hash(n) for n in self.store.list_arrays(state.exponents[request_id])}
            change: dict[str, Any] = {"mode": "exact" if request_id in exact else "fast",
                                      "exponent": f"{prefix}/{request_id}/exponent", "old": old, "new": {}}
            for site, value in exps.items():
                record = self.store.write_array(f"{prefix}/{request_id}/exponent/{site}", value)
                files.update(record.files)
                arrays[record.name] = change["new"][record.name] = record.sha256
            if request_id in new_scales:
                change["log_scale"] = f"{prefix}/{request_id}/log_scale"
                old_prefix = state.log_scales.get(request_id)
                change["old_log_scale"] = {
                    n: self.store.content_hash(n) for n in self.store.list_arrays(old_prefix)
                } if old_prefix else {}
                change["new_log_scale"] = {}
                for site, value in new_scales[request_id].items():
                    record = self.store.write_array(f"{prefix}/{request_id}/log_scale/{site}", value)
                    files.update(record.files)
                    arrays[record.name] = change["new_log_scale"][record.name] = record.sha256
            if derived.traces.get(request_id):
                change["trace"] = f"{prefix}/{request_id}/trace"
                for site, value in derived.traces[request_id].items():
                    record = self.store.write_array(f"{prefix}/{request_id}/trace/{site}", value)
                    files.update(record.files)
                    arrays[record.name] = record.sha256
            changes[request_id] = change
        files.update(self.store.group_files(prefix))
        return files, arrays, changes

    def gc(self, *, reverted: bool = True) -> Entry:
        """Deletes the arrays (exponents and traces) of reverted requests.

        The journal keeps tombstones: every entry still names the deleted files and
        their hashes, and this entry lists them, so ``verify`` still passes. Versions
        at which a deleted request was active can no longer be rebuilt.
        """
        if not reverted:
            raise BadInputError("gc needs --reverted (the only kind of garbage it collects)")
        with self._writing("gc"):
            entries = self.entries()
            head = entries[-1]
            state = self.state(head.version)
            self._check_reads("gc", state, base=False)  # its head refresh sums the active requests
            victims = sorted(r for r in state.reverted if r not in state.active and r not in state.deleted)
            prefixes = {r: _request_prefixes(r, entries) for r in [*victims, *state.deleted]}
            on_disk = self.store.files()
            deleted_files = sorted(
                f for r in victims for prefix in prefixes[r] for f in on_disk if f.startswith(f"{prefix}/")
            )
            body = {"deleted": victims, "deleted_files": deleted_files, "active": state.active}
            entry = self._commit("gc", body, {}, parent=head)
            self._write_head(entry)  # the active set is unchanged; no deleted array is needed
            # Delete only after the commit: a crash in between leaves files the journal already
            # calls deleted (the next gc removes them), never a missing file an entry still needs.
            # Requests deleted by an earlier gc are swept again for such leftovers.
            for request_prefixes in prefixes.values():
                for prefix in request_prefixes:
                    self.store.delete(prefix)
            return entry

    def _exact_records(self, state: LedgerState, request_id: str, path: str | Path) -> list[data.Record]:
        records = data.read_records(path)
        recorded = state.requests[request_id].body["data_fingerprint"]
        if data.fingerprint(records) != recorded:
            raise BadInputError(
                f"{path} is not the data request {request_id!r} was applied with (fingerprint differs); "
                "exact re-derivation needs the same records and images"
            )
        return records

    def _materialize_exponents(
        self,
        model: Any,
        exponents: Mapping[str, torch.Tensor],
        log_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        scales = log_scales or {}
        with torch.no_grad():
            for site in self.sites:
                weight = site_weight(model, site)
                # The factors are computed on the CPU (where the sums are), the product on
                # the weight's device, cast once into the weight's dtype.
                base = self.base(site.name).to(weight.device)
                weakened(base, exponents[site.name], site.axis, scales.get(site.name), out=weight)

    # --- repair -----------------------------------------------------------------------

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
        if self.remote is not None:
            raise BadInputError(f"repair works on a ledger directory, not on {self.remote.url}")
        with held_within(WriterLock(self.path, operation="repair", on_stale=self._on_stale), self.lock_timeout, self.on_wait):
            try:
                newest = self.journal.head()
            except TornEntryError as e:
                torn = e
            else:
                try:
                    self.journal.entries()
                except IntegrityError as e:
                    raise IntegrityError(
                        f"{e}. repair only moves a torn newest entry aside, and the newest "
                        f"({f'journal/{newest.version:08d}.json' if newest else 'none'}) is valid: it "
                        "changes nothing here. Restore the damaged entry from a backup "
                        "(`kvw-ledger verify` lists the damage)"
                    ) from e
                return {"repaired": False, "newest": None if newest is None else f"journal/{newest.version:08d}.json",
                        "message": "nothing to repair: the newest journal entry is valid"}
            try:
                self.journal.entries()
            except TornEntryError as e:
                if e.version != torn.version or e.valid is None:
                    raise
            if torn.version == 1:
                raise torn
            stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
            folder = self.path / "repair" / f"{stamp}-v{torn.version:08d}"
            folder.mkdir(mode=0o700, parents=True)
            source = self.path / torn.path
            raw = source.read_bytes()
            record: dict[str, Any] = {
                "repaired": True,
                "time": stamp,
                "moved": torn.path,
                "to": f"{folder.relative_to(self.path).as_posix()}/{source.name}",
                "sha256": hashlib.sha256(raw).hexdigest(),
                "bytes": len(raw),
                "why": str(torn),
                "head_after": torn.version - 1,
            }
            os.rename(source, folder / source.name)
            fsync_dir(source.parent)
            self.torn = None
            unnamed = self._unnamed()  # what the torn entry's write added: kept, not deleted
            for prefix in unnamed:
                (folder / "files" / prefix).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.rename(self.path / prefix, folder / "files" / prefix)
            record["moved_arrays"] = unnamed
            (folder / "record.json").write_bytes(canonical_json(record))
            fsync_dir(folder)
            self._write_head(self.head())
            return record

    # --- verification -----------------------------------------------------------------

    def verify(
        self, *, model_dir: str | Path | None = None, check_model: bool = True
    ) -> VerifyReport:
        """Re-hashes the chain, every file and array, the head cache and the base.

        Arrays and files that no entry names (left by a crash) are warnings.
        """
        problems = list(self.journal.verify(self.path))
        try:
            entries = self.entries()
        except IntegrityError as e:
            return VerifyReport([*problems, Problem("journal", str(e))], 0, 0)
        named: set[str] = set()
        checked = 0
        state = LedgerState(0)
        contents = self._content_hashes({a for e in entries for a in e.body.get("arrays", {})})
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
                        Problem(
                            array,
                            f"array content hash {actual[:12]}... != recorded {expected[:12]}...",
                        )
                    )
            _apply(state, entry)
            if list(entry.body.get("active", state.active)) != state.active:
                problems.append(
                    Problem(
                        f"journal/{entry.version:08d}.json",
                        f"records active requests {entry.body.get('active')} but replay gives {state.active}",
                    )
                )
        # The head and base checks trust the sites and locations in the root zarr.json.
        trusted = not any(p.path == "zarr.json" for p in problems)
        if trusted:
            problems.extend(self._verify_head(entries, state))
        for path in self.store.files():
            if path not in named and not path.startswith("head/"):
                problems.append(
                    Problem(
                        path,
                        "no journal entry names this file (left by an interrupted write)",
                        "warning",
                    )
                )
        if check_model and trusted:
            problems.extend(self._verify_base(model_dir))
        if self.remote is not None:
            problems.extend(self.remote.verify())
        return VerifyReport(problems, len(entries), checked)

    def _content_hashes(self, arrays: set[str]) -> dict[str, str | IntegrityError | None]:
        """Each array's content hash (None when absent, the error when unreadable), on threads."""

        def one(array: str) -> tuple[str, str | IntegrityError | None]:
            try:
                return array, self.store.content_hash(array) if self.store.has_array(array) else None
            except IntegrityError as e:
                return array, e

        with ThreadPoolExecutor(max_workers=hash_workers()) as pool:
            return dict(pool.map(one, sorted(arrays)))

    def _verify_head(self, entries: Sequence[Entry], state: LedgerState) -> list[Problem]:
        """The head cache: sealed, naming an entry of the journal, equal to the replayed sum there.

        A head older than HEAD (a crash between a commit and the head refresh) or none
        at all (a crash inside the swap) is a warning; anything else is damage.
        """
        damaged = [Problem(path, message) for path, message in self.store.check_head()]
        if damaged:
            return damaged
        try:
            cached = self.store.read_head_cache()
        except IntegrityError as e:
            return [Problem("head", str(e))]
        last = entries[-1].version
        if cached is None:
            return [
                Problem(
                    "head",
                    "the head cache is missing (a write was interrupted); the next write rebuilds it",
                    "warning",
                )
            ]
        tensors, scales, version, digest = cached.exponents, cached.log_scales, cached.version, cached.digest
        if not 1 <= version <= last or entries[version - 1].hash != digest:
            return [
                Problem(
                    "head/zarr.json",
                    f"the head cache names version {version} (entry sha256 {digest[:12]}...), "
                    "which is not an entry of this journal",
                )
            ]
        stale = Problem(
            "head",
            f"the head cache is of version {version}, HEAD is {last} (a write was interrupted); "
            "the next write rebuilds it",
            "warning",
        )
        at = state
        if version < last:
            at = LedgerState(0)
            for entry in entries[:version]:
                _apply(at, entry)
        try:
            expected = self._sum_exponents(at)
            expected_scales = self._sum_log_scales(at)
        except KVWLedgerError as e:  # a damaged request array, also reported by name above
            if version < last:
                return [stale]  # its requests may since have been deleted by gc
            return [Problem("head", f"cannot be checked against the request arrays: {e}")]
        for name, value in expected.items():
            got = tensors.get(name)
            if got is None or not torch.equal(got.view(torch.int32), value.view(torch.int32)):
                return [
                    Problem(
                        f"head/{name}",
                        f"the head cache differs from the sum of active exponents at version {version}",
                    )
                ]
        for name in sorted(set(scales) | set(expected_scales)):
            got, want = scales.get(name), expected_scales.get(name)
            if got is None or want is None or not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                return [
                    Problem(
                        f"head/{name}",
                        f"the head cache's log-scale differs from the sum of active log-scales at version {version}",
                    )
                ]
        return [stale] if version < last else []

    def _verify_base(self, model_dir: str | Path | None) -> list[Problem]:
        directory = self.model_dir(model_dir)
        if not directory.is_dir():
            return [
                Problem(
                    str(directory),
                    "the model directory is gone; the base was not checked against it",
                    "warning",
                )
            ]
        try:
            self._check_model_dir(directory, cached=False)  # verify trusts no remembered digest
        except KVWLedgerError as e:
            return [Problem(str(directory), str(e))]
        from safetensors import safe_open

        problems = []
        for name, loc in self.locations.items():
            with safe_open(str(directory / loc.file), "pt") as fh:
                original = fh.get_tensor(loc.key)
            try:
                stored = self.base(name)
            except KVWLedgerError as e:
                problems.append(Problem(f"base/{name}", str(e)))
                continue
            if original.shape != stored.shape or not torch.equal(_bits(original), _bits(stored)):
                problems.append(Problem(f"base/{name}", f"differs from {loc.key} in {loc.file}"))
        return problems

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
        given = {
            "max_attenuation": max_attenuation,
            "max_retain_drop": max_retain_drop,
            "max_nll_increase": max_nll_increase,
            "max_zeroed": max_zeroed,
            "zero_floor": zero_floor,
            "on_fail": on_fail,
        }
        state = self.state()
        return StabilityLimits(**{**self._limits(state, None).to_dict(),
                                  **{k: v for k, v in given.items() if v is not None}})

    def _limits(self, state: LedgerState, given: StabilityLimits | None) -> StabilityLimits:
        """``given``, else the defaults overridden by the ledger's limits (set with ``probe``)."""
        if given is not None:
            return given
        unknown = set(state.limits) - set(StabilityLimits.__dataclass_fields__)
        if unknown:
            raise BadInputError(f"unknown stability limit(s): {', '.join(sorted(unknown))}")
        return StabilityLimits(**state.limits)

    def _check_reads(
        self,
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
        for entry in self.entries():
            recorded.update({path: (digest, entry.version) for path, digest in entry.files.items()})
            deleted.update(entry.body.get("deleted_files", []))
        prefixes = ["base"] if base else []
        if stats is not None:
            prefixes.append(f"retain/{stats}")
        for request_id in state.active:
            prefixes.append(state.exponents.get(request_id, f"requests/{request_id}/exponent"))
            if request_id in state.log_scales:
                prefixes.append(state.log_scales[request_id])
        prefixes += [state.traces[r] for r in traces if r in state.traces]
        prefixes += [p["path"].rsplit("/", 1)[0] for p in state.probes.values()]
        wanted = sorted(
            path for path in recorded if path not in deleted and any(path.startswith(f"{x}/") for x in prefixes)
        )
        problems = [(path, why) for path, why in self.store.check_head()]
        for path, actual in hash_files(self.path, set(wanted)).items():
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
                f"would build on it. Nothing was written. Run `kvw-ledger verify {self.location}` "
                "to list the damage, and restore the file from a backup"
            )

    def _check_staged(
        self,
        state: LedgerState,
        staged: Mapping[str, torch.Tensor],
        limits: StabilityLimits,
        staged_scales: Mapping[str, torch.Tensor] | None = None,
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
        bad = overflowing(staged)
        if bad is not None:
            raise StabilityCheckError(
                f"the step was not committed: {bad}. Its strength is far too high (a lower --gamma, "
                "fewer --epochs or narrower --layers); such a step is refused even with --on-fail warn"
            )
        report.checks += check_exponents(staged)
        report.checks += check_log_scales(staged_scales or {})
        axes = {s.name: s.axis for s in self.sites}
        bases = {name: self.base(name) for name in staged}
        checks, report.attenuation = check_attenuation(
            bases, staged, axes, limits.max_attenuation, staged_scales
        )
        report.checks += checks
        checks, _ = check_zeroed(staged, limits.max_zeroed, limits.zero_floor, staged_scales)
        report.checks += checks
        if state.probes or forget_records is not None:
            if model is None:
                model, processor = self._load(model_dir, 1, placement or Placement.resolve(), progress)
                self._materialize_exponents(model, staged, staged_scales)
            # Each probe is encoded as its base figures were measured.
            sets = {kind: (probes.read_probe(self.path, p["path"]), _label_eos(p)) for kind, p in state.probes.items()}
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

    @contextlib.contextmanager
    def _writing(self, operation: str) -> Iterator[None]:
        """One write: under the local protocol, and for a URL ledger also under its lock,
        after a pull, and followed by a push (see :mod:`kvw_ledger.remote`).

        Ctrl-C (SIGINT) before the commit point aborts the write, which leaves nothing
        behind; from the commit point on it is held until the write has finished, so a
        committed write always completes (see :mod:`kvw_ledger.interrupts`).
        """
        if self.operator is None:
            default_operator()  # a bad $KVW_LEDGER_OPERATOR fails before any work, not at the commit
        guard = InterruptGuard()
        self._guard = guard
        self._committed = None
        try:
            yield from self._writing_guarded(operation)
        finally:
            committed = self._committed
            if committed is not None and guard.pending:
                self._warn(
                    f"interrupted after version {committed.version} was committed; the write was "
                    "finished first"
                )
            if not (committed is not None and self.hold_interrupts_after_commit):
                guard.end()
            self._guard = None

    def _writing_guarded(self, operation: str) -> Iterator[None]:
        remote = self.remote
        if remote is None:
            with self._writing_local(operation):
                yield
            return
        with remote.lock(operation, self.lock_timeout, self.on_wait):
            with held_within(WriterLock(self.path, operation="pull"), self.lock_timeout, self.on_wait):
                remote.pull(self.path, progress=True)
            remote.push(self.path, progress=True)  # what an earlier write committed here but could not publish
            with self._writing_local(operation):
                yield
            try:
                remote.push(self.path, progress=True)
            except (OSError, KVWLedgerError) as e:
                raise StorageError(
                    f"{operation} was committed in the local copy {self.path} but not published to "
                    f"{remote.url} ({e}); the next write there publishes it"
                ) from e

    @contextlib.contextmanager
    def _writing_local(self, operation: str) -> Iterator[None]:
        """Holds the writer lock (waiting up to ``lock_timeout`` for it) around one write.

        Anything a failed write claimed (see :meth:`_claim`) is removed again, and a
        storage failure (full disk, read-only directory) becomes a StorageError: the
        ledger is left as it was. Before the write, what an interrupted or killed
        writer left (scratch directories, arrays no entry names) is removed.
        """
        guard = self._guard
        lock = WriterLock(self.path, operation=operation, on_stale=self._on_stale)
        acquire_within(lock, self.lock_timeout, self.on_wait, guard)
        self._claimed = []
        self._committed = None
        self._base_cache = {}
        try:
            self.journal.head()  # a torn newest entry: refuse (TornEntryError) before touching anything
            self.store.clean_temp()  # a crashed writer's scratch; the lock makes us the only writer
            self.journal.clean_temp()
            self._sweep_unnamed()
            yield
        except OSError as e:
            if guard is not None:
                guard.hold()  # the cleanup below is never cut short
            if not isinstance(e, KVWLedgerError):
                self._release_claims()
                done = self._committed
                outcome = (
                    f"version {done.version} was committed, but the cleanup after it failed; the next "
                    "write retries it"
                    if done is not None
                    else f"nothing was committed by {operation}"
                )
                raise StorageError(
                    f"could not write to the ledger at {self.path} ({e.strerror or e}); {outcome}"
                ) from e
            self._release_claims()
            raise
        except BaseException:
            if guard is not None:
                guard.hold()
            self._release_claims()
            raise
        finally:
            if guard is not None:
                guard.hold()
            self._claimed = []
            self._base_cache = None
            lock.release()

    @contextlib.contextmanager
    def _parallel_write(self, operation: str, world: World) -> Iterator[Step]:
        """:meth:`_writing` for one rank of a data-parallel job (one process: just that).

        Rank 0 takes the write and finds HEAD under its lock; every rank gets that entry
        as ``step.head``. The body calls ``step.ready()`` before its forward passes, and
        on every rank but 0, ``step.finish()`` after them. Rank 0's commit (or any
        rank's error) then reaches every rank.
        """
        step = Step(world)
        if not world.parallel:
            with self._writing(operation):
                step.head = self.head()
                yield step
            return
        try:
            with contextlib.ExitStack() as held:
                with world.together() as plan:
                    if world.is_main:
                        held.enter_context(self._writing(operation))
                        plan.value = self.head().version
                with world.together():
                    step.head = self.head() if world.is_main else self._entry(plan.main)
                yield step
        except Exception as e:
            if not step.finished and not is_shared(e):
                step.finish(error=e)  # tells the others, and raises here
            raise
        if not step.finished:
            step.finish(self._committed.version if self._committed is not None else None)

    def _entry(self, version: int) -> Entry:
        """Entry ``version``; a URL ledger's mirror catches up first if it lacks it
        (another rank's writer may have pulled past this rank's mirror)."""
        if self.remote is not None and self.head().version < version:
            with held_within(WriterLock(self.path, operation="pull"), self.lock_timeout, self.on_wait):
                self.remote.pull(self.path, progress=False)
        return self.journal.get(version)

    lock_timeout: float = 600.0  # seconds a writer waits for another writer to finish
    device_map: DeviceMap | None = None  # how load() places the model (accelerate); None: the CPU
    offload_folder: str | None = None  # where load() offloads layers mapped to "disk" (None: a temp dir)
    operator: str | None = None  # who this handle's writes name; None: journal.default_operator()
    # The CLI sets this: a process that exits right after its write keeps holding Ctrl-C
    # once the write has committed, so nothing can turn a committed write into exit 130.
    hold_interrupts_after_commit: bool = False
    _guard: InterruptGuard | None = None  # the current write's SIGINT guard
    remote: Remote | None = None  # set when the ledger lives at a URL; self.path is then its mirror
    on_wait: Callable[[str], None] | None = None
    _base_cache: dict[str, torch.Tensor] | None = None  # bases read during the current write
    _committed: Entry | None = None  # the entry the current write committed, if any
    _claimed: list[str] = []  # noqa: RUF012 - replaced per write; prefixes a write owns until it commits

    def _claim(self, prefix: str) -> None:
        """Removes what an interrupted writer left under ``prefix``, and owns it until commit.

        Groups above ``prefix`` that do not exist yet (``rederived/`` on a first
        re-derivation) are owned too, so a failed write leaves not even their metadata.
        """
        self._remove_prefix(prefix)
        parts = prefix.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            group = "/".join(parts[:depth])
            if not (self.path / group).exists():
                self._claimed.append(group)
                break
        self._claimed.append(prefix)

    def _release_claims(self) -> None:
        for prefix in reversed(self._claimed):
            with contextlib.suppress(OSError, KVWLedgerError):
                self._remove_prefix(prefix)

    def _remove_prefix(self, prefix: str) -> None:
        # The whole subtree, groups included: a write interrupted after creating the
        # groups but before its first array has left only group zarr.json files.
        if (self.path / prefix).exists():
            self.store.discard(prefix)

    def _sweep_unnamed(self) -> list[str]:
        """Removes what no journal entry names under the per-write groups (requests/,
        retain/, rederived/, probes/): the leftovers of an interrupted or killed writer,
        whatever verb it ran. Returns the ledger-relative paths removed."""
        removed = self._unnamed()
        for prefix in removed:
            self.store.discard(prefix)
        return removed

    def _unnamed(self) -> list[str]:
        """The children of the per-write groups (or whole groups) that no entry names."""
        named: set[str] = set()
        for entry in self.entries():
            named.update(entry.files)
            named.update(entry.body.get("deleted_files", []))  # gc's tombstones: gc sweeps them
        owners = {"/".join(path.split("/")[:2]) for path in named}
        found = []
        for group in _PER_WRITE_GROUPS:
            top = self.path / group
            if not top.is_dir():
                continue
            children = []
            for child in sorted(os.listdir(top)):
                prefix = f"{group}/{child}"
                if not (prefix in owners or (child == "zarr.json" and prefix in named)):
                    children.append(prefix)
            found += [group] if len(children) == len(os.listdir(top)) else children
        return found

    on_stale: Callable[[str], None] | None = None
    on_warning: Callable[[str], None] | None = None  # told what a verb noticed but went on with

    def _on_stale(self, message: str) -> None:
        if self.on_stale is not None:
            self.on_stale(message)

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)

    def _commit(self, op: str, body: dict[str, Any], files: dict[str, str], *, parent: Entry) -> Entry:
        """Appends the journal entry: the commit point. Claimed arrays now belong to it.

        From here to the end of the write, Ctrl-C is held (see :meth:`_writing`).
        """
        if self._guard is not None:
            self._guard.hold()
        entry = self.journal.append(op, body, files, parent=parent, operator=self.operator)
        self._claimed = []
        self._committed = entry
        return entry

    def _write_head(
        self,
        entry: Entry,
        tensors: Mapping[str, torch.Tensor] | None = None,
        log_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Caches the sums at ``entry``: those given (both, from a staged step), else replayed."""
        if tensors is None:
            state = self.state(entry.version)
            tensors, log_scales = self._sum_exponents(state), self._sum_log_scales(state)
        self.store.write_head(dict(tensors), entry.version, entry.hash, log_scales)


@dataclass
class _Rederived:
    """What one re-derivation computed, per request (the requests re-derived only)."""

    exponents: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    traces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # exact mode only
    log_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # rescaled ones
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # the chain's exponent sums
    staged_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # its log-scale sums


def _apply(state: LedgerState, entry: Entry) -> None:
    """Advances a replay by one entry."""
    body = entry.body
    state.version = entry.version
    if entry.op == "retain":
        state.retain_stats[body["stats"]] = entry.version
        state.retain_info[body["stats"]] = body
        state.latest_retain = body["stats"]
    elif entry.op == "forget":
        request_id = body["request"]
        state.requests[request_id] = RequestInfo(request_id, entry.version, body)
        state.active.append(request_id)
        state.exponents[request_id] = f"requests/{request_id}/exponent"
        if any(name.startswith(f"requests/{request_id}/trace/") for name in body.get("arrays", {})):
            state.traces[request_id] = f"requests/{request_id}/trace"
        if any(name.startswith(f"requests/{request_id}/log_scale/") for name in body.get("arrays", {})):
            state.log_scales[request_id] = f"requests/{request_id}/log_scale"
    elif entry.op == "revert":
        if body["request"] in state.active:
            state.active.remove(body["request"])
        state.reverted.add(body["request"])
        if "retain" in body:  # revert --retain-with: retain stats registered in the same entry
            retained = body["retain"]
            state.retain_stats[retained["stats"]] = entry.version
            state.retain_info[retained["stats"]] = retained
            state.latest_retain = retained["stats"]
        _apply_rederived(state, body.get("rederived", {}).get("requests", {}))
    elif entry.op == "rederive":
        _apply_rederived(state, body["requests"])
    elif entry.op == "gc":
        for request_id in body["deleted"]:
            state.deleted[request_id] = entry.version
    elif entry.op == "probe":
        state.probes.update(body.get("probes", {}))
        state.limits.update(body.get("limits", {}))
    figures = body.get("stability", {}).get("probes") or body.get("figures")
    if figures:
        state.probe_figures = dict(figures)


def _apply_rederived(state: LedgerState, changes: Mapping[str, Any]) -> None:
    """Points each re-derived request at its new arrays (a rederive, or a revert --retain-with)."""
    for request_id, change in changes.items():
        state.exponents[request_id] = change["exponent"]
        if change.get("trace"):
            state.traces[request_id] = change["trace"]
        if change.get("log_scale"):
            state.log_scales[request_id] = change["log_scale"]


def _label_eos(body: Mapping[str, Any]) -> bool:
    """Whether a retain, forget or probe record labelled the eos; entries from before the
    option existed did."""
    return bool(body.get("label_eos", True))


def _same_positions(what: str, label_eos: bool, stats_id: str, stats_label_eos: bool) -> None:
    """C_f and C_r must count the same positions, or the accessor compares unlike means."""
    if label_eos != stats_label_eos:
        flag = "with --label-eos" if stats_label_eos else "without --label-eos"
        raise BadInputError(
            f"{what} {'labels' if label_eos else 'does not label'} the eos token, but retain stats "
            f"{stats_id!r} were measured {flag}; use the same setting, or register retain stats "
            "measured with it (`kvw-ledger retain LEDGER DATA --id ID [--label-eos]`)"
        )


def _request_prefixes(request_id: str, entries: Sequence[Entry]) -> list[str]:
    """Every store prefix holding arrays of one request: its own, and each re-derivation's."""
    prefixes = [f"requests/{request_id}"]
    for entry in entries:
        changes = entry.body["requests"] if entry.op == "rederive" else entry.body.get("rederived", {}).get("requests", {})
        if entry.op in ("rederive", "revert") and request_id in changes:
            prefixes.append(f"rederived/v{entry.version}/{request_id}")
    return prefixes


def _add(sites: Sequence[Site], parts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sums per-site exponents in the given order (chain order keeps sums bit-reproducible)."""
    total = {s.name: torch.zeros(s.n_vectors, dtype=torch.float32) for s in sites}
    for part in parts:
        for site, value in part.items():
            total[site] += value
    return total


def _add_scales(parts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sums per-site log-scales in the given order, each from a float32 zero (as replay does)."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for site, value in part.items():
            total[site] = total.get(site, torch.zeros((), dtype=torch.float32)) + value.reshape(())
    return total


def _check_limits_type(limits: object) -> None:
    """Limits are one typed value; a mapping (the old form) is refused saying what to pass."""
    if limits is not None and not isinstance(limits, StabilityLimits):
        raise BadInputError(
            f"limits must be a StabilityLimits, not {type(limits).__name__}; pass "
            "ledger.limits(max_attenuation=..., on_fail=...) or StabilityLimits(...)"
        )


def _rank_device(device: str | torch.device | None, world: World) -> str | torch.device | None:
    """Under nccl, ``auto`` is this rank's own GPU (not every rank on cuda:0)."""
    if world.backend == "nccl" and (device is None or str(device).strip().lower() == "auto"):
        return f"cuda:{world.local_rank}"
    return device


def _batches(
    examples: Sequence[data.Example], batch_size: int, pad_token_id: int, world: World
) -> Iterable[data.Batch] | list[list[data.Example]]:
    """Retain batches: collated for one process; under data parallel the examples of each,
    which every rank sees alike and measures its share of."""
    if not world.parallel:
        return data.iter_batches(examples, batch_size, pad_token_id)
    return [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def _check_request_id(request_id: str) -> str:
    """A request id must not read as another kind of REF."""
    check_id(request_id)
    if request_id.isdigit() or refs.HEAD_REF.fullmatch(request_id):
        raise BadInputError(
            f"request id {request_id!r} reads as a version REF; choose an id with a letter, e.g. req-{request_id}"
        )
    return request_id


def _sha256(path: Path) -> str:
    from kvw_ledger.journal import sha256_file

    return sha256_file(path)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)
