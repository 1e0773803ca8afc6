"""Tests for kvw_ledger._fs: where each helper fsyncs, atomic writes, and the digests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from kvw_ledger import _fs


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on, in order (by the descriptor's /proc link)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_atomic_write_fsyncs_the_file_then_its_directory(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    _fs.atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # The temporary file (renamed since) first, then the directory holding the new name.
    assert len(fsynced) == 2 and fsynced[0].startswith(str(tmp_path / ".a.json."))
    assert fsynced[1] == str(tmp_path)


def test_a_scratch_directory_holds_the_temporary_file(tmp_path: Path, fsynced: list[str]) -> None:
    (tmp_path / "scratch").mkdir()
    _fs.atomic_write(tmp_path / "b", b"x", scratch=tmp_path / "scratch")
    assert fsynced[0].startswith(str(tmp_path / "scratch" / ".b."))
    assert (tmp_path / "b").read_bytes() == b"x" and not os.listdir(tmp_path / "scratch")


def test_a_non_durable_write_never_fsyncs(tmp_path: Path, fsynced: list[str]) -> None:
    _fs.atomic_write(tmp_path / "c", b"x", durable=False)
    assert (tmp_path / "c").read_bytes() == b"x" and fsynced == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "d"
    target.write_bytes(b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _fs.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["d"]


def test_fsync_tree_covers_every_file_and_directory(tmp_path: Path, fsynced: list[str]) -> None:
    (tmp_path / "t" / "c" / "0").mkdir(parents=True)
    for rel in ("t/zarr.json", "t/c/0/0", "t/c/0/1"):
        (tmp_path / rel).write_bytes(b"x")
    _fs.fsync_tree(tmp_path / "t")
    want = {"t", "t/zarr.json", "t/c", "t/c/0", "t/c/0/0", "t/c/0/1"}
    assert sorted(fsynced) == sorted(str(tmp_path / rel) for rel in want)


def test_fsync_dir_raises_unless_best_effort(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _fs.fsync_dir(tmp_path / "gone")
    _fs.fsync_dir(tmp_path / "gone", best_effort=True)


def test_fsync_file_flushes_python_buffers_first(tmp_path: Path, fsynced: list[str]) -> None:
    with open(tmp_path / "e", "wb") as f:
        f.write(b"buffered")
        _fs.fsync_file(f)
        assert (tmp_path / "e").read_bytes() == b"buffered"  # on disk before close
    fd = os.open(tmp_path / "e", os.O_RDONLY)
    try:
        _fs.fsync_file(fd)
    finally:
        os.close(fd)
    assert fsynced == [str(tmp_path / "e")] * 2


def test_digests_are_hashlibs(tmp_path: Path) -> None:
    data = os.urandom(3 << 20 | 17)  # more than one 1 MiB block, not a whole number of them
    (tmp_path / "f").write_bytes(data)
    assert _fs.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest() == _fs.sha256_bytes(data)
    assert _fs.sha256_bytes(memoryview(data)[:5]) == hashlib.sha256(data[:5]).hexdigest()
