"""How a verb runs: library errors as messages and exit codes (``_fail``, ``_errors``),
``--json`` (``_writes``, ``_dump``), Ctrl-C (``_Group``), the ledger opened with the
command's options (``_open``), and a data-parallel job joined (``_data_parallel``)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import click

from kvw_ledger import views
from kvw_ledger.cli._options import JSON, F, _operator
from kvw_ledger.errors import KVWLedgerError
from kvw_ledger.journal import Entry

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


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


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))
