"""kvw_ledger: sequential unlearning with Knowledge Vector Weakening and a versioned ledger.

The public API is the :class:`Ledger` and its verbs, and :class:`LiveModel` for a
loaded model that switches between versions; the engine (:func:`run_kvw`,
:class:`KVWConfig`) and site discovery from structure (:func:`discover_sites`) are
usable on their own.

``import kvw_ledger`` imports neither torch nor zarr: the names that need them
are loaded on first use (PEP 562), so reading a journal stays fast.
"""

from __future__ import annotations

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

from kvw_ledger.errors import (
    BadInputError,
    ConcurrentCommitError,
    DataError,
    FormatVersionError,
    IntegrityError,
    KVWLedgerError,
    LedgerExistsError,
    LedgerLockedError,
    LedgerNotFoundError,
    ModelMismatchError,
    NonFiniteActivationError,
    PeerFailedError,
    RefNotFoundError,
    RequestStateError,
    StabilityCheckError,
    StorageError,
    TargetNotReachedError,
    TornEntryError,
    TransientError,
    UnknownArchitectureError,
)
from kvw_ledger.journal import Entry
from kvw_ledger.reader import LedgerReader

if TYPE_CHECKING:
    from kvw_ledger.distributed import World
    from kvw_ledger.kvw import KVWConfig, KVWResult, run_kvw
    from kvw_ledger.ledger import Ledger
    from kvw_ledger.live import LiveModel
    from kvw_ledger.replay import LedgerState, RequestInfo
    from kvw_ledger.sites import Site, discover_sites
    from kvw_ledger.stability import StabilityLimits, StabilityReport
    from kvw_ledger.verify import VerifyReport

# transformers imports torchao (the audits' quantization library) whenever it builds a
# model; torchao's CPU wheel then logs every CUDA kernel it lacks, and torch a notice
# about torchao's enums, on each command. Neither is about the user's work.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"

# name -> module that defines it; each module pulls in torch, so it loads on first use
_LAZY = {
    "KVWConfig": "kvw_ledger.kvw",
    "KVWResult": "kvw_ledger.kvw",
    "run_kvw": "kvw_ledger.kvw",
    "Ledger": "kvw_ledger.ledger",
    "LedgerState": "kvw_ledger.replay",
    "RequestInfo": "kvw_ledger.replay",
    "VerifyReport": "kvw_ledger.verify",
    "LiveModel": "kvw_ledger.live",
    "Site": "kvw_ledger.sites",
    "discover_sites": "kvw_ledger.sites",
    "StabilityLimits": "kvw_ledger.stability",
    "StabilityReport": "kvw_ledger.stability",
    "World": "kvw_ledger.distributed",
}

__all__ = [
    "BadInputError",
    "ConcurrentCommitError",
    "DataError",
    "Entry",
    "FormatVersionError",
    "IntegrityError",
    "KVWConfig",
    "KVWLedgerError",
    "KVWResult",
    "Ledger",
    "LedgerExistsError",
    "LedgerLockedError",
    "LedgerNotFoundError",
    "LedgerReader",
    "LedgerState",
    "LiveModel",
    "ModelMismatchError",
    "NonFiniteActivationError",
    "PeerFailedError",
    "RefNotFoundError",
    "RequestInfo",
    "RequestStateError",
    "Site",
    "StabilityCheckError",
    "StabilityLimits",
    "StabilityReport",
    "StorageError",
    "TargetNotReachedError",
    "TornEntryError",
    "TransientError",
    "UnknownArchitectureError",
    "VerifyReport",
    "World",
    "__version__",
    "discover_sites",
    "run_kvw",
]


def __getattr__(name: str) -> Any:
    """Loads a torch-backed public name from its module the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvw_ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
