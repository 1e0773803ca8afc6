"""``kvw-ledger``: a thin click face over :class:`kvw_ledger.ledger.Ledger`.

The library raises typed errors; only this module turns them into messages and
exit codes: 0 success, 1 a failed check, 2 bad input, 75 another writer in the way
(try again later). With ``--json`` (every
verb has it) the result, or the error as ``{"error", "exit_code"}``, is one JSON
object on stdout, and the exit code is the same.

This module imports torch, transformers and zarr inside the verbs that need them:
``--help``, ``log`` and ``show`` of a non-forget entry read JSON files only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from kvw_ledger import bodies, views
from kvw_ledger.devices import DEVICE_CHOICES, DTYPE_CHOICES
from kvw_ledger.errors import ImageOnlyProcessorWarning, KVWLedgerError
from kvw_ledger.interrupts import redeliver_swallowed
from kvw_ledger.journal import Entry
from kvw_ledger.reader import LedgerReader

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger
    from kvw_ledger.stability import StabilityLimits

F = TypeVar("F", bound=Callable[..., Any])

# The towers sites.py knows (``sites.TOWER_CHOICES``, which imports torch); listed here
# so that ``--help`` stays light. tests/test_cli.py holds the two equal.
TOWER_CHOICES = ("language", "vision", "all")
# The retain statistics retain_stat.py knows (``retain_stat.STATISTICS``: it imports torch),
# for the same reason; tests/test_retain_stat.py holds the two equal.
STATISTICS = ("mean", "q90", "q99", "max")


def _fail(message: str, exit_code: int, as_json: bool) -> None:
    """Reports an error (JSON on stdout under ``--json``, else on stderr) and exits."""
    if as_json:
        _dump({"error": message, "exit_code": exit_code})
    else:
        click.echo(f"Error: {message}", err=True)
    sys.exit(exit_code)


def _errors(fn: F) -> F:
    """Turns library errors into a message and the error's exit code; with ``--json``
    the message is a JSON object on stdout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except KVWLedgerError as e:
            _fail(str(e), e.exit_code, as_json)
        except click.ClickException as e:  # a BadParameter raised inside a verb
            if not as_json:
                raise
            _fail(e.format_message(), e.exit_code, True)

    return wrapper  # type: ignore[return-value]


class _Command(click.Command):
    """A verb whose usage errors (a bad option, a missing argument) are also JSON under ``--json``."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        options = args[: args.index("--")] if "--" in args else args
        as_json = "--json" in options and any(p.name == "as_json" for p in self.params)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            if not as_json:
                raise
            _dump({"error": e.format_message(), "exit_code": e.exit_code})
            raise click.exceptions.Exit(e.exit_code) from e


class _Group(click.Group):
    """The command group; Ctrl-C anywhere in a command exits 130, not click's 1 ("Aborted!").

    A write interrupted before its journal entry has removed what it wrote; one
    interrupted after it finishes first and never gets here (``session.open_session``).
    """

    command_class = _Command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # A Ctrl-C before any context exists (click's own start-up) is turned into
        # "Aborted!" and exit 1 inside click; note it, and exit 130 all the same.
        seen: list[bool] = []

        def note(signum: int, frame: Any) -> None:
            seen.append(True)
            signal.default_int_handler(signum, frame)

        in_main = threading.current_thread() is threading.main_thread()
        original = signal.getsignal(signal.SIGINT) if in_main else None
        if original is signal.default_int_handler:
            signal.signal(signal.SIGINT, note)
        try:
            return super().main(*args, **kwargs)
        except KeyboardInterrupt:  # before click's own handling starts
            click.echo("Error: interrupted (Ctrl-C); nothing was committed", err=True)
            raise SystemExit(INTERRUPTED) from None
        except SystemExit as e:
            if seen and e.code == 1:
                raise SystemExit(INTERRUPTED) from None
            raise
        finally:
            # A write's guard may still hold Ctrl-C after its commit (hold_interrupts_after_commit):
            # the command is over, so a caller in the same process (a test) gets its handler back.
            if in_main:
                signal.signal(signal.SIGINT, original)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()


def _writes(fn: F) -> F:
    """Gives a verb ``--json``: its result (an :class:`Entry`, or a JSON-ready dict) is
    printed as one JSON object instead of its text lines, and an error as
    ``{"error", "exit_code"}``. Warnings and progress bars stay on stderr.

    A verb adopts it by returning its entry and putting ``@_writes`` last, in place
    of ``@_errors``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        if not as_json:
            return fn(*args, **kwargs)
        with contextlib.redirect_stdout(io.StringIO()):  # the text view is not wanted
            result = fn(*args, **kwargs)
        _dump(views.written_json(result) if isinstance(result, Entry) else result)
        return result

    return JSON(_errors(wrapper))  # type: ignore[return-value]


