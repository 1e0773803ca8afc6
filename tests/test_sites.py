"""Site discovery from structure, on tiny configs of every architecture, built locally."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import tiny
import torch
import transformers as tf
from torch import nn
from transformers import AutoModelForCausalLM

from kvw_ledger.errors import BadInputError, UnknownArchitectureError
from kvw_ledger.sites import (
    OVERRIDES,
    Site,
    discover_sites,
    parse_layers,
    select_layers,
    site_weight,
)

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


# --- the model_type table that discovery replaced, kept to prove old ledgers still match ---
#
# Ledgers store their sites in their root attributes and every verb checks the model
# against them, so for each architecture this table covered, discovery must give the
# very same Site list.  This is the table and its matcher as they were (commit dfe90b7).


@dataclass(frozen=True)
class _Rule:
    tower: str
    pattern: str
    axis: int
    kind: str = "linear"


_DECODER = _Rule("language", r"model\.layers\.(?P<layer>\d+)\.mlp\.down_proj", 1)
_VLM_LANGUAGE = _Rule("language", r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.down_proj", 1)
OLD_TABLE: dict[str, tuple[_Rule, ...]] = {
    "llama": (_DECODER,),
    "mistral": (_DECODER,),
    "qwen2": (_DECODER,),
    "qwen3": (_DECODER,),
    "gemma": (_DECODER,),
    "gemma2": (_DECODER,),
    "phi3": (_DECODER,),
    "phi": (_Rule("language", r"model\.layers\.(?P<layer>\d+)\.mlp\.fc2", 1),),
    "gpt2": (_Rule("language", r"transformer\.h\.(?P<layer>\d+)\.mlp\.c_proj", 0),),
    "gpt_neox": (_Rule("language", r"gpt_neox\.layers\.(?P<layer>\d+)\.mlp\.dense_4h_to_h", 1),),
    "opt": (_Rule("language", r"model\.decoder\.layers\.(?P<layer>\d+)\.fc2", 1),),
    "mixtral": (_Rule("language", r"model\.layers\.(?P<layer>\d+)\.mlp\.experts", 1, "experts"),),
    "llava": (
        _VLM_LANGUAGE,
        _Rule(
            "vision",
            r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(?P<layer>\d+)\.mlp\.fc2",
            1,
        ),
    ),
    "qwen2_vl": (_VLM_LANGUAGE, _Rule("vision", r"model\.visual\.blocks\.(?P<layer>\d+)\.mlp\.fc2", 1)),
    "qwen2_5_vl": (
        _VLM_LANGUAGE,
        _Rule("vision", r"model\.visual\.blocks\.(?P<layer>\d+)\.mlp\.down_proj", 1),
    ),
}


def old_table_sites(model: nn.Module, towers: str) -> list[Site]:
    wanted = {"language", "vision"} if towers == "all" else {towers}
    sites: list[Site] = []
    for rule in (r for r in OLD_TABLE[model.config.model_type] if r.tower in wanted):
        for name, module in model.named_modules():
            match = re.fullmatch(rule.pattern, name)
            if not match:
                continue
            layer = int(match.group("layer"))
            if rule.kind == "experts":
                down = module.down_proj
                sites += [
                    Site(f"{name}.{e}", name, f"{name}.down_proj", layer, rule.tower,  # type: ignore[arg-type]
                         int(down.shape[2]), 1, "experts", e)
                    for e in range(int(down.shape[0]))
                ]
            else:
                sites.append(Site(name, name, f"{name}.weight", layer, rule.tower,  # type: ignore[arg-type]
                                  int(module.weight.shape[rule.axis]), rule.axis))
    return sorted(sites, key=lambda s: (s.tower != "vision", s.layer, s.name))


def _qwen2_5_vl():
    return tiny.qwen2_5_vl()


OLD_ARCHITECTURES = {
    **TEXT_MODELS,
    "mixtral": lambda: causal(
        tf.MixtralConfig, **SMALL, num_key_value_heads=2, num_local_experts=12, num_experts_per_tok=2
    ),
    "llava": tiny.llava,
    "qwen2_vl": tiny.qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
}


@pytest.mark.parametrize("name", sorted(OLD_ARCHITECTURES))
def test_discovery_matches_the_old_table_exactly(name: str) -> None:
    model = OLD_ARCHITECTURES[name]()
    assert model.config.model_type == name
    vision = name in ("llava", "qwen2_vl", "qwen2_5_vl")
    for towers in ("language", "vision", "all") if vision else ("language",):
        old = old_table_sites(model, towers)
        assert old, "the old table found nothing: the comparison would be vacuous"
        assert discover_sites(model, towers) == old, towers  # names, params, axis, layer, order


def test_the_old_table_and_discovery_cover_the_same_architectures() -> None:
    assert set(OLD_TABLE) == set(OLD_ARCHITECTURES)


# --- every architecture the tests run, found by structure ----------------------------------


ALL = {**tiny.TEXT_ARCHITECTURES, **tiny.VISION_ARCHITECTURES}


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_site_maps_an_ffn_width_to_the_model_width(name: str) -> None:
    model = ALL[name]()
    towers = "all" if name in tiny.VISION_ARCHITECTURES else "language"
    sites = discover_sites(model, towers)
    text = model.config.get_text_config(decoder=True)
    depth = {"language": text.num_hidden_layers}
    for site in sites:
        weight = site_weight(model, site)
        width = 16  # every tiny config has d_model 16 in both towers
        assert weight.shape[site.axis] == site.n_vectors != width, site
        assert weight.shape[1 - site.axis] == width, site
        assert site.layer < depth.get(site.tower, 99)
    layers = {s.layer for s in sites if s.tower == "language"}
    assert layers == set(range(text.num_hidden_layers)), "a decoder layer has no site"


def test_qwen2_moe_has_every_routed_expert_and_the_shared_expert() -> None:
    model = tiny.TEXT_ARCHITECTURES["qwen2_moe"]()
    sites = [s for s in discover_sites(model) if s.layer == 1]
    routed = [s for s in sites if s.kind == "experts"]
    assert [(s.expert, s.n_vectors, s.param) for s in routed] == [
        (e, 12, "model.layers.1.mlp.experts.down_proj") for e in range(4)
    ]
    shared = [s for s in sites if s.kind == "linear"]
    assert [(s.name, s.n_vectors) for s in shared] == [("model.layers.1.mlp.shared_expert.down_proj", 20)]
    assert site_weight(model, routed[2]).data_ptr() == model.model.layers[1].mlp.experts.down_proj[2].data_ptr()


def test_mllama_language_tower_includes_its_cross_attention_layer() -> None:
    model = tiny.mllama()
    language = discover_sites(model, "language")
    assert [s.name for s in language] == [
        f"model.language_model.layers.{i}.mlp.down_proj" for i in range(3)
    ]
    # Its vision tower has two block lists; the global one is numbered after the local one.
    vision = discover_sites(model, "vision")
    assert [(s.layer, s.name) for s in vision] == [
        (0, "model.vision_model.transformer.layers.0.mlp.fc2"),
        (1, "model.vision_model.transformer.layers.1.mlp.fc2"),
        (2, "model.vision_model.global_transformer.layers.0.mlp.fc2"),
    ]


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


class _TransposedExperts(nn.Module):
    """Fused experts stored [in, out], as GPT-OSS does, with the interface's flags."""

    is_transposed = True
    has_gate = True
    has_bias = False

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 48))  # (E, d_model, 2*d_ff)
        self.down_proj = nn.Parameter(torch.randn(3, 24, 16))  # (E, d_ff, d_model)


