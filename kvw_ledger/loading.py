"""Loading a local model directory and its tokenizer or processor, offline.

Only safetensors weights are ever read (``use_safetensors=True``): a pickle in a
model directory is never executed.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvw_ledger.errors import BadInputError


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the body with ``n`` torch CPU threads, then restores the caller's count.

    Library code never changes the process-wide count for good: a caller that
    forks afterwards (a test harness, a job runner) would inherit an OpenMP pool
    whose threads do not exist in the child, and its first parallel matmul hangs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BadInputError(f"{model_dir} is not a model directory: it has no config.json") from e
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read the model config ({e})") from e
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: the model config is not a JSON object")
    return data


def is_vision_language(model_dir: str | Path) -> bool:
    """Whether the config describes a vision-language model (it has a vision tower)."""
    return "vision_config" in _config(Path(model_dir))


def load_model(model_dir: str | Path, progress: bool = False) -> nn.Module:
    """Loads the model in its checkpoint dtype, in eval mode, without touching the network.

    transformers' weight-loading bar shows only with ``progress``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_dir = Path(model_dir)
    auto = AutoModelForImageTextToText if is_vision_language(model_dir) else AutoModelForCausalLM
    try:
        with warnings.catch_warnings(), _loading_bars(progress):
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(
                model_dir, dtype="auto", local_files_only=True, use_safetensors=True
            )
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"cannot load the model in {model_dir}: {e}") from e
    return model.eval()


@contextlib.contextmanager
def _loading_bars(progress: bool) -> Iterator[None]:
    """Hides transformers' weight-loading progress bars unless ``progress``."""
    from transformers.utils import logging as hf_logging

    hide = not progress and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def load_processor(model_dir: str | Path) -> Any:
    """The processor of a vision-language model, else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        if is_vision_language(model_dir):
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(
            f"cannot load a tokenizer/processor from {model_dir}: {e}; save it beside the model "
            "with tokenizer.save_pretrained(dir)"
        ) from e


def max_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes, when its config says."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None
