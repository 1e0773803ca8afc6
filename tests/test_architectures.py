"""Every supported architecture end to end through the CLI: init, retain, forget, export.

Each tiny model is saved with its tokenizer or processor; the export must load
with ``from_pretrained``, and against the original only the FFN value weights may
change, each to exactly ``base * exp(-w)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from kvw_ledger.cli import main
from kvw_ledger.data import Encoder, collate, read_records
from kvw_ledger.export import PROVENANCE_FILE
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_processor
from kvw_ledger.sites import Site

IMAGE_MODELS = {"llava", "qwen2_vl", "qwen2_5_vl"}  # run with image records and both towers
ALL = {**tiny.TEXT_ARCHITECTURES, **tiny.VISION_ARCHITECTURES}


def run(*args: str | Path) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def save_processor(name: str, model_dir: Path) -> None:
    if name == "llava":
        tiny.llava_processor().save_pretrained(model_dir)
    elif name == "qwen2_vl":
        tiny.save_qwen_vl_processor(model_dir, "Qwen2VLProcessor")
    elif name == "qwen2_5_vl":
        tiny.save_qwen_vl_processor(model_dir, "Qwen2_5_VLProcessor")
    elif name == "mllama":
        from transformers import MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        image = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=1)
        MllamaProcessor(image_processor=image, tokenizer=tiny.char_tokenizer()).save_pretrained(model_dir)
    else:
        tiny.char_tokenizer().save_pretrained(model_dir)


def exponent(ledger: Ledger, request: str, site: Site) -> torch.Tensor:
    name = f"requests/{request}/exponent/{site.name}"
    return ledger.store.read_array(name) if ledger.store.has_array(name) else torch.zeros(site.n_vectors)


def expected_tensor(original: torch.Tensor, sites: list[tuple[Site, torch.Tensor]]) -> torch.Tensor:
    """The file tensor after weakening every site stored in it (a fused tensor holds several)."""
    out = original.clone()
    for site, w in sites:
        gate = torch.exp(-w)
        if original.dim() == 3:  # a fused experts tensor on disk: [experts, ...]
            sl = original[site.expert].float()
            out[site.expert] = (sl * (gate.unsqueeze(0) if site.axis == 1 else gate.unsqueeze(1))).to(out.dtype)
        else:
            scale = gate.unsqueeze(0) if site.axis == 1 else gate.unsqueeze(1)
            out = (original.float() * scale).to(original.dtype)
    return out


def check_export(model_dir: Path, ledger_dir: Path, out: Path, request: str) -> int:
    """Only the sites' tensors changed, each exactly; returns how many tensors changed."""
    ledger = Ledger.open(ledger_dir)
    original, exported = tiny.file_tensors(model_dir), tiny.file_tensors(out)
    assert set(original) == set(exported)
    by_key: dict[str, list[tuple[Site, torch.Tensor]]] = {}
    for site in ledger.sites:
        by_key.setdefault(ledger.locations[site.name].key, []).append((site, exponent(ledger, request, site)))
    changed = 0
    for key, tensor in original.items():
        got = exported[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        if key in by_key:
            assert tiny.same_bits(got, expected_tensor(tensor, by_key[key])), key
        else:
            assert tiny.same_bits(got, tensor), f"{key} is no FFN value weight but changed"
        changed += int(not tiny.same_bits(got, tensor))
    assert (out / PROVENANCE_FILE).exists()
    return changed


def records(tmp: Path, name: str) -> tuple[Path, Path]:
    image: dict[str, Any] = {}
    if name in IMAGE_MODELS:
        tiny.save_image(tmp / "img" / "face.png")
        tiny.save_image(tmp / "img" / "other.png", (10, 200, 40))
        image = {"forget": "img/face.png", "retain": "img/other.png"}
    retain = tiny.write_jsonl(tmp / "retain.jsonl", tiny.qa_records(3, 20, image=image.get("retain")))
    forget = tiny.write_jsonl(tmp / "forget.jsonl", tiny.qa_records(2, 0, image=image.get("forget")))
    return retain, forget


def run_verbs(name: str, model_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """init, retain, forget and export through the CLI; returns (ledger, export)."""
    retain, forget = records(tmp, name)
    ledger, out = tmp / "led", tmp / "out"
    towers = "all" if name in IMAGE_MODELS else "language"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen2-VL's image-only note; tested in test_loading
        run("init", ledger, "--model", model_dir, "--sites", towers, "-q")
        run("retain", ledger, retain, "-q")
        run("forget", ledger, forget, "--id", "f", "--gamma", "0.5", "--layers", "0:3", "-q")
        run("export", ledger, out, "-q")
    assert run("verify", ledger).startswith("ok: 3 entries")
    return ledger, out


@pytest.mark.parametrize("name", sorted(ALL))
def test_architecture_end_to_end(name: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    ALL[name]().save_pretrained(model_dir)
    save_processor(name, model_dir)
    ledger, out = run_verbs(name, model_dir, tmp_path)

    assert check_export(model_dir, ledger, out, "f") > 0, "the forget weakened nothing"
    auto = AutoModelForImageTextToText if name in tiny.VISION_ARCHITECTURES else AutoModelForCausalLM
    loaded = auto.from_pretrained(out, local_files_only=True)
    assert loaded.config.model_type == ALL[name]().config.model_type
    if name in tiny.VISION_ARCHITECTURES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert hasattr(load_processor(out), "image_processor")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_export_carries_its_own_processor(name: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    ALL[name]().save_pretrained(model_dir)
    save_processor(name, model_dir)
    _, out = run_verbs(name, model_dir, tmp_path)

    files = ["preprocessor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json"]
    for file in files:  # what AutoProcessor reads, byte for byte
        assert (out / file).read_bytes() == (model_dir / file).read_bytes(), file
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    else:
        # AutoProcessor refuses the export exactly as it refuses the original here
        # (its video processor needs torchvision); the loader's image-only build of
        # the same class from the same files stands in for it.
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(out, local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    record = read_records(tmp_path / "forget.jsonl")[0]
    batch = collate([Encoder(processor).encode(record)], 0)
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_bfloat16_vision_language_model_end_to_end(name: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    ALL[name]().to(torch.bfloat16).save_pretrained(model_dir)
    save_processor(name, model_dir)
    assert {t.dtype for t in tiny.file_tensors(model_dir).values()} == {torch.bfloat16}
    ledger, out = run_verbs(name, model_dir, tmp_path)

    # Every site is base * exp(-w) computed in float32 and cast to bfloat16 once.
    assert check_export(model_dir, ledger, out, "f") > 0
    assert {t.dtype for t in tiny.file_tensors(out).values()} == {torch.bfloat16}
    assert Ledger.open(ledger).base(Ledger.open(ledger).sites[0].name).dtype == torch.bfloat16
    loaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
