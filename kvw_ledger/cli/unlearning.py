"""The writes that change what is forgotten: ``forget``, ``revert`` and ``rederive``."""

from __future__ import annotations

import click

from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _data_parallel, _open, _open_for, _world, _writes
from kvw_ledger.cli._options import (
    DATA,
    DATA_FORMAT,
    LABEL_EOS,
    LEDGER,
    MODEL,
    OPERATOR,
    QUIET,
    _device_map_options,
    _limit_options,
    _limits,
    _placement_options,
)
from kvw_ledger.journal import Entry


@main.command(
    help=f"""Apply one deletion request: weaken what DATA activates, check, then commit.

    {DATA_FORMAT}

    \b
    Example:
      kvw-ledger forget ledger/ alice.jsonl --id alice --reason "GDPR art. 17, ticket 123"
      kvw-ledger forget ledger/ bob.jsonl --layers 0:3 --gamma 0.05 --on-fail warn
    """
)
@LEDGER
@DATA
@click.option("--id", "request_id", help="Request id (default request-N).")
@click.option("--reason", default="", help="Why this request was made (kept in the journal).")
@click.option(
    "--gamma", type=float, default=0.02, show_default=True, help="Weakening strength per batch."
)
@click.option(
    "--layers",
    default="1:25",
    show_default=True,
    help="Layer range START:END, 0-based and inclusive, clipped to the model's depth "
    "(the default skips layer 0, as the paper does).",
)
@click.option(
    "--batch-size",
    type=int,
    default=1,
    show_default=True,
    help="Forget records per batch (one gate per batch).",
)
@click.option(
    "--epochs", type=int, default=1, show_default=True, help="Passes over the forget data."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Shuffle seed of the forget batches."
)
@click.option("--retain-stats", help="Retain stats id (default: the latest registered).")
@click.option(
    "--no-trace", is_flag=True, help="Do not keep per-batch C_f (fast re-derivation needs it)."
)
@click.option(
    "--rescale",
    is_flag=True,
    help="Restore each weakened site's Frobenius norm after every batch (the authors' option).",
)
@click.option(
    "--forget-probe",
    type=click.Path(dir_okay=False),
    help="JSONL whose figures are recorded as efficacy (never stored).",
)
@click.option(
    "--target-forget",
    type=float,
    help="Search gamma (from --gamma, by doubling then bisection) for the smallest whose "
    "--forget-probe generation accuracy is at most this within the stability limits; commit it.",
)
@LABEL_EOS
@_limit_options
@_placement_options
@MODEL
@QUIET
@_device_map_options
@_data_parallel
@OPERATOR
@_writes
def forget(
    ledger: str,
    data: str,
    request_id: str | None,
    reason: str,
    gamma: float,
    layers: str,
    batch_size: int,
    epochs: int,
    seed: int,
    retain_stats: str | None,
    no_trace: bool,
    rescale: bool,
    forget_probe: str | None,
    target_forget: float | None,
    label_eos: bool | None,
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
    """--label-eos defaults to what the retain stats were measured with."""
    from kvw_ledger.kvw import KVWConfig
    from kvw_ledger.sites import parse_layers
    from kvw_ledger.target import TargetSearch

    config = KVWConfig(
        gamma=gamma,
        layers=parse_layers(layers),
        batch_size=batch_size,
        epochs=epochs,
        seed=seed,
        keep_trace=not no_trace,
        rescale=rescale,
    )
    world = _world()  # under torchrun: every rank measures a share of each batch
    opened = _open_for(ledger, world)
    entry = opened.forget(
        data,
        request_id=request_id,
        reason=reason,
        config=config,
        retain_stats=retain_stats,
        limits=_limits(
            opened, max_attenuation, max_retain_drop, max_nll_increase, on_fail, max_zeroed, zero_floor
        ),
        forget_probe=forget_probe,
        label_eos=label_eos,
        target=None if target_forget is None else TargetSearch(target_forget),
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
        world=world,
    )
    body = entry.body
    if "target" in body:
        for t in body["target"]["trials"]:
            click.echo(
                f"  gamma {t['gamma']:<10.4g} forget acc {t['forget_acc']:.3f}"
                + ("" if t["stable"] else "  unstable")
            )
        click.echo(
            f"chose gamma {body['target']['chosen_gamma']:.4g}: the smallest with forget acc "
            f"<= {body['target']['forget_acc']:g} within the limits"
        )
    click.echo(
        f"version {entry.version}: request {body['request']} applied "
        f"({body['records']} records, {body['batches']} batches, {body['tokens']} answer tokens)"
    )
    _warn_failed(entry)
    return entry


@main.command()
@LEDGER
@click.argument("request_id")
@click.option("--reason", default="", help="Why the request is taken back (kept in the journal).")
@click.option(
    "--retain-with",
    type=click.Path(dir_okay=False),
    help="Retain set that again holds the withdrawn data: register retain stats on it and "
    "re-derive the other active requests fast, in the same entry.",
)
@click.option("--retain-id", help="Id of the retain stats --retain-with registers (default retain-N).")
@_limit_options
@_placement_options
@MODEL
@QUIET
@_device_map_options
@OPERATOR
@_writes
def revert(
    ledger: str,
    request_id: str,
    reason: str,
    retain_with: str | None,
    retain_id: str | None,
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
    """Take one request back; later requests stay active. History is appended, never rewritten.

    \b
    Example:
      kvw-ledger revert ledger/ alice --reason "request withdrawn"
    """
    opened = _open(ledger)
    entry = opened.revert(
        request_id,
        reason=reason,
        retain_with=retain_with,
        retain_id=retain_id,
        limits=_limits(
            opened, max_attenuation, max_retain_drop, max_nll_increase, on_fail, max_zeroed, zero_floor
        ),
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
    )
    rederived = entry.body.get("rederived")
    if rederived is not None:
        click.echo(
            f"retain stats {rederived['stats']} registered; re-derived (fast): "
            f"{', '.join(rederived['requests']) or '-'}"
        )
    click.echo(
        f"version {entry.version}: request {request_id} reverted; active: {', '.join(entry.body['active']) or '-'}"
    )
    _warn_failed(entry)
    return entry


@main.command()
@LEDGER
@click.argument("request_ids", nargs=-1)
@click.option(
    "--retain-stats", "stats_id", required=True, help="Retain stats id to re-derive with."
)
@click.option(
    "--exact",
    "exact",
    multiple=True,
    metavar="REQUEST_ID=DATA.jsonl",
    help="Re-run the progressive loop for this request on its original data (repeatable).",
)
@_limit_options
@_placement_options
@MODEL
@QUIET
@_device_map_options
@OPERATOR
@_writes
def rederive(
    ledger: str,
    request_ids: tuple[str, ...],
    stats_id: str,
    exact: tuple[str, ...],
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
    """Recompute requests (default: all active) with other retain stats, as one atomic entry.

    \b
    Example:
      kvw-ledger rederive ledger/ --retain-stats r2
      kvw-ledger rederive ledger/ alice --retain-stats r2 --exact alice=alice.jsonl
    """
    pairs = {}
    for item in exact:
        request_id, sep, path = item.partition("=")
        if not sep or not request_id or not path:
            raise click.BadParameter(
                f"{item!r} must look like REQUEST_ID=DATA.jsonl", param_hint="--exact"
            )
        if request_id in pairs:
            raise click.BadParameter(f"request {request_id!r} is given twice", param_hint="--exact")
        pairs[request_id] = path
    opened = _open(ledger)
    entry = opened.rederive(
        stats_id,
        list(request_ids),
        exact=pairs,
        limits=_limits(
            opened, max_attenuation, max_retain_drop, max_nll_increase, on_fail, max_zeroed, zero_floor
        ),
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
    )
    for request_id, change in entry.body["requests"].items():
        click.echo(f"{request_id}: re-derived ({change['mode']})")
    click.echo(
        f"version {entry.version}: {len(entry.body['requests'])} request(s) re-derived with {stats_id}"
    )
    _warn_failed(entry)
    return entry


def _warn_failed(entry: Entry) -> None:
    """Says on stderr which checks a step committed with --on-fail warn failed."""
    for c in entry.body.get("stability", {}).get("failed", []):
        click.echo(
            f"Warning: committed although {c['name']} failed: {c['value']:.4g} (limit {c['limit']:.4g})",
            err=True,
        )
