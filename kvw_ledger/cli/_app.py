"""The ``kvw-ledger`` command group; each verb module registers its verbs on ``main``."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from kvw_ledger.cli._common import _DATA_PARALLEL, _Group
from kvw_ledger.errors import ImageOnlyProcessorWarning
from kvw_ledger.interrupts import redeliver_swallowed


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvw-ledger")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Sequential unlearning with Knowledge Vector Weakening, kept in a versioned ledger.

    LEDGER is a directory, or an fsspec URL (s3://bucket/ledger...) worked on through
    a local mirror under $KVW_LEDGER_CACHE. REF is a version number, a request id,
    HEAD or HEAD~N. Every verb takes --json: one JSON object (or list) on stdout,
    errors included, with the same exit codes: 0 ok, 1 a failed check, 2 bad input.

    \b
    Example:
      kvw-ledger init ledger/ --model path/to/model
      kvw-ledger retain ledger/ retain.jsonl
      kvw-ledger forget ledger/ alice.jsonl --id alice
      kvw-ledger log ledger/

    Under torchrun (or accelerate launch), retain and forget run data parallel;
    other verbs run in one process.
    """
    warnings.showwarning = _show_warning
    sys.unraisablehook = redeliver_swallowed  # a Ctrl-C dropped inside garbage collection is resent
    size = os.environ.get("WORLD_SIZE", "1")
    if ctx.invoked_subcommand not in _DATA_PARALLEL and size not in ("", "0", "1"):
        click.echo(
            f"Error: kvw-ledger {ctx.invoked_subcommand} runs in one process, not under torchrun "
            f"(WORLD_SIZE={size}); only {' and '.join(_DATA_PARALLEL)} run data parallel. "
            "Run it without the launcher",
            err=True,
        )
        sys.exit(2)


_default_showwarning = warnings.showwarning


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """This package's warnings as one "Warning: ..." line on stderr; others as Python shows them."""
    if issubclass(category, ImageOnlyProcessorWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _default_showwarning(message, category, *args, **kwargs)
