"""The fictitious-profiles benchmark and the small models that learn it.

- :mod:`kvw_ledger.bench.profiles`: seeded people, portraits, question-answer
  records and the forget/retain/held-out splits, as JSONL plus PNG.
- :mod:`kvw_ledger.bench.tokenizer`: a byte-level BPE tokenizer trained on them.
- :mod:`kvw_ledger.bench.instill`: builds and trains the LLaVA model (and its
  text-only language model), cached by a hash of the configuration.
"""

from kvw_ledger.bench.instill import InstillConfig, build_model, export_text_model
from kvw_ledger.bench.profiles import BenchConfig, BenchPaths, generate

__all__ = [
    "BenchConfig",
    "BenchPaths",
    "InstillConfig",
    "build_model",
    "export_text_model",
    "generate",
]
