"""``kvw-ledger``: a thin click face over :class:`kvw_ledger.ledger.Ledger`.

The library raises typed errors; only this package turns them into messages and
exit codes: 0 success, 1 a failed check, 2 bad input, 75 another writer in the way
(try again later). With ``--json`` (every
verb has it) the result, or the error as ``{"error", "exit_code"}``, is one JSON
object on stdout, and the exit code is the same.

Each verb imports torch, transformers and zarr inside itself, only when it needs them:
``--help``, ``log`` and ``show`` of a non-forget entry read JSON files only.

``_options`` holds the options the verbs share, ``_common`` how a verb runs (errors,
``--json``, Ctrl-C, opening the ledger), ``_app`` the ``main`` group; each verb module
registers its verbs on ``main`` as this package imports it.
"""

from kvw_ledger.cli import (  # noqa: F401  (imported for their verbs, which register on main)
    auditing,
    exporting,
    reading,
    standalone,
    tuning,
    unlearning,
    writing,
)
from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import INTERRUPTED

__all__ = ["INTERRUPTED", "main"]