def test_transposed_fused_experts_put_value_vectors_on_axis_0() -> None:
    model = TEXT_MODELS["llama"]()
    model.model.layers[0].mlp = _TransposedExperts()
    sites = [s for s in discover_sites(model) if s.layer == 0]
    assert [(s.name, s.axis, s.n_vectors) for s in sites] == [
        (f"model.layers.0.mlp.{e}", 0, 24) for e in range(3)
    ]
    assert site_weight(model, sites[1]).shape == (24, 16)


def test_vision_language_towers() -> None:
    for builder in (tiny.llava, tiny.qwen2_vl):
        model = builder()
        language = discover_sites(model, "language")
        vision = discover_sites(model, "vision")
        both = discover_sites(model, "all")
        assert {s.tower for s in language} == {"language"} and len(language) == 4
        assert {s.tower for s in vision} == {"vision"} and len(vision) == 2
        assert both == vision + language  # forward order: the vision tower runs first


def test_qwen2_5_vl_language_and_gated_vision_mlp() -> None:
    model = tiny.qwen2_5_vl()
    sites = discover_sites(model, "all")
    assert [(s.tower, s.n_vectors) for s in sites] == [("vision", 20)] * 2 + [("language", 24)] * 2


# --- where structure is ambiguous, and where nothing is found --------------------------------


