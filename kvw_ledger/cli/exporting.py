"""``export``: a version as a Hugging Face model directory or a peft adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kvw_ledger import views
from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _open, _writes
from kvw_ledger.cli._options import LEDGER, MODEL, QUIET


@main.command()
@LEDGER
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--at", default="HEAD", show_default=True, help="REF of the version to export.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "peft"]),
    default="safetensors",
    show_default=True,
    help="safetensors: a whole model directory; peft: an IA3 adapter for the base model.",
)
@MODEL
@QUIET
@_writes
def export(
    ledger: str, out_dir: str, at: str, fmt: str, model_dir: str | None, quiet: bool
) -> dict[str, Any]:
    """Write a version as a Hugging Face model directory (no ledger data inside).

    OUT_DIR gets the weights, config and tokenizer files, and kvw_provenance.json:
    ledger_version and entry_hash (the version exported), head_hash (the ledger's
    HEAD then) and active_requests. With --format peft, OUT_DIR is a peft IA3
    adapter for the base model instead: PeftModel.from_pretrained(base, OUT_DIR).

    \b
    Example:
      kvw-ledger export ledger/ served-model/
      kvw-ledger export ledger/ version-3/ --at 3
      kvw-ledger export ledger/ adapter-v3/ --at 3 --format peft
    """
    from kvw_ledger.export import PROVENANCE_FILE

    opened = _open(ledger)
    version = opened.export(out_dir, at=at, model_dir=model_dir, progress=not quiet, format=fmt)
    path = Path(out_dir)
    provenance = json.loads((path / PROVENANCE_FILE).read_text(encoding="utf-8"))
    click.echo(f"exported version {version} to {path}")
    return {
        "path": str(path),
        "version": version,
        "id": views.entry_json(opened.journal.get(version))["id"],
        "hash": provenance["entry_hash"],
        "head_hash": provenance["head_hash"],
        "active": provenance["active_requests"],
    }
