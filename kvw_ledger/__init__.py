"""kvw_ledger: sequential unlearning with Knowledge Vector Weakening and a versioned ledger.

The public API is the :class:`Ledger` and its verbs, and :class:`LiveModel` for a
loaded model that switches between versions; the engine (:func:`run_kvw`,
:class:`KVWConfig`) and site discovery from structure (:func:`discover_sites`) are
usable on their own.
"""

from kvw_ledger.errors import KVWLedgerError
from kvw_ledger.kvw import KVWConfig, KVWResult, run_kvw
from kvw_ledger.ledger import Ledger
from kvw_ledger.live import LiveModel
from kvw_ledger.sites import Site, discover_sites

__version__ = "0.1.0"

__all__ = [
    "KVWConfig",
    "KVWLedgerError",
    "KVWResult",
    "Ledger",
    "LiveModel",
    "Site",
    "__version__",
    "discover_sites",
    "run_kvw",
]