def test_an_override_settles_a_gated_mlp_whose_ffn_width_is_the_model_width() -> None:
    # d_ff == d_model: gate_proj, up_proj and down_proj are all [16, 16].
    model = causal(tf.LlamaConfig, **{**SMALL, "intermediate_size": 16}, num_key_value_heads=2)
    assert OVERRIDES["llama"]
    sites = discover_sites(model)
    assert [s.name for s in sites] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def test_ambiguity_without_an_override_names_the_block_and_explains_site_glob() -> None:
    model = causal(tf.MistralConfig, **{**SMALL, "intermediate_size": 16}, num_key_value_heads=2)
    assert "mistral" not in OVERRIDES
    with pytest.raises(UnknownArchitectureError) as info:
        discover_sites(model)
    message = str(info.value)
    assert message.startswith("block model.layers.0 has several projections")
    assert "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, model.layers.0.mlp.down_proj" in message
    assert "--site-glob 'model.layers.*.mlp.down_proj'" in message
    glob = discover_sites(model, site_glob="model.layers.*.mlp.down_proj")
    assert [s.n_vectors for s in glob] == [16, 16, 16]


def test_unknown_architecture_explains_site_glob() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with pytest.raises(UnknownArchitectureError) as info:
        discover_sites(model)
    message = str(info.value)
    assert "model_type 'Sequential'" in message
    assert "no input embeddings or vision_config to start from" in message
    assert "--site-glob" in message


def test_a_decoder_without_a_recognisable_ffn_explains_site_glob() -> None:
    model = TEXT_MODELS["llama"]()
    for layer in model.model.layers:
        layer.mlp = nn.Identity()
    with pytest.raises(UnknownArchitectureError) as info:
        discover_sites(model)
    message = str(info.value)
    assert "language blocks ['model.layers'] for width 16 from FFN widths [24]" in message
    assert "--site-glob 'model.layers.*.mlp.down_proj'" in message


def test_site_glob_names_modules_of_an_unknown_architecture() -> None:
    model = TEXT_MODELS["llama"]()
    sites = discover_sites(model, site_glob="model.layers.*.mlp.down_proj")
    assert sites == discover_sites(model)
    with pytest.raises(UnknownArchitectureError, match="--site-glob 'nothing.*' matched no module"):
        discover_sites(model, site_glob="nothing.*")
    with pytest.raises(UnknownArchitectureError, match="has no 2-D weight"):
        discover_sites(model, site_glob="model.layers.*.mlp")


def test_site_glob_on_fused_experts_gives_one_site_per_expert() -> None:
    model = tiny.TEXT_ARCHITECTURES["qwen3_moe"]()
    assert discover_sites(model, site_glob="model.layers.*.mlp.experts") == discover_sites(model)


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


def test_the_decoder_is_the_nearest_owner_of_the_embeddings_that_holds_blocks() -> None:
    # BERT keeps its word embeddings in bert.embeddings and its blocks in bert.encoder.layer.
    model = causal(
        tf.BertConfig, vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, is_decoder=True,
    )
    assert [(s.name, s.n_vectors) for s in discover_sites(model)] == [
        (f"bert.encoder.layer.{i}.output.dense", 24) for i in range(2)
    ]


def test_routed_experts_kept_as_separate_modules_are_refused() -> None:
    # transformers before fused experts: a ModuleList of expert MLPs, each fed only its tokens.
    model = TEXT_MODELS["llama"]()
    mlp = model.model.layers[0].mlp
    model.model.layers[0].mlp = nn.Module()
    model.model.layers[0].mlp.experts = nn.ModuleList([mlp, TEXT_MODELS["llama"]().model.layers[0].mlp])
    with pytest.raises(UnknownArchitectureError, match=r"model\.layers\.0\.mlp\.experts is a list of modules inside a block"):
        discover_sites(model)
