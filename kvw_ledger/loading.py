"""Loading a local model directory and its tokenizer or processor, offline.

Only safetensors weights are ever read (``use_safetensors=True``): a pickle in a
model directory is never executed. With a ``device_map`` (``"auto"``, or an explicit
map) a model larger than one device loads through accelerate's big-model loading:
its layers spread over the GPUs, the CPU and the disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvw_ledger.devices import Placement
from kvw_ledger.errors import BadInputError, ImageOnlyProcessorWarning


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


DeviceMap = str | dict[str, Any]  # accelerate's "auto"/"balanced"/"sequential", or module -> device


def load_model(
    model_dir: str | Path,
    progress: bool = False,
    placement: Placement | None = None,
    *,
    device_map: DeviceMap | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """Loads the model in eval mode, without touching the network.

    ``placement`` (default: the CPU, in the checkpoint's dtype) says where and in
    which dtype; see :class:`kvw_ledger.devices.Placement`. transformers'
    weight-loading bar shows only with ``progress``. With ``device_map`` the model is
    dispatched by accelerate (``from_pretrained(device_map=...)``) and the map, not
    ``placement.device``, says where each layer goes (the dtype still applies); layers
    placed on ``"disk"`` are offloaded to ``offload_folder`` (default: a temporary
    directory removed with the model).

    Raises:
        BadInputError: the directory holds no loadable model, or accelerate is missing.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_dir = Path(model_dir)
    auto = AutoModelForImageTextToText if is_vision_language(model_dir) else AutoModelForCausalLM
    dispatch: dict[str, Any] = {}
    scratch = None
    if device_map is not None:
        try:
            import accelerate  # noqa: F401  (transformers dispatches through it)
        except ImportError as e:
            raise BadInputError(
                "--device-map needs accelerate; install it with `pip install accelerate`"
            ) from e
        if offload_folder is None:
            offload_folder = scratch = tempfile.mkdtemp(prefix="kvw-offload-")
        dispatch = {"device_map": device_map, "offload_folder": str(offload_folder)}
    try:
        with warnings.catch_warnings(), _loading_bars(progress):
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(
                model_dir,
                dtype="auto" if placement is None or placement.dtype is None else placement.dtype,
                local_files_only=True,
                use_safetensors=True,
                **dispatch,
            )
    except (OSError, ValueError, KeyError) as e:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise BadInputError(f"cannot load the model in {model_dir}: {e}") from e
    if scratch is not None:  # offloaded weights live there as long as the model
        weakref.finalize(model, shutil.rmtree, scratch, True)
    module: nn.Module = model
    if device_map is None and placement is not None and placement.device.type != "cpu":
        # Loaded on the CPU (memory-mapped), then moved: one path for every architecture.
        module = module.to(placement.device)
    return module.eval()


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
    """The processor of a vision-language model, else the tokenizer.

    Qwen2-VL-style processors also build a video processor, which needs torchvision;
    without a working torchvision ``AutoProcessor`` refuses the whole processor. Then
    the same processor class is built without its video processor (tokenizer, the
    PIL image processor and the chat template, read from the same files), with an
    :class:`ImageOnlyProcessorWarning` saying so: image and text records work the
    same, video inputs are refused.
    """
    from transformers import AutoProcessor, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        if is_vision_language(model_dir):
            try:
                return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
            except (ImportError, RuntimeError, AttributeError) as e:
                # A missing or broken torchvision surfaces as any of these.
                processor = _image_only_processor(model_dir, e)
                if processor is None:
                    raise
                return processor
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, AttributeError) as e:
        raise BadInputError(
            f"cannot load a tokenizer/processor from {model_dir}: {e}; save it beside the model "
            "with processor.save_pretrained(dir) (tokenizer.save_pretrained(dir) for text models)"
        ) from e


def _processor_class(model_dir: Path) -> Any:
    """The processor class the directory names, as AutoProcessor looks it up."""
    from transformers.models.auto.processing_auto import (
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )

    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            name = json.loads((model_dir / file).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            break
    if not name:
        name = PROCESSOR_MAPPING_NAMES.get(str(_config(model_dir).get("model_type")))
    if not isinstance(name, str):
        return None
    found = processor_class_from_name(name)
    return found if isinstance(found, type) else None


def _image_only_processor(model_dir: Path, error: BaseException) -> Any | None:
    """The directory's processor without its video processor, or None if that is not the fault."""
    cls = _processor_class(model_dir)
    if cls is None or "video_processor" not in cls.get_attributes():
        return None
    image_only: Any = _image_only_class(cls)
    processor = image_only.from_pretrained(model_dir, local_files_only=True)
    warnings.warn(
        f"{model_dir}: built {cls.__name__} without its video processor, because the video "
        f"backend failed to load ({' '.join(str(error).split()).split('. ')[0]}). Image and text records "
        "work the same; video inputs do not. Install the torchvision release that matches your "
        "torch to get the full processor.",
        ImageOnlyProcessorWarning,
        stacklevel=3,
    )
    return processor


@functools.cache
def _image_only_class(cls: Any) -> type:
    """A subclass of ``cls`` whose sub-processors are all but ``video_processor``.

    transformers reads a processor's parts from its ``__init__`` signature, so this
    signature without ``video_processor`` makes ``from_pretrained`` load only the
    tokenizer, the image processor and the chat template.
    """

    def __init__(
        self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
    ) -> None:
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{cls.__name__}", (cls,), {"__init__": __init__, "__doc__": cls.__doc__})


def max_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes, when its config says."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None
