"""Site discovery on tiny configs of every architecture in the table, built locally."""

from __future__ import annotations

import pytest
import tiny
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from kvw_ledger.errors import BadInputError, UnknownArchitectureError
from kvw_ledger.sites import ARCHITECTURES, discover_sites, parse_layers, select_layers, site_weight

SMALL = dict(
    vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2
)


def causal(config_cls, **kw):
    return AutoModelForCausalLM.from_config(config_cls(**kw))


TEXT_MODELS = {
    "llama": lambda: causal(tf.LlamaConfig, **SMALL, num_key_value_heads=2),
    "mistral": lambda: causal(tf.MistralConfig, **SMALL, num_key_value_heads=2),
    "qwen2": lambda: causal(tf.Qwen2Config, **SMALL, num_key_value_heads=2),
    "qwen3": lambda: causal(tf.Qwen3Config, **SMALL, num_key_value_heads=2, head_dim=8),
    "gemma": lambda: causal(tf.GemmaConfig, **SMALL, num_key_value_heads=1, head_dim=8),
    "gemma2": lambda: causal(tf.Gemma2Config, **SMALL, num_key_value_heads=1, head_dim=8),
    "phi3": lambda: causal(tf.Phi3Config, **SMALL, num_key_value_heads=2, pad_token_id=0),
    "phi": lambda: causal(tf.PhiConfig, **SMALL),
    "gpt_neox": lambda: causal(tf.GPTNeoXConfig, **SMALL),
    "opt": lambda: causal(
        tf.OPTConfig,
        vocab_size=64,
        hidden_size=16,
        ffn_dim=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    ),
    "gpt2": lambda: causal(
        tf.GPT2Config, vocab_size=64, n_embd=16, n_inner=24, n_layer=3, n_head=2
    ),
}


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_text_architectures_expose_one_site_per_layer(name: str) -> None:
    model = TEXT_MODELS[name]()
    assert model.config.model_type == name
    sites = discover_sites(model)
    assert [s.layer for s in sites] == [0, 1, 2]
    for site in sites:
        weight = site_weight(model, site)
        assert site.n_vectors == 24 == weight.shape[site.axis]
        assert weight.shape[1 - site.axis] == 16
    assert sites[0].axis == (0 if name == "gpt2" else 1)


def test_mixtral_experts_are_one_site_each() -> None:
    model = causal(
        tf.MixtralConfig, **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )
    sites = discover_sites(model)
    assert len(sites) == 3 * 4
    assert {s.kind for s in sites} == {"experts"}
    site = sites[5]
    assert (site.layer, site.expert, site.name) == (1, 1, "model.layers.1.mlp.experts.1")
    weight = site_weight(model, site)
    assert weight.shape == (16, 24)
    assert weight.data_ptr() == model.model.layers[1].mlp.experts.down_proj[1].data_ptr()


@pytest.mark.parametrize("builder", [tiny.llava, tiny.qwen2_vl])
def test_vision_language_towers(builder) -> None:
    model = builder()
    language = discover_sites(model, "language")
    vision = discover_sites(model, "vision")
    both = discover_sites(model, "all")
    assert {s.tower for s in language} == {"language"} and len(language) == 4
    assert {s.tower for s in vision} == {"vision"} and len(vision) == 2
    assert both == vision + language  # forward order: the vision tower runs first


def test_qwen2_5_vl_language_and_gated_vision_mlp() -> None:
    cfg = tf.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=20,
            num_heads=2,
            out_hidden_size=16,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            fullatt_block_indexes=[1],
        ),
    )
    model = AutoModelForImageTextToText.from_config(cfg)
    sites = discover_sites(model, "all")
    assert [(s.tower, s.n_vectors) for s in sites] == [("vision", 20)] * 2 + [("language", 24)] * 2


def test_unknown_architecture_lists_what_was_looked_for() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with pytest.raises(UnknownArchitectureError) as info:
        discover_sites(model)
    message = str(info.value)
    assert "model_type 'Sequential'" in message and "the type is not in the table" in message
    assert "--site-glob" in message and "llama" in message


def test_site_glob_names_modules_of_an_unknown_architecture() -> None:
    model = TEXT_MODELS["llama"]()
    sites = discover_sites(model, site_glob="model.layers.*.mlp.down_proj")
    assert sites == discover_sites(model)
    with pytest.raises(UnknownArchitectureError, match="--site-glob 'nothing.*' matched no module"):
        discover_sites(model, site_glob="nothing.*")


def test_known_architecture_without_vision_tower() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"towers \['vision'\]"):
        discover_sites(TEXT_MODELS["llama"](), "vision")
    with pytest.raises(
        BadInputError, match="--sites must be one of language, vision, all, not 'both'"
    ):
        discover_sites(TEXT_MODELS["llama"](), "both")


def test_layer_ranges() -> None:
    assert parse_layers("1:25") == (1, 25)
    for bad in ("1-25", "a:b", "5:2", ""):
        with pytest.raises(BadInputError, match="--layers"):
            parse_layers(bad)
    sites = discover_sites(TEXT_MODELS["llama"]())
    assert [s.layer for s in select_layers(sites, (1, 25))] == [1, 2]  # clipped to the depth


def test_every_table_entry_is_exercised() -> None:
    covered = set(TEXT_MODELS) | {"mixtral", "llava", "qwen2_vl", "qwen2_5_vl"}
    assert set(ARCHITECTURES) == covered
