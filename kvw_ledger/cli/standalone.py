"""The verbs that need no ledger: ``demo`` (a ledger's whole life on a bundled model)
and ``import`` (benchmark data converted to JSONL)."""

from __future__ import annotations

from pathlib import Path

import click

from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _dump, _errors
from kvw_ledger.cli._options import JSON


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="kvw-demo",
    show_default=True,
    help="Directory for the demo's model, data and ledger.",
)
@JSON
@_errors
def demo(workdir: str, as_json: bool) -> None:
    """Run the main job: a ledger's whole life on a small bundled model.

    \b
    Example:
      kvw-ledger demo --workdir kvw-demo
    """
    from kvw_ledger.demo import run_demo

    report = run_demo(Path(workdir), echo=None if as_json else click.echo)
    if as_json:
        _dump(report)


@main.command("import")
@click.argument("benchmark", type=click.Choice(["mllmu", "clear", "tofu"]))
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--split",
    "splits",
    multiple=True,
    metavar="NAME",
    help="A config to import (repeatable), e.g. forget_5; default: every known one in SOURCE.",
)
@JSON
@_errors
def import_(benchmark: str, source: str, out_dir: str, splits: tuple[str, ...], as_json: bool) -> None:
    """Convert a local copy of MLLMU-Bench, CLEAR or TOFU into JSONL data files.

    SOURCE is laid out as on the dataset hub: one folder per config holding its
    parquet files. Each config becomes OUT_DIR/<config>.jsonl; images are written
    under OUT_DIR/images/. Multiple-choice items keep their options and the
    correct index.

    \b
    Example:
      kvw-ledger import mllmu MLLMU-Bench/ data/ --split forget_5 --split retain_95
      kvw-ledger import tofu TOFU/ data/tofu/ --json
    """
    from kvw_ledger.importers import import_benchmark

    report = import_benchmark(benchmark, source, out_dir, splits)
    if as_json:
        _dump(report.to_dict())
        return
    for s in report.splits:
        extras = f", {s.multiple_choice} multiple choice" if s.multiple_choice else ""
        skipped = f", {s.skipped} without an answer left out" if s.skipped else ""
        click.echo(f"{s.name}: {s.records} records{extras}, {s.images} new images{skipped} -> {s.file}")
