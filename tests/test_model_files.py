"""Tests for kvw_ledger.model_files: weight files, fingerprints, content-based tensor lookup."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from kvw_ledger.errors import BadInputError, ModelMismatchError
from kvw_ledger.model_files import (
    TensorLocation,
    check_fingerprint,
    copyable_files,
    fingerprint,
    locate_tensors,
    weight_files,
)

TEXT: dict[str, Any] = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2)


def _save(model: PreTrainedModel, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tf.LlamaConfig(**TEXT))
    return _save(model, tmp_path_factory.mktemp("llama"), max_shard_size="20KB")


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8),
        image_token_index=63,
    )
    model = AutoModelForImageTextToText.from_config(cfg)
    return model, _save(model, tmp_path_factory.mktemp("llava"))


def test_weight_files_follow_the_index(sharded_dir: Path, tmp_path: Path) -> None:
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    expected = sorted(set(index["weight_map"].values()))
    assert len(expected) >= 2
    assert [p.name for p in weight_files(sharded_dir)] == expected

    # A stray safetensors file next to an index (e.g. consolidated.safetensors) is not a shard.
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    shutil.copy(copy / expected[0], copy / "consolidated.safetensors")
    assert [p.name for p in weight_files(copy)] == expected


def test_weight_files_without_index(llava: tuple[PreTrainedModel, Path]) -> None:
    _, path = llava
    assert [p.name for p in weight_files(path)] == ["model.safetensors"]


def test_index_naming_a_missing_or_foreign_shard(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    first = weight_files(copy)[0]
    first.unlink()
    with pytest.raises(BadInputError, match=first.name):
        weight_files(copy)

    index = copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["x"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="elsewhere"):
        weight_files(copy)


def test_pickle_only_model_is_refused_with_advice(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    # Garbage bytes: if anything tried to unpickle them the error would be different.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(BadInputError, match=r"pytorch_model\.bin.*safetensors") as err:
        weight_files(tmp_path)
    assert "safe_serialization=True" in str(err.value)
    with pytest.raises(BadInputError):
        fingerprint(tmp_path)


def test_not_a_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not a directory"):
        weight_files(tmp_path / "nope")


def test_fingerprint_covers_every_shard_and_config(sharded_dir: Path) -> None:
    fp = fingerprint(sharded_dir)
    assert set(fp["files"]) == {p.name for p in weight_files(sharded_dir)}
    assert all(len(d) == 64 for d in [*fp["files"].values(), fp["config"]])
    assert fingerprint(sharded_dir) == fp
    check_fingerprint(sharded_dir, fp)


def test_a_file_written_after_its_hash_is_hashed_again(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    recorded = fingerprint(copy)
    target = weight_files(copy)[-1]
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    with target.open("r+b") as f:  # same inode, same size
        f.write(raw)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(ModelMismatchError, match=target.name):
        check_fingerprint(copy, recorded)


def test_one_changed_byte_is_named(sharded_dir: Path, tmp_path: Path) -> None:
    recorded = fingerprint(sharded_dir)
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    target = weight_files(copy)[-1]
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor's data
    target.write_bytes(bytes(raw))

    changed = fingerprint(copy)
    assert changed["files"][target.name] != recorded["files"][target.name]
    assert {k: v for k, v in changed["files"].items() if k != target.name} == {
        k: v for k, v in recorded["files"].items() if k != target.name
    }
    with pytest.raises(ModelMismatchError, match=target.name) as err:
        check_fingerprint(copy, recorded)
    assert "pass the model directory given to `init`, or create a new ledger" in str(err.value)


def test_missing_extra_and_config_changes_are_named(sharded_dir: Path, tmp_path: Path) -> None:
    recorded = fingerprint(sharded_dir)
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))

    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"config\.json differs"):
        check_fingerprint(copy, recorded)

    fewer = dict(recorded, files=dict(recorded["files"]))
    extra = sorted(fewer["files"])[-1]
    del fewer["files"][extra]
    with pytest.raises(ModelMismatchError, match=rf"{extra} is extra"):
        check_fingerprint(copy, fewer)

    more = dict(recorded, files={**recorded["files"], "model-00009-of-00009.safetensors": "0" * 64})
    with pytest.raises(ModelMismatchError, match=r"model-00009-of-00009\.safetensors is missing"):
        check_fingerprint(copy, more)


def test_locate_llava_renamed_keys(llava: tuple[PreTrainedModel, Path]) -> None:
    model, path = llava
    state = model.state_dict()
    names = [
        "model.language_model.layers.0.mlp.down_proj.weight",
        "model.language_model.layers.1.mlp.down_proj.weight",
        "model.vision_tower.encoder.layers.1.mlp.fc2.weight",
    ]
    found = locate_tensors(path, {n: state[n] for n in names})
    assert {loc.file for loc in found.values()} == {"model.safetensors"}
    assert [found[n].key for n in names] == [
        "language_model.model.layers.0.mlp.down_proj.weight",
        "language_model.model.layers.1.mlp.down_proj.weight",
        "vision_tower.encoder.layers.1.mlp.fc2.weight",
    ]


def test_locate_mixtral_fused_experts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tf.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)
    )
    path = _save(model, tmp_path / "mixtral")
    fused = model.state_dict()["model.layers.0.mlp.experts.down_proj"]  # (experts, d_model, d_ff)
    wanted = {f"model.layers.0.mlp.experts.down_proj[{e}]": fused[e] for e in range(4)}
    found = locate_tensors(path, wanted)
    assert [found[f"model.layers.0.mlp.experts.down_proj[{e}]"].key for e in range(4)] == [
        f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)
    ]


def test_locate_gpt2_conv1d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = _save(model, tmp_path / "gpt2")
    name = "transformer.h.0.mlp.c_proj.weight"
    found = locate_tensors(path, {name: model.state_dict()[name]})
    assert found == {name: TensorLocation("model.safetensors", name)}


def test_locate_across_shards(sharded_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(sharded_dir)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"]
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    found = locate_tensors(sharded_dir, {n: model.state_dict()[n] for n in names})
    assert found == {n: TensorLocation(index[n], n) for n in names}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text("{}")
    return path


def test_ties_break_by_name_suffix_or_fail(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    path = _write(tmp_path, {"a.x.weight": w.clone(), "b.y.weight": w.clone()})
    assert locate_tensors(path, {"model.y.weight": w}) == {
        "model.y.weight": TensorLocation("model.safetensors", "b.y.weight")
    }
    with pytest.raises(BadInputError, match=r"z\.weight matches several"):
        locate_tensors(path, {"z.weight": w})


def test_no_match_names_tensor_and_dir(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    path = _write(tmp_path, {"w": w})
    changed = w.clone()
    changed[2, 1] += 1  # same edges (first and last row), different content
    with pytest.raises(BadInputError, match="mine") as err:
        locate_tensors(path, {"mine": changed})
    assert str(path) in str(err.value)
    with pytest.raises(BadInputError, match="mine"):
        locate_tensors(path, {"mine": w.to(torch.float16)})
    with pytest.raises(BadInputError, match="mine"):
        locate_tensors(path, {"mine": w.T.contiguous()})


def test_match_is_bitwise(tmp_path: Path) -> None:
    w = torch.tensor([[float("nan"), -0.0], [1.0, 2.0]])
    path = _write(tmp_path, {"w": w})
    # NaN matches itself bitwise; -0.0 does not match 0.0 although they compare equal.
    assert locate_tensors(path, {"m": w.clone()})["m"].key == "w"
    other = w.clone()
    other[0, 1] = 0.0
    with pytest.raises(BadInputError, match="m"):
        locate_tensors(path, {"m": other})


def test_locate_bfloat16_and_slices(tmp_path: Path) -> None:
    fused = torch.randn(3, 4, 5).to(torch.bfloat16)
    path = _write(tmp_path, {f"e.{i}.w": fused[i].clone() for i in range(3)})
    found = locate_tensors(path, {f"fused[{i}]": fused[i] for i in range(3)})
    assert [loc.key for loc in found.values()] == ["e.0.w", "e.1.w", "e.2.w"]


def test_copyable_files_rule(tmp_path: Path) -> None:
    keep = [
        "README.md", "LICENSE", "added_tokens.json", "chat_template.jinja", "config.json",
        "generation_config.json", "merges.txt", "model.safetensors.index.json",
        "preprocessor_config.json", "processor_config.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "video_preprocessor_config.json", "vocab.json",
    ]
    drop = [
        "model-00001-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin",
        "pytorch_model.bin.index.json", "model.pt", "model.pth", "x.ckpt", "y.pkl",
        "tf_model.h5", "flax_model.msgpack", ".gitattributes", "zarr.json",
        "kvw_provenance.json", "ledger.zarr.zip",
    ]
    for name in keep + drop:
        (tmp_path / name).write_text("x")
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "zarr.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "config.json")  # HF cache style
    assert [p.name for p in copyable_files(tmp_path)] == sorted([*keep, "link.json"])