INTERRUPTED = 130  # the shell's exit status for a command ended by SIGINT (128 + 2)


def _interrupted() -> NoReturn:
    click.echo("Error: interrupted (Ctrl-C); nothing was committed", err=True)
    raise click.exceptions.Exit(INTERRUPTED)


def _open(path: str, check_root: bool = True) -> Ledger:
    from kvw_ledger.ledger import Ledger

    ledger = Ledger.open(path, check_root=check_root)
    ledger.on_stale = lambda message: click.echo(f"Warning: {message}", err=True)
    meta = click.get_current_context().meta
    ledger.device_map = meta.get("kvw.device_map")
    ledger.offload_folder = meta.get("kvw.offload_folder")
    world = meta.get("kvw.world")
    if ledger.device_map is None and world is not None and world.backend == "nccl":
        ledger.device_map = {"": world.local_rank}  # one GPU per rank
    ledger.operator = _operator()
    ledger.on_warning = lambda message: click.echo(f"Warning: {message}", err=True)
    ledger.hold_interrupts_after_commit = True  # this process exits right after its write
    return ledger


def _open_for(path: str, world: Any) -> Ledger:
    """Opens the ledger on every rank: rank 0 first (a URL ledger's mirror is pulled once),
    then the others; a rank that cannot open it fails every rank."""
    with world.together():
        opened = _open(path) if world.is_main else None
    with world.together():
        if opened is None:
            opened = _open(path)
    return opened


# Verbs that run under torchrun / accelerate launch; any other refuses to (see main).
_DATA_PARALLEL = ("retain", "forget")


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


