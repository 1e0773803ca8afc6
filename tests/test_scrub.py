"""Tests for kvw_ledger.scrub: verify's NumPy readers give torch's results, and leave
to torch what only torch or zarr reads."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvw_ledger import scrub
from kvw_ledger._codec import stored_dtypes, tensor_hash, write_array
from kvw_ledger.errors import BadInputError


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=4 * 37, max_size=4 * 37), min_size=1, max_size=12))
def test_numpy_chain_sums_are_torchs_bit_for_bit(chunks: list[bytes]) -> None:
    """The head's float32 sums made in place, request by request: NumPy and torch round
    alike (subnormals, signed zeros and infinities included; NaNs excepted, which the
    stability checks never let into an exponent)."""
    arrays = [np.frombuffer(raw, dtype=np.float32) for raw in chunks]
    arrays = [np.where(np.isnan(a), np.float32(0), a) for a in arrays]
    ours = np.zeros(37, dtype=np.float32)
    theirs = torch.zeros(37, dtype=torch.float32)
    for a in arrays:
        with np.errstate(over="ignore"):  # infinities are part of what is compared
            ours += a
        theirs += torch.from_numpy(a.copy())
    assert ours.view(np.int32).tolist() == theirs.numpy().view(np.int32).tolist()


def _read(root: Path, alone: list[str], chains: list[scrub.Chain], wanted: set[str], workers: int) -> scrub.Findings:
    """What verify does: hand the arrays to a Reads and wait for what it found."""
    with scrub.Reads(root, wanted, stored_dtypes(), workers=workers, expected=len(alone)) as reads:
        reads.alone(alone)
        reads.chains(chains)
        return reads.results()


def _ledger_like(root: Path, arrays: dict[str, torch.Tensor]) -> None:
    for name, value in arrays.items():
        write_array(root / name, value, None, 8 << 20)


def test_scrub_hashes_sums_and_hands_back_what_it_cannot_read() -> None:
    gen = torch.Generator().manual_seed(0)
    exps = [torch.rand(6, generator=gen) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"requests/r{i}/exponent/s" for i in range(3)]
        _ledger_like(root, dict(zip(names, exps, strict=True)))
        _ledger_like(root, {"requests/r0/trace/s": torch.rand(2, 6, generator=gen).to(torch.bfloat16)})
        _ledger_like(root, {"requests/r0/log_scale/s": torch.tensor(0.5)})  # 0-d: zarr writes it whole
        _ledger_like(root, {"requests/r1/exponent/t": torch.rand(6, generator=gen).double()})
        wanted = {*names, "requests/r0/trace/s", "requests/r0/log_scale/s", "requests/r1/exponent/t"}
        found = _read(
            root,
            ["requests/r0/trace/s", "requests/r0/log_scale/s", "requests/r9/trace/s"],
            [scrub.Chain("s", tuple(names), 6), scrub.Chain("t", ("requests/r1/exponent/t",), 6)],
            wanted,
            workers=2,
        )
        total = torch.zeros(6)
        for e in exps:
            total += e
        assert torch.equal(torch.from_numpy(found.sums["s"]), total)
        for name, e in zip(names, exps, strict=True):
            assert found.hashes[name] == tensor_hash(e)
        assert found.hashes["requests/r9/trace/s"] is None  # missing: the journal names its files
        assert found.redo == ["requests/r0/log_scale/s"] and found.redo_chains == ["t"]
        assert "requests/r0/trace/s" in found.hashes
        for rel in ("requests/r0/trace/s/zarr.json", "requests/r0/trace/s/c/0/0"):
            assert found.digests[rel] == hashlib.sha256((root / rel).read_bytes()).hexdigest()


def test_a_bad_name_is_refused_as_the_store_refuses_it() -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(BadInputError, match="bad request id '..'"):
        _read(Path(tmp), ["requests/../../etc"], [], set(), workers=1)
