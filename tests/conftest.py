"""Shared test settings."""

import sys
from pathlib import Path

import torch

# Tiny matrices on a 2-core machine: one thread avoids thread start-up per matmul.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the `tiny` helpers
