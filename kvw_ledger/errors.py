"""The exception tree.

Every error the library raises on purpose is a :class:`KVWLedgerError`, and each
class also subclasses the built-in that fits, so ``except KeyError`` or
``except ValueError`` keeps working for callers who do not know this package.
``exit_code`` is what the CLI returns for it: 2 for bad input, 1 for a check that
failed, 75 for a condition that passes by itself (another writer), so that a retry
later may succeed.
"""

from __future__ import annotations


class KVWLedgerError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class BadInputError(KVWLedgerError, ValueError):
    """An argument, file or record the caller gave is not usable."""


class DataError(BadInputError):
    """A forget/retain data file is malformed; the message names file and line."""


class UnknownArchitectureError(BadInputError, LookupError):
    """No FFN value projections could be found in a model."""


class NonFiniteActivationError(BadInputError, FloatingPointError):
    """A forward pass produced NaN or infinite coefficients."""


class RefNotFoundError(KVWLedgerError, KeyError):
    """A REF (version, request id, HEAD~N) or a stored object does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message in quotes
        return str(self.args[0]) if self.args else ""


class RequestStateError(BadInputError):
    """A verb does not apply to a request in its current state (e.g. reverting twice)."""


class ModelMismatchError(BadInputError):
    """A model directory does not match the fingerprint the ledger recorded."""


class FormatVersionError(BadInputError):
    """A ledger was written by a newer (or unknown) format version."""


class TransientError(KVWLedgerError):
    """Another writer got in the way; nothing was committed, and the same command may
    succeed when run again later.

    Exit code 75 is sysexits.h's ``EX_TEMPFAIL`` ("try again later"): a scheduler or a
    retrying script can tell it from bad input (2), which fails again however often it
    is retried.
    """

    exit_code = 75


class LedgerLockedError(TransientError, BlockingIOError):
    """Another live writer holds the ledger's lock (past the wait for it)."""


class ConcurrentCommitError(TransientError, FileExistsError):
    """Another writer committed the journal version this commit was about to create."""


class LedgerNotFoundError(BadInputError, FileNotFoundError):
    """No ledger exists at the given path."""


class LedgerExistsError(BadInputError, FileExistsError):
    """A ledger (or another file) already exists where one is to be created."""


class IntegrityError(KVWLedgerError, RuntimeError):
    """Stored data does not match its recorded hash: the ledger was damaged or tampered with."""

    exit_code = 1


class TornEntryError(IntegrityError):
    """The newest journal entry file is not a valid entry (truncated or altered).

    ``valid`` holds the entries before it (None when not read): those versions can
    still be read by number, and ``kvw-ledger repair`` moves the torn file aside.
    """

    def __init__(self, message: str, path: str, version: int, valid: list | None = None) -> None:  # type: ignore[type-arg]
        super().__init__(message)
        self.path = path
        self.version = version
        self.valid = valid


class StabilityCheckError(KVWLedgerError, RuntimeError):
    """A staged step failed a stability check and was not committed."""

    exit_code = 1


class TargetNotReachedError(KVWLedgerError, RuntimeError):
    """``forget --target-forget``: no gamma reached the target within the stability limits."""

    exit_code = 1


class StorageError(KVWLedgerError, OSError):
    """The ledger's storage refused a write (full disk, read-only directory); nothing was committed."""


class ImageOnlyProcessorWarning(UserWarning):
    """A vision-language processor was built without its video processor (no video backend)."""


class PeerFailedError(KVWLedgerError, RuntimeError):
    """Another rank of a data-parallel job failed; this one stops with it (exit 1 unless told)."""

    exit_code = 1
