"""Shared test settings."""

import sys
from pathlib import Path

import torch

# Tiny matrices on a 2-core machine: one thread avoids thread hand-off per matmul.
# Library code restores any count it sets (loading.torch_threads), so this holds
# for the whole run.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the `tiny` helpers
