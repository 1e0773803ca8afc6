"""Loading processors: Qwen2-VL and Qwen2.5-VL with their own processors, torchvision or not."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import tiny
import torch
import transformers as tf
from click.testing import CliRunner
from PIL import Image
from transformers.utils import is_torchvision_available

from kvw_ledger.cli import main
from kvw_ledger.data import Encoder, read_records
from kvw_ledger.errors import BadInputError, ImageOnlyProcessorWarning
from kvw_ledger.loading import load_processor

QWEN = {
    "qwen2_vl": (tiny.qwen2_vl, "Qwen2VLProcessor"),
    "qwen2_5_vl": (tiny.qwen2_5_vl, "Qwen2_5_VLProcessor"),
}
NO_TORCHVISION = not is_torchvision_available()


@pytest.fixture(params=sorted(QWEN))
def qwen_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    build, processor_class = QWEN[request.param]
    model_dir = tmp_path / request.param
    build().save_pretrained(model_dir)
    tiny.save_qwen_vl_processor(model_dir, processor_class)
    return model_dir


def _processor_class(model_dir: Path) -> type:
    name = json.loads((model_dir / "preprocessor_config.json").read_text())["processor_class"]
    return getattr(tf, name)


@pytest.mark.skipif(not NO_TORCHVISION, reason="with torchvision AutoProcessor builds it itself")
def test_auto_processor_refuses_qwen_vl_without_torchvision(qwen_dir: Path) -> None:
    # What users hit, and why the fallback exists: the video processor needs torchvision.
    with pytest.raises(ImportError, match="requires the Torchvision library"):
        tf.AutoProcessor.from_pretrained(qwen_dir, local_files_only=True)


@pytest.mark.skipif(not NO_TORCHVISION, reason="the fallback only runs without torchvision")
def test_the_image_only_processor_is_the_models_own_class_from_its_own_files(qwen_dir: Path) -> None:
    with pytest.warns(ImageOnlyProcessorWarning) as caught:
        processor = load_processor(qwen_dir)
    message = str(caught[0].message)
    assert message.startswith(f"{qwen_dir}: built {_processor_class(qwen_dir).__name__} without its video processor")
    assert "requires the Torchvision library" in message and "Install the torchvision release" in message

    assert isinstance(processor, _processor_class(qwen_dir))
    assert not hasattr(processor, "video_processor")
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.chat_template == tiny.QWEN_CHAT_TEMPLATE
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 5

    # It expands an image into as many pads as the image processor makes patches.
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[image], return_tensors="pt")
    alone = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(out["pixel_values"], alone["pixel_values"])
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((out["input_ids"] == 5).sum()) == 64
    assert out["mm_token_type_ids"].sum() == 64


@pytest.mark.skipif(not NO_TORCHVISION, reason="the fallback only runs without torchvision")
def test_image_records_encode_through_the_chat_template(qwen_dir: Path, tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "face.png")
    path = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.qa_records(1, image="face.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageOnlyProcessorWarning)
        encoder = Encoder(load_processor(qwen_dir))
    example = encoder.encode(read_records(path)[0])
    answer = example.input_ids[example.labels != -100]
    assert encoder.tokenizer.decode(answer) == "City 0"  # the answer's own tokens, as the authors
    with_eos = Encoder(encoder.processor, label_eos=True).encode(read_records(path)[0])
    assert encoder.tokenizer.decode(with_eos.input_ids[with_eos.labels != -100]) == "City 0</s>"
    assert with_eos.input_ids.tolist() == example.input_ids.tolist()
    assert int((example.input_ids == 5).sum()) == 64 == int(example.per_token["mm_token_type_ids"].sum())
    assert example.vision["image_grid_thw"].tolist() == [[1, 8, 8]]


@pytest.mark.skipif(not NO_TORCHVISION, reason="the fallback only runs without torchvision")
def test_cli_says_once_that_the_processor_is_image_only(qwen_dir: Path, tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "face.png")
    retain = tiny.write_jsonl(tmp_path / "r.jsonl", tiny.qa_records(2, 20, image="face.png"))
    runner = CliRunner()
    assert runner.invoke(main, ["init", str(tmp_path / "led"), "--model", str(qwen_dir), "-q"]).exit_code == 0
    result = runner.invoke(main, ["retain", str(tmp_path / "led"), str(retain), "-q"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(notes) == 1 and "without its video processor" in notes[0]


def test_processors_without_a_video_part_load_as_before(tmp_path: Path) -> None:
    tiny.llava().save_pretrained(tmp_path)
    tiny.llava_processor().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageOnlyProcessorWarning)
        assert type(load_processor(tmp_path)).__name__ == "LlavaProcessor"


def test_a_vision_language_model_without_processor_files_is_bad_input(tmp_path: Path) -> None:
    tiny.qwen2_vl().save_pretrained(tmp_path)
    with pytest.raises(BadInputError, match=f"cannot load a tokenizer/processor from {tmp_path}"):
        load_processor(tmp_path)


def test_a_broken_image_processor_is_not_hidden_by_the_fallback(tmp_path: Path) -> None:
    tiny.qwen2_vl().save_pretrained(tmp_path)
    tiny.save_qwen_vl_processor(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "image_processor_type": "NoSuchImageProcessor"}))
    with pytest.raises(BadInputError, match="cannot load a tokenizer/processor"):
        load_processor(tmp_path)
