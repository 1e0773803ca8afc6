"""Retain statistics: measuring C_r in one process and writing ``retain/<id>`` with
the body of the entry that registers it (``Ledger.retain``, ``revert --retain-with``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvw_ledger import data, retain_stat
from kvw_ledger.distributed import World
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
    return write_retain(ledger, records, stats_id, version, batch_size, statistic, label_eos, measured.values,
        measured.counts, measured.batches,
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


def batches(
    examples: Sequence[data.Example], batch_size: int, pad_token_id: int, world: World
) -> Iterable[data.Batch] | list[list[data.Example]]:
    """Retain batches: collated for one process; under data parallel the examples of each,
    which every rank sees alike and measures its share of."""
    if not world.parallel:
        return data.iter_batches(examples, batch_size, pad_token_id)
    return [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
