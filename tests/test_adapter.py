"""Tests for kvw_ledger.adapter: a version as a peft IA3 adapter equals the full export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
import transformers as tf
from click.testing import CliRunner
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from kvw_ledger.adapter import check_ia3_sites
from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError
from kvw_ledger.export import PROVENANCE_FILE
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.sites import Site

# Strong enough that every weakened site visibly moves the logits.
STRONG = KVWConfig(gamma=1.0)


def _ledger(root: Path, model: nn.Module) -> Ledger:
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    ledger = Ledger.create(root / "ledger", model_dir, progress=False)
    ledger.retain(tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40)), progress=False)
    ledger.forget(tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(2, 0)), request_id="a",
                  config=STRONG, limits=ledger.limits(on_fail="warn"), progress=False)  # fmt: skip
    rescaled = KVWConfig(gamma=1.0, rescale=True)
    ledger.forget(tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 5)), request_id="b",
                  config=rescaled, limits=ledger.limits(on_fail="warn"), progress=False)  # fmt: skip
    return ledger


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    return _ledger(tmp_path_factory.mktemp("llama"), tiny.llama())


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    return _ledger(tmp_path_factory.mktemp("gpt2"), tiny.gpt2())


IDS = torch.tensor([[5, 17, 30, 44, 61, 70, 12, 9]])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("at", ["HEAD", "a"])
def test_the_adapter_gives_the_full_exports_logits_and_weights(
    which: str, at: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ledger: Ledger = request.getfixturevalue(which)
    version = ledger.resolve(at)
    assert ledger.export(tmp_path / "full", at=at, progress=False) == version
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    adapter_dir = tmp_path / "adapter"
    assert ledger.export(adapter_dir, at=at, format="peft") == version
    base = AutoModelForCausalLM.from_pretrained(ledger.model_dir())
    base_logits = _logits(base)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    want = _logits(full)
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the version really differs from the base
    torch.testing.assert_close(_logits(peft_model), want, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    full_state, merged_state = full.state_dict(), merged.state_dict()
    assert sorted(merged_state) == sorted(full_state)
    for key, value in full_state.items():
        assert torch.equal(merged_state[key], value), key  # the same float32 products
    provenance = json.loads((adapter_dir / PROVENANCE_FILE).read_text())
    assert provenance["ledger_version"] == ledger.resolve(at)
    assert provenance["active_requests"] == (["a", "b"] if at == "HEAD" else ["a"])


def test_cli_export_peft_and_refusal_of_moe_experts(llama: Ledger, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(llama.path), str(tmp_path / "ad"), "--format", "peft", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output == f"exported version {llama.resolve('HEAD')} to {tmp_path / 'ad'}\n"
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", PROVENANCE_FILE]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == config["target_modules"]

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                           num_experts_per_tok=1)  # fmt: skip
    model_dir = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    moe = Ledger.create(tmp_path / "moe", model_dir, progress=False)
    result = runner.invoke(main, ["export", str(moe.path), str(tmp_path / "moe-ad"), "--format", "peft"])
    assert result.exit_code == 2
    assert "site model.layers.0.mlp.experts.0 is one expert of the fused MoE module" in result.output
    assert not (tmp_path / "moe-ad").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_sites_ia3_cannot_hold_are_refused_by_name() -> None:
    linear = Site("m.0", "m.0", "m.0.weight", 0, "language", 4, 1)
    conv = Site("h.1", "h.1", "h.1.weight", 1, "language", 4, 0)
    assert check_ia3_sites([linear]) is False and check_ia3_sites([conv]) is True
    with pytest.raises(BadInputError, match="site h.1 is a Conv1D while other sites are Linear"):
        check_ia3_sites([linear, conv])
    with pytest.raises(BadInputError, match="--format must be one of safetensors, peft"):
        Ledger.export(None, "out", format="onnx")  # type: ignore[arg-type]
