"""interrupts.py: SIGINT held over a block, and a Ctrl-C CPython dropped sent again."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import weakref
from types import SimpleNamespace
from typing import Any

import pytest

from kvw_ledger.interrupts import InterruptGuard, redeliver_swallowed


def test_a_held_interrupt_is_raised_after_the_block_and_undo_runs_first() -> None:
    undone = []
    with pytest.raises(KeyboardInterrupt), InterruptGuard().briefly(undo=lambda: undone.append(True)):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # delivered here, but only recorded
        undone.append(False)
    assert undone == [False, True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_inside_another_guard_the_interrupt_is_left_to_it() -> None:
    outer = InterruptGuard()
    outer.hold()
    try:
        with InterruptGuard().briefly():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert outer.pending  # the committed write it protects goes on
    finally:
        outer.end()


def test_a_ctrl_c_dropped_in_a_weakref_callback_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "unraisablehook", redeliver_swallowed)

    class Thing:
        pass

    def callback(_: object) -> None:
        raise KeyboardInterrupt  # what a SIGINT during garbage collection does

    thing = Thing()
    ref = weakref.ref(thing, callback)
    with pytest.raises(KeyboardInterrupt):
        del thing
        gc.collect()
        time.sleep(0.5)  # the resent SIGINT lands here
    assert ref() is None


def test_other_unraisable_errors_go_to_the_default_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(sys, "__unraisablehook__", seen.append)
    event = SimpleNamespace(exc_type=ValueError)
    redeliver_swallowed(event)
    assert seen == [event]


@pytest.mark.parametrize("where", ["before click's handling", "inside click's handling"])
def test_a_ctrl_c_before_any_verb_runs_exits_130(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import click

    from kvw_ledger import cli

    def interrupt(*args: object, **kwargs: object) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # click's own start-up: no verb runs yet

    if where == "before click's handling":
        monkeypatch.setattr(click.core, "_detect_program_name", interrupt)
    else:
        monkeypatch.setattr(click.Context, "__enter__", interrupt)
    with pytest.raises(SystemExit) as exited:
        cli.main(["log", "nowhere"])
    assert exited.value.code == cli.INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
