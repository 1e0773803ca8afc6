"""The ledger's single-writer lock, with safe takeover of a lock left by a dead process.

Readers never lock; every write holds :class:`WriterLock` from its first array
write to its journal entry and head update.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kvw_ledger._fs import fsync_dir, fsync_file, sha256_bytes
from kvw_ledger.errors import LedgerLockedError, LedgerNotFoundError, StorageError
from kvw_ledger.interrupts import InterruptGuard
from kvw_ledger.journal import canonical_json, format_time, utc_now

__all__ = ["WriterLock", "retry_while_locked"]

_MAX_LOCK_BYTES = 1 << 16
_LOCK_ATTEMPTS = 8
# acquire()'s temporary file: .lock.<host tag>.<pid>.<random>.tmp
_TMP_NAME = re.compile(r"\.lock\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+\.tmp")


def _host_tag() -> str:
    """This host, in temporary file names: a pid only means something on its own host."""
    return sha256_bytes(socket.gethostname().encode())[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass(frozen=True)
class _Holder:
    pid: int
    host: str
    time: str
    operation: str


def _parse_holder(raw: bytes) -> _Holder | None:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    pid, host = data.get("pid"), data.get("host")
    time, operation = data.get("time", "?"), data.get("operation", "")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
        return None  # os.kill(0 or -1, ...) would signal whole process groups
    if not (isinstance(host, str) and isinstance(time, str) and isinstance(operation, str)):
        return None
    return _Holder(pid, host, time, operation)


class WriterLock:
    """The ledger's single-writer lock: a context manager around ``ledger_root / "lock"``.

    The lock file records pid, host, time and operation. Its holder also keeps an
    ``flock`` on it, which only serializes the takeover of a stale lock: two
    processes that both find the same dead holder cannot both remove a lock.

    Args:
        ledger_root: the ledger directory.
        on_stale: called with a message when a dead holder's lock is taken over.
        operation: what the writer is doing, shown to anyone who finds the lock held.
    """

    def __init__(
        self,
        ledger_root: Path,
        *,
        on_stale: Callable[[str], None] | None = None,
        operation: str = "",
    ) -> None:
        self.root = Path(ledger_root)
        self.path = self.root / "lock"
        self._on_stale = on_stale
        self._operation = operation
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None and self._owner_pid == os.getpid()

    def acquire(
        self,
        timeout: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
        guard: InterruptGuard | None = None,
    ) -> None:
        """Takes the lock, taking over a stale one left by a dead process on this host,
        retrying for up to ``timeout`` seconds while another writer holds it.

        ``on_wait`` is told once, the first time the lock is found held. With a ``guard``,
        Ctrl-C is held over each attempt (never over the wait between attempts), so an
        interrupt never leaves a lock or a half-made lock file behind.

        Raises:
            LedgerLockedError: a live (or unknowable) writer held it past ``timeout``.
            LedgerNotFoundError: ``ledger_root`` does not exist.
        """

        def attempt() -> None:
            if guard is None:
                self._acquire_once()
                return
            with guard.briefly(undo=self.release):
                self._acquire_once()

        retry_while_locked(attempt, timeout, on_wait)

    @contextlib.contextmanager
    def holding(self, timeout: float = 0.0, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Holds the lock (taken as :meth:`acquire` does) for the block."""
        self.acquire(timeout, on_wait)
        try:
            yield
        finally:
            self.release()

    def _acquire_once(self) -> None:
        if self.held:
            raise LedgerLockedError(f"this WriterLock already holds {self.path}")
        if not self.root.is_dir():
            raise LedgerNotFoundError(f"no ledger directory at {self.root}")
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": format_time(utc_now()),
            "operation": self._operation,
        }
        tmp = self.root / f".lock.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(
                f"cannot take the writer lock in {self.root} ({e.strerror}); the ledger directory is "
                "read-only or its disk is full"
            ) from e
        try:
            os.write(fd, canonical_json(record))
            fsync_file(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh inode: cannot block
            for _ in range(_LOCK_ATTEMPTS):
                try:
                    # link() publishes the complete file or nothing, never an empty lock
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._clear_stale_or_raise()
                    continue
                fsync_dir(self.root)
                self._fd, self._owner_pid = fd, os.getpid()
                self._sweep()
                return
            raise LedgerLockedError(
                f"could not take {self.path} after {_LOCK_ATTEMPTS} tries: other writers keep "
                "taking it; retry later"
            )
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _clear_stale_or_raise(self) -> None:
        """Removes the existing lock if its holder is dead; raises if it is held."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # released meanwhile
        try:
            holder = _parse_holder(os.read(fd, _MAX_LOCK_BYTES))
            if holder is None:
                raise LedgerLockedError(
                    f"lock file {self.path} exists but is not a readable lock record; a writer "
                    f"may be running. If no writer runs, remove {self.path} by hand."
                )
            who = (
                f"pid {holder.pid} on host {holder.host} "
                f"(operation {holder.operation or '?'!r}, since {holder.time})"
            )
            if holder.host != socket.gethostname():
                raise LedgerLockedError(
                    f"ledger is locked by {who}, another host whose processes this one cannot "
                    f"see: lock file {self.path}. Wait for it to finish, or if that process "
                    f"is gone, remove {self.path}."
                )
            if _pid_alive(holder.pid):
                raise LedgerLockedError(
                    f"ledger is locked by {who}: lock file {self.path}. Wait for it to "
                    f"finish, or if that process is gone, remove {self.path}."
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise LedgerLockedError(
                    f"lock file {self.path} names dead {who}, but another process still "
                    f"holds it (a child it forked, or a writer taking it over). Wait, or if "
                    f"no writer runs, remove {self.path}."
                ) from e
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                return  # someone else took it over before we got the flock; look again
            # Holding the flock of the very inode at the path, no one else can move it now.
            moved = self.root / f".lock.stale.{holder.pid}.{secrets.token_hex(6)}"
            os.rename(self.path, moved)
            moved.unlink(missing_ok=True)  # the next lock holder may have swept it already
            fsync_dir(self.root)
        finally:
            os.close(fd)
        if self._on_stale is not None:
            self._on_stale(
                f"took over a stale lock {self.path} left by dead pid {holder.pid} "
                f"(operation {holder.operation or '?'!r}, since {holder.time})"
            )

    def _sweep(self) -> None:
        """Removes what writers killed inside :meth:`acquire` left: their temporary lock
        files (only those of dead processes on this host) and moved-away stale locks."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        host = _host_tag()
        for name in names:
            match = _TMP_NAME.fullmatch(name)
            pid = int(match.group(2)) if match and len(match.group(2)) <= 9 else 0
            dead = (
                match is not None
                and match.group(1) == host
                and 0 < pid != os.getpid()
                and not _pid_alive(pid)
            )
            if dead or name.startswith(".lock.stale."):
                with contextlib.suppress(OSError):
                    (self.root / name).unlink()

    def release(self) -> None:
        """Removes the lock file if it is still this object's; safe to call twice."""
        fd, owner = self._fd, self._owner_pid
        self._fd = self._owner_pid = None
        if fd is None:
            return
        try:
            if owner != os.getpid():
                return  # a forked child's copy: the parent owns the file
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                self.path.unlink()
                fsync_dir(self.root)
        finally:
            os.close(fd)


def retry_while_locked(
    attempt: Callable[[], None],
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
    pause: tuple[float, float] = (0.02, 0.1),
) -> None:
    """Calls ``attempt`` until it does not raise LedgerLockedError, for up to ``timeout``
    seconds (a random ``pause`` between tries); ``on_wait`` is told once, the first time.

    One loop for every writer lock: the directory's :class:`WriterLock` and a URL
    ledger's (``remote.Remote.lock``).
    """
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            attempt()
            return
        except LedgerLockedError as e:
            if time.monotonic() >= deadline:
                raise
            if not told and on_wait is not None:
                on_wait(f"waiting for the writer lock: {e}")
                told = True
            time.sleep(random.uniform(*pause))
