"""A loaded model that switches between ledger versions: every base read once, kept in memory.

:meth:`Ledger.materialize` reads (and decompresses) each site's base from the store
on every call. A serving process that keeps one model loaded and moves it between
versions often pays that each time; :class:`LiveModel` pays it once, then writes a
version as ``base * factor`` straight into the parameters, where ``factor`` is the
per-vector ``exp(S - W)`` of that version (a few kilobytes per site). Results are
bit-identical to :meth:`Ledger.materialize`: the factor is computed by the same
operations on the same tensors, the product in float32, cast once.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from kvw_ledger.errors import ModelMismatchError
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import torch_threads
from kvw_ledger.sites import Site, site_weight
from kvw_ledger.weakening import Weakening

__all__ = ["LiveModel"]

_CHUNK = 1 << 18  # elements per float32 scratch chunk (1 MiB): stays in a core's L2 cache

_MAX_WORKERS = 8  # threads sharing the chunks; more only contend for memory bandwidth

# One chunk of rows of a site: its base rows, its weight rows, the rows.
_Chunk = tuple[torch.Tensor, torch.Tensor, slice]
# One chunk to write: base rows, weight rows, the factor as (1, n) or (rows, 1). The
# float32 product is cast once, into the weight's dtype (as ``kvw.weakened`` does).
_Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_WeightKey = tuple[int, tuple[int, ...], torch.dtype, torch.device]  # memory and layout


class LiveModel:
    """A model kept loaded beside the bases of a ledger's sites, to switch versions fast.

    ``LiveModel(ledger, model)`` checks that ``model`` has every site of the ledger
    (same parameter path and shape) and reads every site's base once. The bases are
    kept in their original dtype on the device of each site's weight: that costs as
    much memory again as the site weights (Llama-2-7B in bfloat16: 32 sites of
    4096 x 11008, 2.9 GB), plus a float32 scratch buffer of 1 MiB per thread that
    writes chunks (at most 8).

    :meth:`apply` writes a version into the model in place. A float32 site (and, off
    the CPU, a site whose weight has its base's dtype) is one multiply straight into
    the parameter. Any other site is multiplied in float32 a 1 MiB chunk of rows at a
    time and cast once into the parameter; on the CPU the chunks are shared among
    ``torch.get_num_threads()`` threads, each running torch single-threaded (the
    calling thread's count is 1 meanwhile, then restored). Not safe to call from two
    threads at once.

    With ``compile=True`` such a site is instead one kernel that widens, multiplies
    and rounds in a single pass (``torch.compile``; needs a C++ compiler on the CPU).
    The first :meth:`apply` pays the compilation (tens of seconds; torch keeps it in
    its on-disk cache for later processes); the bits are the same.
    """

    def __init__(self, ledger: Ledger, model: nn.Module, *, compile: bool = False) -> None:
        self.ledger = ledger
        self.model = model
        self._fused = torch.compile(_fused_write, dynamic=False) if compile else None
        self.version: int | None = None  # the version last applied; None before the first
        self._sites: list[Site] = list(ledger.sites)
        self._bases: dict[str, torch.Tensor] = {}
        for site, weight in self._weights(check_bases=False).items():
            base = ledger.base(site.name)
            if base.shape != weight.shape:
                raise self._mismatch(
                    site, f"has shape {tuple(weight.shape)}, the ledger's base {tuple(base.shape)}"
                )
            self._bases[site.name] = base.to(weight.device).contiguous()
        self._scratch: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, worker)
        self._plans: dict[str, tuple[_WeightKey, list[_Chunk]]] = {}  # site -> its chunks
        # site -> (factor, weight's data_ptr) as last written, for changed_only
        self._written: dict[str, tuple[torch.Tensor, int]] = {}
        # ((version, entry hash) of the newest entry, its factors), for apply("HEAD")
        self._head: tuple[tuple[int, str], dict[str, torch.Tensor]] | None = None

    def apply(self, at: str | int = "HEAD", *, changed_only: bool = False) -> int:
        """Writes the value matrices of version ``at`` into the model, in place.

        The result equals :meth:`Ledger.materialize` of the same version bit for bit.
        ``"HEAD"`` costs one journal read while nothing was committed since the last
        apply at ``"HEAD"`` (the factors are kept, keyed by the newest entry's version
        and hash); any other REF reads the sums from the ledger, as ``Ledger.sums``.
        By default every site is written, whatever the weights hold. With
        ``changed_only`` a site is skipped when the factor this LiveModel last wrote
        into the same parameter is the factor of ``at``: that assumes nothing else
        wrote the weights since (``Ledger.materialize``, ``load_state_dict``, training);
        after such a write, call ``apply`` without it once.

        Returns:
            The version written.

        Raises:
            RefNotFoundError: ``at`` names no version of the ledger.
            ModelMismatchError: a site's parameter is gone or changed shape since.
        """
        version, factors = self._factors(at)
        weights = self._weights()  # every site checked before the first write
        tasks: dict[torch.device, list[_Task]] = {}
        written: dict[str, tuple[torch.Tensor, int]] = {}
        with torch.no_grad():
            for site, weight in weights.items():
                factor = factors[site.name]
                if changed_only and self._unchanged(site.name, factor, weight):
                    continue
                base = self._bases[site.name]
                tasks.setdefault(base.device, []).extend(self._write(site, weight, factor))
                written[site.name] = (factor, weight.data_ptr())
            for device, chunks in tasks.items():
                self._run(device, chunks)
        self._written.update(written)
        self.version = version
        return version

    def _factors(self, at: str | int) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, site -> per-vector factor) of ``at``; HEAD's kept while HEAD stays."""
        if at != "HEAD":
            return self._read_factors(at)
        head = self.ledger.head()  # the newest entry: one journal file
        key = (head.version, head.hash)
        if self._head is None or self._head[0] != key:
            version, factors = self._read_factors("HEAD")
            if version != head.version:  # a writer committed in between: keep nothing
                return version, factors
            self._head = (key, factors)
        return head.version, self._head[1]

    def _read_factors(self, at: str | int) -> tuple[int, dict[str, torch.Tensor]]:
        version, weakening = self.ledger.sums(at)
        factors = {s.name: _factor(weakening, s.name) for s in self._sites}
        return version, factors

    def _unchanged(self, name: str, factor: torch.Tensor, weight: torch.Tensor) -> bool:
        last = self._written.get(name)
        return last is not None and last[1] == weight.data_ptr() and torch.equal(last[0], factor)

    def _write(self, site: Site, weight: torch.Tensor, factor: torch.Tensor) -> list[_Task]:
        """``weight <- (base.float() * factor along axis).to(weight.dtype)``, as ``kvw.weakened``.

        A float32 weight (or, off the CPU, one that has its base's dtype) is written
        here; any other is returned as chunks for :meth:`_run`.
        """
        base = self._bases[site.name]
        factor = factor.to(base.device)
        vectors = factor.unsqueeze(0) if site.axis == 1 else factor.unsqueeze(1)  # (1, n) or (n, 1)
        if (
            weight.device == base.device
            and (weight.dtype == torch.float32 or (weight.dtype == base.dtype and base.device.type != "cpu"))
        ):
            # A float32 weight: the product (bfloat16 and float16 widen exactly) is the
            # value. Off the CPU a mixed-dtype multiply casts in its kernel, computing in
            # float32 and rounding once into the output.
            torch.mul(base, vectors, out=weight)
            return []
        if self._fused is not None and weight.device == base.device:
            self._fused(base, vectors, weight)
            return []
        return [
            (chunk, target, vectors if site.axis == 1 else vectors[rows])
            for chunk, target, rows in self._plan(site, weight)
        ]

    def _run(self, device: torch.device, tasks: list[_Task]) -> None:
        """Writes the chunks, shared among up to ``torch.get_num_threads()`` threads on the CPU.

        Each thread runs torch single-threaded: hundreds of small operations under
        OpenMP would each end in a barrier, which stalls whenever another process holds
        a core; threads of their own only meet once, at the end.
        """
        if not tasks:
            return
        n = min(torch.get_num_threads(), _MAX_WORKERS, len(tasks)) if device.type == "cpu" else 1
        scratch = [self._scratch_on(device, k) for k in range(n)]
        if n <= 1:
            _write_chunks(tasks, scratch[0])
            return
        failures: list[BaseException] = []

        def work(k: int) -> None:
            try:
                with torch.no_grad():
                    _write_chunks(tasks[k::n], scratch[k])
            except BaseException as e:  # re-raised in the caller's thread below
                failures.append(e)

        with torch_threads(1):  # threads started inside take one torch thread each
            threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(1, n)]
            for thread in threads:
                thread.start()
            work(0)
            for thread in threads:
                thread.join()
        if failures:
            raise failures[0]

    def _plan(self, site: Site, weight: torch.Tensor) -> list[_Chunk]:
        """(base rows, weight rows, rows) per chunk of a site's rows.

        Kept while the weight is the same memory with the same layout (the views keep
        that memory alive, so a replaced parameter never matches), rebuilt otherwise.
        """
        key: _WeightKey = (weight.data_ptr(), weight.stride(), weight.dtype, weight.device)
        kept = self._plans.get(site.name)
        if kept is not None and kept[0] == key:
            return kept[1]
        base = self._bases[site.name]
        step = max(1, _CHUNK // max(1, base.shape[1]))
        plan: list[_Chunk] = []
        for start in range(0, base.shape[0], step):
            rows = slice(start, start + step)
            plan.append((base[rows], weight[rows], rows))
        self._plans[site.name] = (key, plan)
        return plan

    def _scratch_on(self, device: torch.device, worker: int) -> torch.Tensor:
        """One float32 buffer per device and worker, as large as the largest chunk."""
        scratch = self._scratch.get((device, worker))
        if scratch is None:
            size = max(
                min(rows, max(1, _CHUNK // max(1, cols))) * cols
                for rows, cols in (b.shape for b in self._bases.values() if b.device == device)
            )
            scratch = torch.empty(size, dtype=torch.float32, device=device)
            self._scratch[(device, worker)] = scratch
        return scratch

    def _weights(self, *, check_bases: bool = True) -> dict[Site, torch.Tensor]:
        """site -> its live weight (a view), each checked against the ledger's site."""
        weights = {site: self._weight(site) for site in self._sites}
        if check_bases:
            for site, weight in weights.items():
                base = self._bases[site.name]
                if weight.shape != base.shape:
                    raise self._mismatch(
                        site, f"now has shape {tuple(weight.shape)}, not {tuple(base.shape)}"
                    )
        return weights

    def _weight(self, site: Site) -> torch.Tensor:
        try:
            weight = site_weight(self.model, site)
        except (AttributeError, IndexError) as e:
            raise self._mismatch(site, f"is missing ({e})") from e
        if weight.dim() != 2 or weight.shape[site.axis] != site.n_vectors:
            raise self._mismatch(
                site,
                f"has shape {tuple(weight.shape)}, not {site.n_vectors} value vectors along axis {site.axis}",
            )
        return weight

    def _mismatch(self, site: Site, what: str) -> ModelMismatchError:
        made_for = self.ledger.model_info.get("model_type") or self.ledger.model_info.get("dir")
        return ModelMismatchError(
            f"site {site.name!r}: the model's parameter {site.param!r}"
            f"{'' if site.expert is None else f' (expert {site.expert})'} {what}; "
            f"pass the model this ledger was made for ({made_for})"
        )


def _factor(weakening: Weakening, site: str) -> torch.Tensor:
    """``exp(S - W)`` of one site, by the operations ``kvw.weakened`` uses, on the CPU.

    The base ``materialize`` reads lives on the CPU, so its factor is computed there;
    doing the same here (then moving it) keeps the bits of ``exp`` identical.
    """
    w = weakening.exponents[site].to(device="cpu", dtype=torch.float32)
    scale = weakening.log_scale(site)
    if scale is None:
        return torch.exp(-w)
    return torch.exp(scale.to(device="cpu", dtype=torch.float32) - w)


def _fused_write(base: torch.Tensor, vectors: torch.Tensor, weight: torch.Tensor) -> None:
    """The chunks' arithmetic on a whole site, for ``torch.compile`` to fuse into one pass."""
    product = base.to(torch.float32) * vectors
    weight.copy_(product)


def _write_chunks(tasks: list[_Task], scratch: torch.Tensor) -> None:
    """Each chunk: widen to float32 in ``scratch``, multiply, cast once into the weight."""
    for chunk, target, vectors in tasks:
        product = scratch[: chunk.numel()].view(chunk.shape)  # (rows, n_cols) float32
        product.copy_(chunk)  # exact for bfloat16/float16, as base.to(torch.float32)
        product.mul_(vectors)
        target.copy_(product)  # the one cast
