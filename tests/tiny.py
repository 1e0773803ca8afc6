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
