"""kvw_ledger: sequential unlearning with Knowledge Vector Weakening and a versioned ledger."""

from kvw_ledger.errors import KVWLedgerError
from kvw_ledger.kvw import KVWConfig, KVWResult, run_kvw
from kvw_ledger.sites import Site, discover_sites

__version__ = "0.1.0"

__all__ = ["KVWConfig", "KVWLedgerError", "KVWResult", "Site", "__version__", "discover_sites", "run_kvw"]
