"""Tiny models, tokenizers and data built locally for the tests: nothing is downloaded."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
]
VOCAB = len(SPECIALS) + len(string.printable)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every printable ASCII character is one token."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[3:],
    )


def _text(model_type: str = "llama", **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg.update(overrides)
    return cfg


def llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = _text(**overrides)
    cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(tf.LlamaConfig(**cfg)).eval()


def gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=4,
        n_head=2,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def llava(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        text_config=_text(),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_index=3,
        vision_feature_layer=-1,
    )
    return AutoModelForImageTextToText.from_config(cfg).eval()


def llava_processor() -> Any:
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    return tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=char_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def qwen2_vl(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.Qwen2VLConfig(
        text_config=dict(
            _text(model_type="qwen2_vl_text"),
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=16,
            num_heads=2,
            mlp_ratio=2,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            in_channels=3,
        ),
        image_token_id=5,
        video_token_id=6,
        vision_start_token_id=4,
    )
    return AutoModelForImageTextToText.from_config(cfg).eval()


def qwen2_5_vl(seed: int = 0, **text: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.Qwen2_5_VLConfig(
        text_config=dict(
            _text(model_type="qwen2_5_vl_text", intermediate_size=24, num_hidden_layers=2, **text),
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
        image_token_id=5,
        video_token_id=6,
        vision_start_token_id=4,
    )
    return AutoModelForImageTextToText.from_config(cfg).eval()


def mllama(seed: int = 0) -> torch.nn.Module:
    """Mllama: a language tower with one cross-attention layer, and a two-part vision tower."""
    torch.manual_seed(seed)
    cfg = tf.MllamaConfig(
        text_config=_text(
            model_type="mllama_text_model",
            num_hidden_layers=3,
            cross_attention_layers=[1],
            intermediate_size=24,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=16,
            patch_size=8,
            vision_output_dim=32,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        image_token_index=3,
    )
    return AutoModelForImageTextToText.from_config(cfg).eval()


def _causal(config_cls: Any, seed: int, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw.setdefault("bos_token_id", 1)
    kw.setdefault("eos_token_id", 2)
    kw.setdefault("pad_token_id", 0)
    return AutoModelForCausalLM.from_config(config_cls(**kw)).eval()


def _small(**overrides: Any) -> dict[str, Any]:
    """A 2-layer decoder config: hidden 16, FFN 24."""
    cfg = _text(num_hidden_layers=2, intermediate_size=24)
    cfg.pop("model_type")
    cfg.update(overrides)
    return cfg


def _moe(**overrides: Any) -> dict[str, Any]:
    return _small(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, **overrides)


# Every architecture the tests run end to end: name -> builder of a tiny random model.
# Text models take the character tokenizer; the vision-language ones have processors.
TEXT_ARCHITECTURES: dict[str, Any] = {
    "llama": lambda seed=0: _causal(tf.LlamaConfig, seed, **_small()),
    "mistral": lambda seed=0: _causal(tf.MistralConfig, seed, **_small()),
    "qwen2": lambda seed=0: _causal(tf.Qwen2Config, seed, **_small()),
    "qwen3": lambda seed=0: _causal(tf.Qwen3Config, seed, **_small(head_dim=8)),
    "gemma": lambda seed=0: _causal(tf.GemmaConfig, seed, **_small(head_dim=8)),
    "gemma2": lambda seed=0: _causal(tf.Gemma2Config, seed, **_small(head_dim=8)),
    "gemma3_text": lambda seed=0: _causal(tf.Gemma3TextConfig, seed, **_small(head_dim=8)),
    "gpt2": lambda seed=0: _causal(
        tf.GPT2Config, seed, vocab_size=VOCAB, n_embd=16, n_inner=24, n_layer=2, n_head=2,
        n_positions=256,
    ),
    "gpt_neox": lambda seed=0: _causal(tf.GPTNeoXConfig, seed, **_small()),
    "opt": lambda seed=0: _causal(
        tf.OPTConfig, seed, vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
        num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=256,
    ),
    "phi": lambda seed=0: _causal(tf.PhiConfig, seed, **_small()),
    "phi3": lambda seed=0: _causal(tf.Phi3Config, seed, **_small()),
    "olmo": lambda seed=0: _causal(tf.OlmoConfig, seed, **_small()),
    "olmo2": lambda seed=0: _causal(tf.Olmo2Config, seed, **_small()),
    "granite": lambda seed=0: _causal(tf.GraniteConfig, seed, **_small()),
    "stablelm": lambda seed=0: _causal(tf.StableLmConfig, seed, **_small()),
    "falcon": lambda seed=0: _causal(
        tf.FalconConfig, seed, vocab_size=VOCAB, hidden_size=16, ffn_hidden_size=24,
        num_hidden_layers=2, num_attention_heads=2,
    ),
    "mixtral": lambda seed=0: _causal(
        tf.MixtralConfig, seed, **_small(num_local_experts=4, num_experts_per_tok=2)
    ),
    "qwen2_moe": lambda seed=0: _causal(
        tf.Qwen2MoeConfig, seed, **_moe(shared_expert_intermediate_size=20)
    ),
    "qwen3_moe": lambda seed=0: _causal(tf.Qwen3MoeConfig, seed, **_moe(head_dim=8)),
}
VISION_ARCHITECTURES: dict[str, Any] = {
    "llava": llava,
    "qwen2_vl": lambda seed=0: qwen2_vl(seed),
    "qwen2_5_vl": qwen2_5_vl,
    "mllama": mllama,
}


# A short chat template in the shape of Qwen2-VL's: the image placeholder is the
# vision-start, image-pad and vision-end tokens, and the answer follows the prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'][0] }}:"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>a:{% endif %}"
)


def save_qwen_vl_processor(model_dir: Path, processor_class: str = "Qwen2VLProcessor") -> None:
    """Writes a Qwen2-VL / Qwen2.5-VL processor as their checkpoints ship one.

    ``preprocessor_config.json`` (the image processor, naming the processor class),
    the tokenizer files and ``chat_template.json``: the files of e.g.
    Qwen2-VL-2B-Instruct, at a size that fits the tiny models (16 x 16 images, 2 x 2
    patches, no merging: 64 image tokens).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    model_dir.mkdir(parents=True, exist_ok=True)
    image = Qwen2VLImageProcessorPil(
        min_pixels=64, max_pixels=256, patch_size=2, merge_size=1, temporal_patch_size=1
    )
    image.save_pretrained(model_dir)
    config_path = model_dir / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = processor_class
    config_path.write_text(json.dumps(config, indent=2))
    char_tokenizer().save_pretrained(model_dir)
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int, offset: int = 0, image: str | None = None) -> list[dict[str, Any]]:
    names = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
    out = []
    for i in range(offset, offset + n):
        rec: dict[str, Any] = {
            "question": f"Where does {names[i % 12]}{i} live?",
            "answer": f"City {i * 7 % 13}",
        }
        if image:
            rec["image"] = image
        out.append(rec)
    return out


def save_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file model directory, as saved."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-for-bit comparisons (bfloat16 and -0.0 too)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def verify_both_ways(ledger: Any, monkeypatch: Any) -> dict[str, Any]:
    """``verify --json``'s report, asserted the same with the array reads in forked
    worker processes and on threads (each path checked to be the one taken)."""
    from concurrent.futures import ProcessPoolExecutor

    from kvw_ledger import scrub, verify

    made: list[int] = []

    class Counted(ProcessPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    reports = []
    for processes in (True, False):
        before = len(made)
        with monkeypatch.context() as m:
            m.setattr(scrub, "ProcessPoolExecutor", Counted)
            m.setattr(scrub, "PROCESS_MIN_ARRAYS", 0 if processes else 10**9)
            m.setattr(verify, "hash_workers", lambda: 2)
            reports.append(ledger.verify(check_model=False).to_json())
        assert (len(made) > before) == processes
    assert reports[0] == reports[1]
    return reports[0]
