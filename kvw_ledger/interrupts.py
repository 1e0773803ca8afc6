"""Ctrl-C during a write: before the commit point it aborts, after it it waits.

A SIGINT raises KeyboardInterrupt wherever Python happens to be, which would let an
interrupt land between a write's journal entry and its head refresh (the command
then exits 130 although its request was committed) or in the middle of the cleanup
of an uncommitted write. :class:`InterruptGuard` holds SIGINT over those stretches:
the write finishes (or cleans up) first, and an interrupt that arrived before the
commit point is raised after the cleanup.

Only the main thread receives signals in Python; elsewhere the guard does nothing.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["InterruptGuard", "redeliver_swallowed", "uninterrupted"]


class InterruptGuard:
    """Holds SIGINT while :attr:`holding`; remembers whether one arrived.

    ``hold()`` starts holding (idempotent) and ``end()`` restores the previous
    handler. ``briefly()`` holds over one block and, if an interrupt arrived and
    nothing else holds it, raises KeyboardInterrupt after the block.
    """

    def __init__(self) -> None:
        self.pending = False  # a SIGINT arrived while held
        self._previous: Any = None
        self._installed = False

    @property
    def holding(self) -> bool:
        """Whether SIGINT is being held now."""
        return self._installed

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def hold(self) -> None:
        """Holds SIGINT from now until :meth:`end` (main thread only)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def end(self) -> None:
        """Restores the handler that was there before :meth:`hold`."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    @contextlib.contextmanager
    def briefly(self, undo: Callable[[], object] | None = None) -> Iterator[None]:
        """Holds SIGINT over one block; an interrupt held here is raised after it,
        once ``undo`` (when given) has taken back what the block did. Inside a block
        another guard already holds, it leaves the interrupt to that guard."""
        current = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if self._installed or isinstance(getattr(current, "__self__", None), InterruptGuard):
            yield
            return
        self.hold()
        try:
            yield
            if self.pending and undo is not None:
                undo()
        finally:
            self.end()
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def uninterrupted() -> contextlib.AbstractContextManager[None]:
    """Holds Ctrl-C over one block, raising it after: for library code (zarr's event-loop
    set-up) that a KeyboardInterrupt in the middle leaves half made and noisy."""
    return InterruptGuard().briefly()


def _resend(pid: int) -> None:
    time.sleep(0.02)  # after the hook has returned
    os.kill(pid, signal.SIGINT)


def redeliver_swallowed(unraisable: Any) -> None:
    """A ``sys.unraisablehook``: a Ctrl-C that CPython had to drop is sent again.

    A KeyboardInterrupt raised while a finalizer or a weakref callback runs (garbage
    collection, at any moment) cannot propagate: CPython prints "Exception ignored"
    and the command would go on as if Ctrl-C had never been pressed. A helper thread
    sends SIGINT again once this hook has returned, so it lands at the next ordinary
    point. Anything else goes to the default hook.
    """
    exc_type = getattr(unraisable, "exc_type", None)
    if isinstance(exc_type, type) and issubclass(exc_type, KeyboardInterrupt):
        # _thread, not threading: Thread.start() waits for the thread, and the resent
        # SIGINT could land in that wait, inside this hook, and be dropped again.
        _thread.start_new_thread(_resend, (os.getpid(),))
        return
    sys.__unraisablehook__(unraisable)
