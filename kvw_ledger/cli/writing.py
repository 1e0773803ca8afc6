"""The writes that prepare and keep up a ledger: ``init``, ``retain``, ``probe``,
``gc`` and ``repair``."""

from __future__ import annotations

import click

from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _data_parallel, _dump, _errors, _open, _open_for, _world, _writes
from kvw_ledger.cli._options import (
    DATA,
    DATA_FORMAT,
    JSON,
    LABEL_EOS,
    LEDGER,
    MODEL,
    OPERATOR,
    QUIET,
    _device_map_options,
    _limit_options,
    _limits,
    _operator,
    _placement_options,
)
from kvw_ledger.journal import Entry

# The towers sites.py knows (``sites.TOWER_CHOICES``, which imports torch); listed here
# so that ``--help`` stays light. tests/test_docs.py holds the two equal.
TOWER_CHOICES = ("language", "vision", "all")
# The retain statistics retain_stat.py knows (``retain_stat.STATISTICS``: it imports torch),
# for the same reason; tests/test_retain_stat.py holds the two equal.
STATISTICS = ("mean", "q90", "q99", "max")


@main.command()
@LEDGER
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Hugging Face model directory: safetensors weights, config.json, and a tokenizer or processor with an eos token.",
)
@click.option(
    "--sites",
    "towers",
    type=click.Choice(TOWER_CHOICES),
    default="language",
    show_default=True,
    help="Which towers' FFNs to track.",
)
@click.option(
    "--site-glob",
    help="fnmatch pattern naming the FFN value projections of an architecture the table does not know.",
)
@QUIET
@_device_map_options
@OPERATOR
@_writes
def init(ledger: str, model_dir: str, towers: str, site_glob: str | None, quiet: bool) -> Entry:
    """Create a ledger for a model: copy its FFN value matrices as the base (version 1).

    \b
    Example:
      kvw-ledger init ledger/ --model path/to/model
      kvw-ledger init ledger/ --model llava-dir --sites all
    """
    from kvw_ledger.ledger import Ledger

    created = Ledger.create(
        ledger, model_dir, towers=towers, site_glob=site_glob, progress=not quiet,
        device_map=click.get_current_context().meta.get("kvw.device_map"),
        operator=_operator(),
    )
    click.echo(f"created {created.location}: {len(created.sites)} sites, version 1")
    return created.head()


@main.command(
    help=f"""Measure retain statistics (C_r) on DATA and register them.

    {DATA_FORMAT}

    \b
    Example:
      kvw-ledger retain ledger/ retain.jsonl
      kvw-ledger retain ledger/ retain-v2.jsonl --id r2 --at HEAD
    """
)
@LEDGER
@DATA
@click.option("--id", "stats_id", help="Id of the retain statistics (default retain-N).")
@click.option("--at", default="HEAD", show_default=True, help="REF of the version to measure on.")
@click.option(
    "--batch-size",
    type=int,
    default=1,
    show_default=True,
    help="Retain records per forward pass; for a quantile or max, the batch size of the batch means.",
)
@_placement_options
@click.option(
    "--statistic",
    type=click.Choice(STATISTICS),
    default="mean",
    show_default=True,
    help="What C_f is compared with: the pooled mean (the paper), or per neuron the 90th/99th "
    "percentile or the maximum of retain batch means at --batch-size.",
)
@LABEL_EOS
@MODEL
@QUIET
@_device_map_options
@_data_parallel
@OPERATOR
@_writes
def retain(
    ledger: str,
    data: str,
    stats_id: str | None,
    at: str,
    batch_size: int,
    statistic: str,
    label_eos: bool | None,
    model_dir: str | None,
    device: str,
    dtype: str,
    quiet: bool,
) -> Entry:
    world = _world()  # under torchrun: every rank measures a share of each batch
    entry = _open_for(ledger, world).retain(
        data,
        stats_id=stats_id,
        at=at,
        batch_size=batch_size,
        statistic=statistic,
        label_eos=bool(label_eos),
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
        world=world,
    )
    kind = "" if statistic == "mean" else f" ({statistic} of batch means at batch size {batch_size})"
    click.echo(
        f"version {entry.version}: retain stats {entry.body['stats']}{kind} from "
        f"{entry.body['records']} records"
    )
    return entry


