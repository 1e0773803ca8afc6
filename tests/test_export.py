"""Tests for kvw_ledger.export: the streaming, atomic safetensors writer."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from kvw_ledger.errors import BadInputError, LedgerExistsError
from kvw_ledger.export import (
    PROVENANCE_FILE,
    PROVENANCE_KEY,
    TensorInfo,
    export_model,
    read_safetensors_header,
)
from kvw_ledger.model_files import weight_files

TEXT: dict[str, Any] = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2)
PROVENANCE = {"ledger": "led", "version": 3, "requests": ["r1", "r2"], "note": "ünïcode"}
TARGET = "model.layers.1.mlp.down_proj.weight"


def identity(file: str, key: str, t: torch.Tensor) -> None:
    return None


def _llama(path: Path, dtype: torch.dtype = torch.float32, **save: Any) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tf.LlamaConfig(**TEXT)).to(dtype)
    model.save_pretrained(path, **save)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("src") / "llama", max_shard_size="20KB")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("src") / "bf16", dtype=torch.bfloat16)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_identity_export_is_bit_identical_and_loads(sharded: Path, tmp_path: Path) -> None:
    out = export_model(sharded, tmp_path / "out", identity, PROVENANCE, progress=False)
    assert out == tmp_path / "out"
    shards = weight_files(sharded)
    assert len(shards) >= 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in shards), "config.json", "generation_config.json",
         "model.safetensors.index.json", "tokenizer_config.json", PROVENANCE_FILE]
    )
    for name in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]:
        assert (out / name).read_bytes() == (sharded / name).read_bytes()
    for src in shards:
        before, after = _tensors(src), _tensors(out / src.name)
        assert list(after) == list(before)
        for key, t in before.items():
            assert after[key].dtype == t.dtype
            assert torch.equal(_bits(after[key]), _bits(t))

    ids = torch.tensor([[1, 5, 9, 13, 2, 40]])
    original = AutoModelForCausalLM.from_pretrained(sharded).eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)
    assert _leftovers(tmp_path) == []


def test_format_header_and_data_layout(sharded: Path, tmp_path: Path) -> None:
    out = export_model(sharded, tmp_path / "out", identity, PROVENANCE, progress=False)
    for src in weight_files(sharded):
        dst = out / src.name
        src_n = struct.unpack("<Q", src.read_bytes()[:8])[0]
        dst_n = struct.unpack("<Q", dst.read_bytes()[:8])[0]
        assert dst_n % 8 == 0
        # Only the header grows (by the provenance); the data section is the same size and bytes.
        assert dst.stat().st_size - 8 - dst_n == src.stat().st_size - 8 - src_n
        assert dst.read_bytes()[8 + dst_n :] == src.read_bytes()[8 + src_n :]
        src_info, src_meta = read_safetensors_header(src)
        dst_info, dst_meta = read_safetensors_header(dst)
        assert list(dst_info.items()) == list(src_info.items())
        assert dst_meta == {**src_meta, PROVENANCE_KEY: json.dumps(PROVENANCE, sort_keys=True)}


def test_scaling_one_key(sharded: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def halve(file: str, key: str, t: torch.Tensor) -> torch.Tensor | None:
        seen.append((file, key))
        return t * 0.5 if key == TARGET else None

    out = export_model(sharded, tmp_path / "out", halve, PROVENANCE, progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(seen) == sorted((file, key) for key, file in index.items())  # each tensor once
    for src in weight_files(sharded):
        before, after = _tensors(src), _tensors(out / src.name)
        for key, t in before.items():
            expected = t * 0.5 if key == TARGET else t
            assert torch.equal(_bits(after[key]), _bits(expected)), key
    assert any(k == TARGET for _, k in seen)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "user-space"])
def test_untouched_tensors_are_copied_without_the_transform(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    if not kernel_copy:  # a file system copy_file_range cannot work across

        def refuse(*args: object) -> int:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    seen: list[str] = []

    def halve(file: str, key: str, t: torch.Tensor) -> torch.Tensor | None:
        seen.append(key)
        return t * 0.5

    touches = lambda file, key: key == TARGET  # noqa: E731
    out = export_model(sharded, tmp_path / "out", halve, PROVENANCE, progress=False, touches=touches)
    assert seen == [TARGET]  # only the touched tensor was read and transformed
    for src in weight_files(sharded):
        before, after = _tensors(src), _tensors(out / src.name)
        assert list(after) == list(before)
        for key, t in before.items():
            expected = t * 0.5 if key == TARGET else t
            assert torch.equal(_bits(after[key]), _bits(expected)), key
    only_target = lambda file, key, t: t * 0.5 if key == TARGET else None  # noqa: E731
    reference = export_model(sharded, tmp_path / "ref", only_target, PROVENANCE, progress=False)
    for src in weight_files(sharded):  # byte for byte what the read-everything path writes
        assert (out / src.name).read_bytes() == (reference / src.name).read_bytes()


def test_a_truncated_shard_is_named_on_the_copy_path_too(sharded: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded, tmp_path / "src"))
    shard = weight_files(copy)[-1]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    with pytest.raises(BadInputError, match=shard.name):
        export_model(copy, tmp_path / "out", identity, PROVENANCE, progress=False,
                     touches=lambda file, key: False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_bfloat16_round_trips_bit_exactly(bf16: Path, tmp_path: Path) -> None:
    src = weight_files(bf16)[0]
    assert read_safetensors_header(src)[0][TARGET].dtype == "BF16"
    same = export_model(bf16, tmp_path / "same", identity, PROVENANCE, progress=False)
    assert (same / src.name).read_bytes()[-4096:] == src.read_bytes()[-4096:]
    for key, t in _tensors(src).items():
        assert torch.equal(_bits(_tensors(same / src.name)[key]), _bits(t))

    def double(file: str, key: str, t: torch.Tensor) -> torch.Tensor | None:
        return t * 2 if key == TARGET else None

    scaled = export_model(bf16, tmp_path / "scaled", double, PROVENANCE, progress=False)
    before, after = _tensors(src), _tensors(scaled / src.name)
    assert after[TARGET].dtype == torch.bfloat16
    assert torch.equal(_bits(after[TARGET]), _bits(before[TARGET] * 2))


def test_provenance_everywhere(sharded: Path, tmp_path: Path) -> None:
    out = export_model(sharded, tmp_path / "out", identity, PROVENANCE, progress=False)
    assert json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8")) == PROVENANCE
    for src in weight_files(sharded):
        with safe_open(str(out / src.name), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"  # the source's metadata is kept
        assert json.loads(meta[PROVENANCE_KEY]) == PROVENANCE


def test_export_permissions_are_servable(sharded: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(sharded, tmp_path / "src"))
    for p in src.iterdir():
        p.chmod(0o444)  # a read-only source, as on a read-only mount
    out = export_model(src, tmp_path / "out", identity, PROVENANCE, progress=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_tensors_are_streamed_one_at_a_time(sharded: Path, tmp_path: Path) -> None:
    """When tensor k is handed to the transform, exactly tensors 0..k-1 are on disk."""
    out_dir = tmp_path / "out"
    checked: list[str] = []

    def check(file: str, key: str, t: torch.Tensor) -> None:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # private while being built
        info, _ = read_safetensors_header(sharded / file)
        header_len = struct.unpack("<Q", (tmp / file).read_bytes()[:8])[0]
        begin = info[key].data_offsets[0]
        assert (tmp / file).stat().st_size == 8 + header_len + begin
        checked.append(key)

    export_model(sharded, out_dir, check, PROVENANCE, progress=False)
    total = sum(len(read_safetensors_header(p)[0]) for p in weight_files(sharded))
    assert len(checked) == total


def test_failing_transform_leaves_nothing(sharded: Path, tmp_path: Path) -> None:
    calls = 0

    def boom(file: str, key: str, t: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("transform failed")

    with pytest.raises(RuntimeError, match="transform failed"):
        export_model(sharded, tmp_path / "out", boom, PROVENANCE, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_or_dtype_names_file_and_key(sharded: Path, tmp_path: Path) -> None:
    def transpose(file: str, key: str, t: torch.Tensor) -> torch.Tensor | None:
        return t.T if key == TARGET else None

    with pytest.raises(BadInputError, match=rf"{TARGET}.*keep dtype and shape") as err:
        export_model(sharded, tmp_path / "out", transpose, PROVENANCE, progress=False)
    assert ".safetensors" in str(err.value)

    def widen(file: str, key: str, t: torch.Tensor) -> torch.Tensor | None:
        return t.double() if key == TARGET else None

    with pytest.raises(BadInputError, match=TARGET):
        export_model(sharded, tmp_path / "out", widen, PROVENANCE, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LedgerExistsError, match="out"):
        export_model(sharded, out, identity, PROVENANCE, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LedgerExistsError):
        export_model(sharded, a_file, identity, PROVENANCE, progress=False)
    assert _leftovers(tmp_path) == []


def test_empty_existing_dir_is_replaced(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    out.mkdir(parents=True)
    export_model(sharded, out, identity, PROVENANCE, progress=False)
    assert (out / PROVENANCE_FILE).is_file()


def test_bad_inputs_create_nothing(sharded: Path, tmp_path: Path) -> None:
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(BadInputError, match="safetensors"):
        export_model(bin_only, tmp_path / "out", identity, PROVENANCE, progress=False)

    with pytest.raises(BadInputError, match="JSON"):
        export_model(sharded, tmp_path / "out", identity, {"x": object()}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_progress_bar_goes_to_stderr(sharded: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    export_model(sharded, tmp_path / "out", identity, PROVENANCE)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "export out" in captured.err


def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_read_header_of_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(path),
              metadata={"format": "pt"})
    info, meta = read_safetensors_header(path)
    assert meta == {"format": "pt"}
    assert info["a"] == TensorInfo("F32", (2, 3), info["a"].data_offsets)
    assert info["a"].nbytes == 24 and info["b"].nbytes == 8


@pytest.mark.parametrize(
    "content",
    [
        b"\x01\x02\x03",  # shorter than the length prefix
        struct.pack("<Q", 1 << 40) + b"{}",  # header longer than the file
        struct.pack("<Q", 4) + b"{]]]",  # not JSON
        struct.pack("<Q", 2) + b"[]",  # not an object
        b"",
    ],
)
def test_garbled_headers_name_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=r"bad\.safetensors"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("entry", "data"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # truncated
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),  # wrong size
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # gap
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        ({"__metadata__": {"n": 1}}, b""),  # metadata values must be strings
    ],
)
def test_inconsistent_headers_are_bad_input(tmp_path: Path, entry: dict[str, Any], data: bytes) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", json.dumps(entry).encode(), data)
    with pytest.raises(BadInputError, match=r"bad\.safetensors"):
        read_safetensors_header(path)


def test_duplicate_keys_are_bad_input(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
          b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = _raw_file(tmp_path / "dup.safetensors", raw, b"\0")
    with pytest.raises(BadInputError, match="duplicate"):
        read_safetensors_header(path)


def test_export_refuses_a_garbled_shard(sharded: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded, tmp_path / "src"))
    shard = weight_files(copy)[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    with pytest.raises(BadInputError, match=shard.name):
        export_model(copy, tmp_path / "out", identity, PROVENANCE, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]
