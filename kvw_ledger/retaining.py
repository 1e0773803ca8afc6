"""Retain statistics: ``retain`` measures C_r (in one process, or a data-parallel job)
and writes ``retain/<id>`` with the body of the entry that registers it; ``revert
--retain-with`` measures through the same code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger import coefficients, data, refs, retain_stat, session, staging, weights
from kvw_ledger.devices import Placement
from kvw_ledger.distributed import LOCAL, World
from kvw_ledger.errors import BadInputError
from kvw_ledger.journal import Entry
from kvw_ledger.loading import max_length
from kvw_ledger.store import Store

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def measure_retain(
    ledger: Ledger,
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
        model, ledger.sites, examples, statistic, batch_size, encoder.pad_token_id, progress=progress
    )
    return write_retain(
        ledger, records, stats_id, version, batch_size, statistic, label_eos,
        measured.values, measured.counts, measured.batches,
    )


def write_retain(
    ledger: Ledger,
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
    prefix = Store.retain_path(stats_id)
    ledger._current().claim(prefix)
    files, hashes = ledger.store.write_sites(prefix, {s.name: values[s.name] for s in ledger.sites})
    files.update(ledger.store.group_files(prefix))
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


def retain_batches(
    examples: Sequence[data.Example], batch_size: int, pad_token_id: int, world: World
) -> Iterable[data.Batch] | list[list[data.Example]]:
    """Retain batches: collated for one process; under data parallel the examples of each,
    which every rank sees alike and measures its share of."""
    if not world.parallel:
        return data.iter_batches(examples, batch_size, pad_token_id)
    return [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def retain(
    ledger: Ledger,
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
    """The body of :meth:`Ledger.retain`, which documents it."""
    placement = Placement.resolve(weights.rank_device(device, world), dtype)  # fails before anything runs
    retain_stat.check_statistic(statistic)
    if statistic != "mean" and world.parallel:
        raise BadInputError(
            f"--statistic {statistic} is measured in one process; under torchrun use --statistic mean"
        )
    progress = progress and world.is_main
    records = world.call(data.read_records, data_path)
    with session.parallel_write(ledger, "retain", world) as write:
        entries = ledger.entries()[: write.head.version]
        version = ledger.resolve(at, entries)
        head = entries[-1]
        stats_id = refs.check_id(f"retain-{head.version + 1}" if stats_id is None else stats_id, "retain stats id")
        state = ledger.state(head.version)
        if stats_id in state.retain_stats:
            raise BadInputError(f"retain stats {stats_id!r} already exist; choose another --id")
        staging.check_reads(ledger, "retain", ledger.state(version))
        model, processor = weights.load(ledger, model_dir, version, placement, progress)
        encoder = data.Encoder(processor, max_length(model), label_eos=label_eos)
        examples = data.encode_all(encoder, records)
        batches = retain_batches(examples, batch_size, encoder.pad_token_id, world)
        total = -(-len(examples) // batch_size)
        write.ready()
        if statistic == "mean":
            measured = coefficients.collect(
                model, ledger.sites, batches, total=total, desc="retain", progress=progress,
                world=world, pad_token_id=encoder.pad_token_id,
            )
            if not world.is_main:
                return session.entry_at(ledger, write.finish())
            means = measured.means()
            values = {s.name: means[s.name].cpu() for s in ledger.sites}
            counts = {s.name: int(measured.counts[s.name]) for s in ledger.sites}
            n_batches = total
        else:
            stat = retain_stat.measure(
                model, ledger.sites, examples, statistic, batch_size, encoder.pad_token_id, progress=progress
            )
            values, counts, n_batches = stat.values, stat.counts, stat.batches
        files, body = write_retain(ledger, records, stats_id, version, batch_size, statistic, label_eos, values, counts, n_batches
        )
        body["active"] = state.active
        return ledger._current().commit("retain", body, files, parent=head)  # same active set, new version