@main.command()
@LEDGER
@click.option(
    "--retain",
    "retain_probe",
    type=click.Path(dir_okay=False),
    help="Retain probe set (JSONL); stored in the ledger.",
)
@click.option(
    "--general",
    "general_probe",
    type=click.Path(dir_okay=False),
    help="General-ability probe set (JSONL); stored in the ledger.",
)
@_limit_options
@_placement_options
@MODEL
@QUIET
@_device_map_options
@OPERATOR
@_writes
def probe(
    ledger: str,
    retain_probe: str | None,
    general_probe: str | None,
    max_attenuation: float | None,
    max_retain_drop: float | None,
    max_nll_increase: float | None,
    max_zeroed: float | None,
    zero_floor: float | None,
    on_fail: str | None,
    model_dir: str | None,
    device: str,
    dtype: str,
    quiet: bool,
) -> Entry:
    """Register probe sets and/or this ledger's stability limits; later steps are checked against them.

    \b
    Example:
      kvw-ledger probe ledger/ --retain retain-probe.jsonl --general general.jsonl
      kvw-ledger probe ledger/ --max-attenuation 0.3 --max-retain-drop 0.02
    """
    opened = _open(ledger)
    entry = opened.probe(
        retain=retain_probe,
        general=general_probe,
        limits=_limits(
            opened, max_attenuation, max_retain_drop, max_nll_increase, on_fail, max_zeroed, zero_floor
        ),
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
    )
    for kind, p in sorted(entry.body["probes"].items()):
        figures = entry.body["figures"][kind]
        click.echo(
            f"{kind} probe: {p['records']} records; base acc {p['base']['acc']:.3f} nll {p['base']['nll']:.3f}; "
            f"HEAD acc {figures['acc']:.3f} nll {figures['nll']:.3f}"
        )
    if entry.body["limits"]:
        click.echo(
            "limits: " + ", ".join(f"{k} {v}" for k, v in sorted(entry.body["limits"].items()))
        )
    click.echo(f"version {entry.version}: probe registered")
    return entry


@main.command()
@LEDGER
@click.option(
    "--reverted", is_flag=True, help="Delete the arrays of reverted requests (needed: the only garbage gc collects)."
)
@OPERATOR
@_writes
def gc(ledger: str, reverted: bool) -> Entry:
    """Delete reverted requests' arrays for good; the journal keeps their hashes as tombstones.

    \b
    Example:
      kvw-ledger gc ledger/ --reverted
    """
    entry = _open(ledger).gc(reverted=reverted)
    deleted = entry.body["deleted"]
    click.echo(
        f"version {entry.version}: deleted {len(entry.body['deleted_files'])} files of "
        f"{len(deleted)} reverted request(s): {', '.join(deleted) or '-'}"
    )
    return entry


@main.command()
@LEDGER
@JSON
@_errors
def repair(ledger: str, as_json: bool) -> None:
    """Move a torn newest journal entry aside (into LEDGER/repair/), with a record of it.

    Acts only when the newest entry file is not a valid entry; a valid one is never
    touched, and any other damage is refused (exit 1). Run it after an error such as
    "journal/00000007.json is not a valid journal entry".

    \b
    Example:
      kvw-ledger repair ledger/
      kvw-ledger repair ledger/ --json
    """
    record = _open(ledger).repair()
    if as_json:
        _dump(record)
    elif not record["repaired"]:
        click.echo(f"{record['message']} ({record['newest']}); nothing was changed")
    else:
        click.echo(f"moved {record['moved']} to {record['to']} (record.json beside it)")
        for prefix in record["moved_arrays"]:
            click.echo(f"moved {prefix} (no remaining entry names it) beside it")
        click.echo(f"HEAD is version {record['head_after']}")