def _data_parallel(fn: F) -> F:
    """Joins the torchrun / accelerate launch job the environment describes, if any.

    Goes above ``@_writes``. Every rank runs the verb; rank 0 alone writes the ledger
    and prints its result (the others' stdout is dropped), and every rank exits with
    rank 0's status.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kvw_ledger.distributed import World

        try:
            world = World.from_env()
        except KVWLedgerError as e:
            _fail(str(e), e.exit_code, bool(kwargs.get("as_json")))
        click.get_current_context().meta["kvw.world"] = world
        quiet = contextlib.nullcontext() if world.is_main else contextlib.redirect_stdout(io.StringIO())
        try:
            with quiet:
                result = fn(*args, **kwargs)
        except SystemExit as e:  # _fail: the error is printed; now every rank leaves at once,
            if not world.parallel or not e.code:  # since the launcher kills the others as
                raise  # soon as one process exits with a failure
            sys.stdout.flush()
            sys.stderr.flush()
            world.meet()
            os._exit(e.code if isinstance(e.code, int) else 1)
        world.close()
        return result

    return wrapper  # type: ignore[return-value]


def _world() -> Any:
    """The data-parallel job of this verb (one process when none)."""
    from kvw_ledger.distributed import LOCAL

    return click.get_current_context().meta.get("kvw.world", LOCAL)


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


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


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


DATA_FORMAT = """DATA is JSONL: one {"question": ..., "answer": ...} object per line, with an
    optional "image" (a path relative to the file) and "id". Only the answer's tokens
    are labelled."""


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


def _summary(entry: Entry) -> str:
    return bodies.parse(entry).summary()


@main.command()
@LEDGER
@JSON
@_errors
def log(ledger: str, as_json: bool) -> None:
    """List the journal, one line per version (reads the journal only).

    \b
    Example:
      kvw-ledger log ledger/
      kvw-ledger log ledger/ --json | jq '.[-1].hash'
    """
    opened = LedgerReader.open(ledger)
    entries = opened.entries()
    if as_json and opened.torn is not None:
        raise opened.torn  # one JSON document: the error (`show N --json` reads what is readable)
    if as_json:
        _dump([views.entry_json(e) for e in entries])
    else:
        for e in entries:
            active = _active_list(e.body.get("active", []))
            click.echo(
                f"{e.version:>4}  {e.op:<8} {e.time}  {e.hash[:12]}  {e.operator or '-'}  "
                f"{_summary(e)}  active: {active}"
            )
    if opened.torn is not None:
        raise opened.torn  # the versions before it are listed; the torn one is named


def _active_list(active: list[str], shown: int = 8) -> str:
    """The active requests for a one-line view: all of a few, else a count and the newest.

    With hundreds of requests a full list per line would make `log` grow with the
    square of the ledger; `log --json` and `show` keep the full list.
    """
    if not active:
        return "-"
    if len(active) <= shown:
        return ", ".join(active)
    return f"{len(active)} requests (newest: {', '.join(active[-3:])})"


REF_HELP = """REF is a version number (1 is init), a request id, HEAD or HEAD~N (N
    versions before HEAD); put -- before a REF that starts with '-'."""


@main.command(
    help=f"""Show one version: its entry, and per site what its request weakened.

    {REF_HELP}

    \b
    Example:
      kvw-ledger show ledger/ alice
      kvw-ledger show ledger/ HEAD~1 --json
    """
)
@LEDGER
@click.argument("ref")
@JSON
@_errors
def show(ledger: str, ref: str, as_json: bool) -> None:
    reader = LedgerReader.open(ledger)

    def store() -> Any:  # a forget's per-site figures need the arrays, so zarr and torch
        return _open(ledger).store

    shown = views.show(reader.entries(), ref, store, torn=reader.torn)
    if as_json:
        _dump(shown)
        return
    body, sites = shown["body"], shown["sites"]
    click.echo(f"version  {shown['version']}")
    click.echo(f"op       {shown['op']}")
    click.echo(f"time     {shown['time']}")
    click.echo(f"operator {shown['operator'] or '- (not recorded)'}")
    click.echo(f"hash     {shown['hash']}")
    click.echo(f"parent   {shown['parent'] or '-'}")
    click.echo(f"active   {', '.join(shown['active']) or '-'}")
    hidden = ("active", "arrays", "tokens", "model_fingerprint", "stability", "figures", "results")
    for key in sorted(k for k in body if k not in hidden):
        value = body[key]
        click.echo(
            f"{key:<8} {json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value}"
        )
    if "stability" in body:
        click.echo(f"checks   {_checks_line(body['stability'])}")
    if shown["op"] == "audit":
        for line in views.audit_lines(body):
            click.echo(line)
    if shown.get("audits"):
        click.echo("audits   " + ", ".join(f"version {a['version']} (of {a['at']})" for a in shown["audits"]))
    if sites:
        scaled = any("log_scale" in s for s in sites)
        click.echo(
            f"{'site':<52}{'weakened':>10}{'max w':>10}{'mean w':>10}"
            + (f"{'log-scale':>10}" if scaled else "")
        )
        for s in sites:
            scale = _column(s["log_scale"]) if "log_scale" in s else ""
            click.echo(
                f"{s['site']:<52}{s['weakened']:>10}{_column(s['max'])}{_column(s['mean'])}{scale}"
            )


def _column(value: float, width: int = 10) -> str:
    """A number right-aligned in ``width`` characters with at least one space before it:
    4 decimals while they fit, else 4 significant digits (2.929e+08)."""
    text = f"{value:.4f}"
    if len(text) >= width:
        text = f"{value:.4g}"
    return f"{text:>{width}}"


def _warn_failed(entry: Entry) -> None:
    """Says on stderr which checks a step committed with --on-fail warn failed."""
    for c in entry.body.get("stability", {}).get("failed", []):
        click.echo(
            f"Warning: committed although {c['name']} failed: {c['value']:.4g} (limit {c['limit']:.4g})",
            err=True,
        )


def _checks_line(stability: dict[str, Any]) -> str:
    verdict = (
        "passed" if stability["passed"] else f"FAILED ({stability['on_fail']}: committed anyway)"
    )
    parts = [verdict, f"max attenuation {stability['max_attenuation']:.4f}"]
    for name, figures in sorted(stability.get("probes", {}).items()):
        parts.append(f"{name} acc {figures['acc']:.3f} nll {figures['nll']:.3f}")
    parts += [
        f"failed {c['name']}: {c['value']:.4g} > {c['limit']:.4g}"
        for c in stability.get("failed", [])
    ]
    return "; ".join(parts)


@main.command(
    help=f"""Compare two versions: requests added and removed, and per site the exponents that changed.

    Sites with a log-scale (forget --rescale) also show its change. {REF_HELP}

    \b
    Example:
      kvw-ledger diff ledger/ alice HEAD
      kvw-ledger diff ledger/ 2 5 --top 10 --json
    """
)
@LEDGER
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--top", type=int, default=5, show_default=True, help="Vectors listed per site.")
@JSON
@_errors
def diff(ledger: str, ref_a: str, ref_b: str, top: int, as_json: bool) -> None:
    result = _open(ledger).diff(ref_a, ref_b, top=top)
    sites = result["sites"]
    if as_json:
        _dump(result)
        return
    click.echo(f"version {result['from']} -> {result['to']}")
    click.echo(f"added    {', '.join(result['added']) or '-'}")
    click.echo(f"removed  {', '.join(result['removed']) or '-'}")
    for s in sites:
        tops = ", ".join(f"{t['vector']}:{t['change']:+.4f}" for t in s["top"])
        scale = f"; log-scale {s['log_scale_change']:+.4f}" if "log_scale_change" in s else ""
        click.echo(
            f"{s['site']}: {s['changed']} vectors, max |change| {s['max_abs_change']:.4f}, "
            f"mean {s['mean_abs_change']:.4f}; top {tops}{scale}"
        )


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


@main.command()
@LEDGER
@MODEL
@click.option("--no-model", is_flag=True, help="Skip checking the base against the model files.")
@JSON
@_errors
def verify(ledger: str, model_dir: str | None, no_model: bool, as_json: bool) -> None:
    """Re-hash the journal chain, every file and array, the head cache and the base; exit 1 on damage.

    \b
    Example:
      kvw-ledger verify ledger/
      kvw-ledger verify ledger/ --no-model --json
    """
    report = _open(ledger, check_root=False).verify(model_dir=model_dir, check_model=not no_model)
    if as_json:
        _dump(report.to_json())
    else:
        for p in report.problems:
            # One form with every other message: "Error: ..." / "Warning: ...", the path
            # once (a message that already names its file is not prefixed with it again).
            text = p.message if p.path in p.message else f"{p.path}: {p.message}"
            click.echo(f"{p.severity.capitalize()}: {text}", err=p.severity == "error")
        verdict = "ok" if report.ok else "FAILED"
        click.echo(
            f"{verdict}: {report.checked_entries} entries, {report.checked_arrays} arrays checked"
        )
    if not report.ok:
        sys.exit(1)


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


@main.command()
@LEDGER
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the history as a PNG.")
@JSON
@_errors
def history(ledger: str, plot: str | None, as_json: bool) -> None:
    """Per version: active requests, per-layer attenuation, probe figures, and warnings.

    \b
    Example:
      kvw-ledger history ledger/ --plot history.png
    """
    from kvw_ledger.history import build_history, plot_history

    rows = build_history(_open(ledger))
    if plot:
        plot_history(rows, plot)
    if as_json:
        _dump([r.to_json() for r in rows])
        return
    for r in rows:
        worst = "-" if r.attenuation is None else f"{max(r.attenuation.values(), default=0.0):.3f}"
        probes = " ".join(f"{k}={v['acc']:.2f}" for k, v in sorted(r.probes.items())) or "-"
        click.echo(
            f"{r.version:>4}  {r.op:<8} {r.id or '-':<14} max attenuation {worst:<6} probes {probes}  "
            f"active: {', '.join(r.active) or '-'}"
        )
        for warning in r.warnings:
            click.echo(f"      warning: {warning}")
    if plot:
        click.echo(f"wrote {plot}")


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


@main.command()
@LEDGER
@click.argument("request_id")
@click.option(
    "--forget-probe",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL of the forgotten facts to probe (only its fingerprint is kept).",
)
@click.option(
    "--retain-probe", type=click.Path(dir_okay=False), help="JSONL of facts the model must keep."
)
@click.option(
    "--quantize",
    default="8,4",
    show_default=True,
    help="Bit widths (8: int8; 4: int4 and nf4), scheme names int8,int4,nf4, or none.",
)
@click.option(
    "--group-size", type=int, default=64, show_default=True, help="Weights per quantization group."
)
@click.option(
    "--relearn-data",
    type=click.Path(dir_okay=False),
    help="JSONL to fine-tune on, e.g. the facts of a third of the forgotten people.",
)
@click.option(
    "--relearn-steps", type=int, default=20, show_default=True, help="AdamW steps of relearning."
)
@click.option(
    "--relearn-lr", type=float, default=1e-5, show_default=True, help="Relearning learning rate."
)
@click.option(
    "--relearn-batch-size", type=int, default=4, show_default=True, help="Records per relearning step."
)
@click.option(
    "--at", default="HEAD", show_default=True, help="REF of a version where the request is active."
)
@MODEL
@QUIET
@OPERATOR
@_writes
def audit(
    ledger: str,
    request_id: str,
    forget_probe: str,
    retain_probe: str | None,
    quantize: str,
    group_size: int,
    relearn_data: str | None,
    relearn_steps: int,
    relearn_lr: float,
    relearn_batch_size: int,
    at: str,
    model_dir: str | None,
    quiet: bool,
) -> Entry:
    """Check that a request's forgetting holds: efficacy, after 8/4-bit quantization, after relearning.

    Measures the version where REQUEST_ID is active against the version just before
    it, and records the figures (and the probes' fingerprints, never their records)
    as an audit journal entry. No weight changes.

    \b
    Example:
      kvw-ledger audit ledger/ alice --forget-probe alice_probe.jsonl \\
        --retain-probe retain_probe.jsonl --quantize 8,4 \\
        --relearn-data alice_third.jsonl --relearn-steps 20
    """
    from kvw_ledger.audit import audit as run_audit
    from kvw_ledger.audit import summary_lines
    from kvw_ledger.quantize import parse_schemes

    entry = run_audit(
        _open(ledger),
        request_id,
        forget_probe,
        retain_probe=retain_probe,
        quantize=parse_schemes(quantize),
        group_size=group_size,
        relearn_data=relearn_data,
        relearn_steps=relearn_steps,
        relearn_lr=relearn_lr,
        relearn_batch_size=relearn_batch_size,
        at=at,
        model_dir=model_dir,
        progress=not quiet,
    )
    for line in summary_lines(entry.body):
        click.echo(line)
    click.echo(f"version {entry.version}: audit of {request_id} recorded")
    return entry


@main.command()
@LEDGER
@click.argument("request_id")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Where to write the certificate (JSON)."
)
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write it as Markdown.")
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Ed25519 private key (PEM) to sign with, e.g. from `openssl genpkey -algorithm ed25519`.",
)
@MODEL
@QUIET
@JSON
@OPERATOR
@_errors
def certify(
    ledger: str,
    request_id: str,
    out: str,
    markdown: str | None,
    sign_key: str | None,
    model_dir: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write an erasure certificate for one request: what, who, when, hashes, checks.

    It never holds forget data. Its first line says whether the erasure is in effect
    or was reverted. The model's weight hashes are those an export of HEAD holds.

    \b
    Example:
      kvw-ledger certify ledger/ alice --out alice.cert.json --markdown alice.cert.md \\
        --sign-key issuer.pem
    """
    from kvw_ledger.certify import certify as make_certificate
    from kvw_ledger.certify import markdown as render
    from kvw_ledger.certify import write_certificate

    cert = make_certificate(
        _open(ledger), request_id, sign_key=sign_key, model_dir=model_dir, progress=not quiet
    )
    write_certificate(cert, out)
    if markdown:
        Path(markdown).write_text(render(cert), encoding="utf-8")
    if as_json:
        _dump({"out": out, "markdown": markdown, "statement": cert["statement"],
               "status": cert["status"], "digest": cert["digest"], "signed": "signature" in cert})
        return
    click.echo(cert["statement"])
    click.echo(f"wrote {out}" + (f" and {markdown}" if markdown else "")
               + (" (signed)" if "signature" in cert else " (not signed)"))


@main.command("check-certificate")
@click.argument("certificate", type=click.Path(dir_okay=False))
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False),
    help="The issuer's Ed25519 public key (PEM); the signature must be by it.",
)
@click.option(
    "--ledger",
    "ledger_path",
    type=click.Path(file_okay=False),
    help="Check every hash against this ledger (and its model's weights).",
)
@MODEL
@click.option("--no-model", is_flag=True, help="Do not recompute the weight tensors' hashes.")
@JSON
@_errors
def check_certificate(
    certificate: str,
    public_key: str | None,
    ledger_path: str | None,
    model_dir: str | None,
    no_model: bool,
    as_json: bool,
) -> None:
    """Check a certificate's digest and signature, and with --ledger every hash in it; exit 1 on a mismatch.

    \b
    Example:
      kvw-ledger check-certificate alice.cert.json --public-key issuer.pub --ledger ledger/
    """
    from kvw_ledger.certify import check_certificate as run_check

    result = run_check(
        certificate,
        public_key=public_key,
        ledger=_open(ledger_path) if ledger_path else None,
        model_dir=model_dir,
        check_model=not no_model,
    )
    if as_json:
        _dump(result.to_json())
    else:
        for note in result.notes:
            click.echo(f"note: {note}")
        for failure in result.failures:  # one line, as every verb reports what it refuses
            click.echo(f"Error: certificate check FAILED: {failure}", err=True)
        if result.ok:
            checked = ["digest"] + (["signature"] if result.signed else [])
            if result.ledger_checked:
                checked.append("ledger hashes")
            if result.model_checked:
                checked.append("weight tensors")
            click.echo(f"ok: {certificate} ({', '.join(checked)} checked)")
    if not result.ok:
        sys.exit(1)
