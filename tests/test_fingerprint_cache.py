"""The model fingerprint cache: an unchanged model is not re-read, any rewrite is caught.

Files are rewritten with new bytes of the same size, at once (the same second, often
the same clock tick), with mtime put back by ``os.utime`` and as a new file moved
into place; git's racy-timestamp rule is checked on both sides of the boundary; a
damaged cache is ignored; ``verify`` hashes every file whatever the cache says; the
cache is no part of the ledger (never hashed, named or pushed).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from kvw_ledger import fingerprint_cache, model_files
from kvw_ledger.errors import ModelMismatchError
from kvw_ledger.fingerprint_cache import CACHE_NAME, FingerprintCache
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.model_files import check_fingerprint, fingerprint, weight_files

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2)  # fmt: skip


@pytest.fixture(autouse=True)
def no_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    # The coarse-filesystem margin (2 s) would make every test wait; the strict rule stays.
    monkeypatch.setattr(fingerprint_cache, "RACY_MARGIN_NS", 0)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model"
    AutoModelForCausalLM.from_config(tf.LlamaConfig(**TEXT)).save_pretrained(path, max_shard_size="20KB")
    _tick()
    return path


def _tick() -> None:
    """Lets the filesystem clock move past the files just written (one tick is a few ms)."""
    time.sleep(0.05)


class Reads:
    """The files model_files opens to hash (loading, exporting or checking the
    architecture read files too: not counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = Path.open

        def counting(path: Path, *args: object, **kwargs: object) -> object:
            if sys._getframe(1).f_code is model_files._hash_files.__code__:
                self.names.append(path.name)
            return real(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "open", counting)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    yield Reads(monkeypatch)


def _cached(model: Path, cache_file: Path) -> dict[str, object]:
    return fingerprint(model, progress=False, cache=FingerprintCache.open(cache_file))


def _rewrite_same_size(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    with path.open("r+b") as fh:  # same inode, same size, new bytes
        fh.write(raw)


def test_an_unchanged_model_is_not_read_again(model: Path, tmp_path: Path, reads: Reads) -> None:
    cache_file = tmp_path / CACHE_NAME
    first = _cached(model, cache_file)
    n_files = len(weight_files(model)) + 1
    assert len(reads.names) == n_files >= 3  # two shards and the config
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
    reads.names.clear()
    assert _cached(model, cache_file) == first
    assert reads.names == []
    assert fingerprint(model, progress=False) == first  # without a cache: every file read
    assert len(reads.names) == n_files


@pytest.mark.parametrize("how", ["in place", "mtime put back", "new file, mtime put back"])
def test_a_same_size_rewrite_is_caught_at_once(model: Path, tmp_path: Path, how: str) -> None:
    cache_file = tmp_path / CACHE_NAME
    recorded = _cached(model, cache_file)
    assert FingerprintCache.open(cache_file).get(fingerprint_cache.stat_key(model / "config.json"))
    target = weight_files(model)[-1]
    before = target.stat()
    if how == "new file, mtime put back":
        fresh = target.with_name("replacement.tmp")
        shutil.copyfile(target, fresh)
        _rewrite_same_size(fresh)
        os.replace(fresh, target)  # a new inode under the old name
    else:
        _rewrite_same_size(target)
    if how != "in place":
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert after.st_size == before.st_size
    if how != "in place":
        assert after.st_mtime_ns == before.st_mtime_ns  # only ctime (and the inode) tell
    with pytest.raises(ModelMismatchError, match=target.name):
        check_fingerprint(model, recorded, progress=False, cache=FingerprintCache.open(cache_file))


def test_a_file_not_older_than_the_cache_is_hashed_again(model: Path, tmp_path: Path, reads: Reads) -> None:
    cache_file = tmp_path / CACHE_NAME
    _cached(model, cache_file)
    target = weight_files(model)[0]
    st = target.stat()
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    # git's racy rule: an entry is trusted only when strictly older than the cache file.
    os.utime(cache_file, ns=(newest, newest))
    reads.names.clear()
    _cached(model, cache_file)
    assert target.name in reads.names
    os.utime(cache_file, ns=(newest + 1, newest + 1))  # the save above stamped it; set it again
    reads.names.clear()
    _cached(model, cache_file)
    assert target.name not in reads.names


def test_a_file_changed_while_hashed_is_not_remembered(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_file = tmp_path / CACHE_NAME
    target = weight_files(model)[0]
    real = fingerprint_cache.stat_key
    calls = {"n": 0}

    def drifting(path: Path) -> fingerprint_cache.StatKey:
        key = real(path)
        if path == target:
            calls["n"] += 1
            if calls["n"] == 2:  # the check after reading: as if written meanwhile
                return (*key[:4], key[4] + 1, key[5])  # type: ignore[return-value]
        return key

    monkeypatch.setattr(model_files, "stat_key", drifting)
    _cached(model, cache_file)
    entries = json.loads(cache_file.read_text())["entries"]
    assert str(target.resolve()) not in {e["path"] for e in entries}
    assert len(entries) == len(weight_files(model))  # every other file (and config) remembered


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "digest changed", "seal removed", "other format", "empty"],
)
def test_a_damaged_cache_is_ignored(model: Path, tmp_path: Path, reads: Reads, damage: str) -> None:
    cache_file = tmp_path / CACHE_NAME
    recorded = _cached(model, cache_file)
    raw = cache_file.read_text()
    body = json.loads(raw)
    if damage == "garbage":
        text = "\x00\xff not json"
    elif damage == "truncated":
        text = raw[: len(raw) // 2]
    elif damage == "digest changed":
        body["entries"][0]["sha256"] = "0" * 64
        text = json.dumps(body)
    elif damage == "seal removed":
        del body["seal"]
        text = json.dumps(body)
    elif damage == "other format":
        body["format"] = 99
        text = json.dumps(body)
    else:
        text = ""
    stamp = cache_file.stat().st_mtime_ns
    cache_file.write_text(text)
    os.utime(cache_file, ns=(stamp, stamp))
    reads.names.clear()
    assert _cached(model, cache_file) == recorded
    assert len(reads.names) == len(weight_files(model)) + 1  # everything hashed again
    assert json.loads(cache_file.read_text())["seal"]  # and a sound cache written in its place


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    model_dir = tmp_path / "model"
    tiny.llama().save_pretrained(model_dir, max_shard_size="20KB")
    tiny.char_tokenizer().save_pretrained(model_dir)
    _tick()
    ledger = Ledger.create(tmp_path / "led", model_dir, progress=False)
    ledger.retain(tiny.write_jsonl(tmp_path / "r.jsonl", tiny.qa_records(2, 40)), progress=False)
    return ledger


def test_commands_on_an_unchanged_model_read_no_weight_file_and_verify_reads_all(
    ledger: Ledger, tmp_path: Path, reads: Reads
) -> None:
    model_dir = ledger.model_dir()
    n_files = len(weight_files(model_dir)) + 1
    forget = tiny.write_jsonl(tmp_path / "f.jsonl", tiny.qa_records(2, 0))
    reads.names.clear()
    ledger.forget(forget, request_id="A", config=KVWConfig(gamma=0.5), progress=False)
    assert reads.names == []  # retain (after init) left the digests in the cache
    out = tmp_path / "export"
    Ledger.open(ledger.path).export(out, progress=False)
    assert reads.names == []
    report = Ledger.open(ledger.path).verify()
    assert report.ok and not report.problems  # the cache is no file of the ledger
    assert len(reads.names) == n_files  # verify trusts no remembered digest
    named = {f for e in ledger.entries() for f in e.files}
    assert CACHE_NAME not in named and CACHE_NAME not in ledger.store.files()


def test_a_changed_model_is_refused_by_the_next_command(ledger: Ledger, tmp_path: Path) -> None:
    target = weight_files(ledger.model_dir())[-1]
    before = target.stat()
    _rewrite_same_size(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ModelMismatchError, match=target.name):
        Ledger.open(ledger.path).export(tmp_path / "out", progress=False)


def test_a_url_ledger_keeps_its_cache_in_the_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: Reads
) -> None:
    import uuid

    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setenv("KVW_LEDGER_CACHE", str(tmp_path / "mirrors"))
    model_dir = tmp_path / "model"
    tiny.llama().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    _tick()
    bucket = f"/fp-{uuid.uuid4().hex[:12]}"
    try:
        ledger = Ledger.create(f"memory://{bucket}/ledger", model_dir, progress=False)
        ledger.retain(tiny.write_jsonl(tmp_path / "r.jsonl", tiny.qa_records(2, 40)), progress=False)
        assert (ledger.path / CACHE_NAME).is_file()  # ledger.path is the mirror
        assert not MemoryFileSystem().exists(f"{bucket}/ledger/{CACHE_NAME}")
        reads.names.clear()
        Ledger.open(f"memory://{bucket}/ledger").export(tmp_path / "out", progress=False)
        assert reads.names == []
    finally:
        fs = MemoryFileSystem()
        if fs.exists(bucket):
            fs.rm(bucket, recursive=True)
