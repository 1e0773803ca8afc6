"""The options, arguments and help text that several verbs share.

``--operator``, ``--device-map`` and ``--offload-folder`` never reach the verb: they
leave their value in the click context's ``meta``, where
:func:`kvw_ledger.cli._common._open` reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kvw_ledger.devices import DEVICE_CHOICES, DTYPE_CHOICES
from kvw_ledger.errors import KVWLedgerError

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger
    from kvw_ledger.stability import StabilityLimits


F = TypeVar("F", bound=Callable[..., Any])


def _operator() -> str | None:
    """The --operator of the running command, if it was given (checked by its callback)."""
    context = click.get_current_context(silent=True)
    return None if context is None else context.meta.get("kvw_ledger.operator")


def _set_operator(context: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        from kvw_ledger.journal import check_operator

        try:
            context.meta["kvw_ledger.operator"] = check_operator(value)
        except KVWLedgerError as e:
            raise click.BadParameter(str(e), param_hint="--operator") from e


# Not passed to the command: _open() reads it, so each write verb needs only this line.
OPERATOR = click.option(
    "--operator",
    metavar="NAME",
    expose_value=False,
    callback=_set_operator,
    help="Who acts, recorded in the journal entry (default $KVW_LEDGER_OPERATOR, else user@host).",
)


LEDGER = click.argument("ledger", type=click.Path(file_okay=False))
DATA = click.argument("data", type=click.Path(dir_okay=False))
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
MODEL = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Model directory (default: the one given to init).",
)
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
LABEL_EOS = click.option(
    "--label-eos/--no-label-eos",
    default=None,
    help="Also count the position that predicts the eos or end-of-turn token (the behaviour "
    "before the authors' answer-only positions became the default).",
)


DATA_FORMAT = """DATA is JSONL: one {"question": ..., "answer": ...} object per line, with an
    optional "image" (a path relative to the file) and "id". Only the answer's tokens
    are labelled."""


def _device_map_options(fn: F) -> F:
    """``--device-map`` and ``--offload-folder``: accelerate's loading, which overrides ``--device``."""

    @click.option(
        "--device-map",
        type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
        help="Load the model with accelerate's big-model loading, spread over GPUs, CPU and disk.",
    )
    @click.option(
        "--offload-folder",
        type=click.Path(file_okay=False),
        help="Where --device-map offloads layers to disk (default: a temporary directory).",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, device_map: str | None, offload_folder: str | None, **kwargs: Any) -> Any:
        meta = click.get_current_context().meta
        meta["kvw.device_map"], meta["kvw.offload_folder"] = device_map, offload_folder
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _placement_options(fn: F) -> F:
    """--device and --dtype, on every verb that runs the model (checked by the library)."""
    fn = click.option(
        "--dtype",
        default="auto",
        show_default=True,
        metavar="|".join(DTYPE_CHOICES),
        help="Model dtype; auto is the checkpoint's own. The ledger's base keeps the checkpoint's.",
    )(fn)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        metavar=DEVICE_CHOICES,
        help="Where the model runs; auto is the first GPU, else the CPU.",
    )(fn)


def _limit_options(fn: F) -> F:
    """Per-call stability limits, shared by every verb that changes HEAD."""
    options = [
        click.option(
            "--max-attenuation",
            type=float,
            help="Largest share of a site's Frobenius norm removed vs the base (default 0.5).",
        ),
        click.option(
            "--max-retain-drop",
            type=float,
            help="Largest retain-probe accuracy drop, as a fraction (default 0.05).",
        ),
        click.option(
            "--max-nll-increase",
            type=float,
            help="Largest retain-probe NLL increase vs the base, nats/token (default 1.0).",
        ),
        click.option(
            "--max-zeroed",
            type=float,
            help="Largest share of a site's value vectors scaled below --zero-floor (default 0.25).",
        ),
        click.option(
            "--zero-floor",
            type=float,
            help="A vector scaled by a factor under this counts as zeroed (default 0.001).",
        ),
        click.option(
            "--on-fail",
            type=click.Choice(["abort", "warn"]),
            help="abort (default): commit nothing and exit 1; warn: commit and record the failure.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _limits(
    ledger: Ledger,
    max_attenuation: float | None,
    max_retain_drop: float | None,
    max_nll_increase: float | None,
    on_fail: Any,
    max_zeroed: float | None = None,
    zero_floor: float | None = None,
) -> StabilityLimits | None:
    """The ledger's limits with the ones given in their place; None when none is given."""
    given = (max_attenuation, max_retain_drop, max_nll_increase, on_fail, max_zeroed, zero_floor)
    if all(v is None for v in given):
        return None
    return ledger.limits(
        max_attenuation=max_attenuation,
        max_retain_drop=max_retain_drop,
        max_nll_increase=max_nll_increase,
        max_zeroed=max_zeroed,
        zero_floor=zero_floor,
        on_fail=on_fail,
    )
