"""``tune``: the gamma and layer-bucket sweep on a staged copy."""

from __future__ import annotations

import sys

import click

from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _dump, _errors, _open
from kvw_ledger.cli._options import (
    JSON,
    LEDGER,
    MODEL,
    QUIET,
    _device_map_options,
    _placement_options,
)


@main.command()
@LEDGER
@click.argument("forget_val", type=click.Path(dir_okay=False))
@click.argument("retain_val", type=click.Path(dir_okay=False))
@click.option(
    "--gammas",
    default="0.01,0.02,0.05,0.1",
    show_default=True,
    help="Comma-separated gammas to try.",
)
@click.option(
    "--layer-buckets",
    default="1:8,9:16,17:25,1:25",
    show_default=True,
    help="Comma-separated layer ranges START:END to try (0-based, inclusive, clipped to the model).",
)
@click.option(
    "--batch-size", type=int, default=1, show_default=True, help="Forget records per batch."
)
@click.option(
    "--epochs", type=int, default=1, show_default=True, help="Passes over the forget data."
)
@click.option("--retain-stats", help="Retain stats id (default: the latest registered).")
@click.option(
    "--max-retain-drop",
    type=float,
    help="Retain accuracy drop allowed (default: the ledger's, 0.05).",
)
@click.option(
    "--rescale",
    is_flag=True,
    help="Restore each weakened site's Frobenius norm, as forget --rescale does.",
)
@_placement_options
@MODEL
@QUIET
@JSON
@_device_map_options
@_errors
def tune(
    ledger: str,
    forget_val: str,
    retain_val: str,
    gammas: str,
    layer_buckets: str,
    batch_size: int,
    epochs: int,
    retain_stats: str | None,
    max_retain_drop: float | None,
    rescale: bool,
    model_dir: str | None,
    device: str,
    dtype: str,
    quiet: bool,
    as_json: bool,
) -> None:
    """Sweep gamma and layer buckets on a staged copy (nothing is committed) and recommend one.

    FORGET_VAL and RETAIN_VAL are JSONL files in the DATA format of forget. Exits 1,
    after the table, when no setting forgets anything within the retain limit.

    \b
    Example:
      kvw-ledger tune ledger/ forget-val.jsonl retain-val.jsonl --gammas 0.02,0.05 --layer-buckets 1:8,1:25
    """
    from kvw_ledger.tune import parse_buckets, parse_gammas
    from kvw_ledger.tune import tune as run_tune

    opened = _open(ledger)
    depth = max(s.layer for s in opened.sites)
    buckets = [(a, min(b, depth)) for a, b in parse_buckets(layer_buckets) if a <= depth]
    if not buckets:
        raise click.BadParameter(
            f"no bucket lies inside this model's layers 0:{depth}", param_hint="--layer-buckets"
        )
    result = run_tune(
        opened,
        forget_val,
        retain_val,
        parse_gammas(gammas),
        sorted(set(buckets)),
        batch_size=batch_size,
        epochs=epochs,
        retain_stats=retain_stats,
        max_retain_drop=max_retain_drop,
        rescale=rescale,
        model_dir=model_dir,
        progress=not quiet,
        device=device,
        dtype=dtype,
    )
    if as_json:
        _dump(result)
        if result["recommended"] is None:
            sys.exit(1)
        return
    base = result["baseline"]
    click.echo(
        f"HEAD: forget acc {base['forget']['acc']:.3f}, retain acc {base['retain']['acc']:.3f}; "
        f"retain drop limit {result['limit']}"
    )
    click.echo(
        f"{'gamma':>8}  {'layers':<8}{'forget acc':>11}{'retain acc':>11}{'forget drop':>12}{'retain drop':>12}"
    )
    for r in result["rows"]:
        mark = "" if r["within_limit"] else "  over limit"
        click.echo(
            f"{r['gamma']:>8g}  {r['layers'][0]}:{r['layers'][1]:<6}{r['forget_acc']:>11.3f}"
            f"{r['retain_acc']:>11.3f}{r['forget_drop']:>12.3f}{r['retain_drop']:>12.3f}{mark}"
        )
    rec = result["recommended"]
    if rec is None:
        click.echo(f"Error: nothing to recommend: {result['why_none']}", err=True)
        sys.exit(1)
    else:
        click.echo(
            f"recommended: --gamma {rec['gamma']:g} --layers {rec['layers'][0]}:{rec['layers'][1]}"
            + (" --rescale" if rescale else "")
        )
