"""Forget and retain data: JSONL records to model inputs with answer-only labels.

A record is ``{"question": str, "answer": str, "image"?: path, "id"?: str}``, image
paths relative to the JSONL file; other fields (a benchmark's multiple-choice
``options`` and ``correct``...) are kept aside in ``Record.extra``. Each record becomes
the prompt's ids followed by the answer's ids (never tokenized together, so the
answer's tokens are the same whatever precedes them), with labels -100 everywhere
but the answer's own tokens: as the authors' CLEAR collate labels them, the eos or
end-of-turn token after the answer stays in the input unlabelled, unless
``label_eos`` (the behaviour before that option existed) labels it too. A data set's fingerprint is a sha256 over its canonical records
and image bytes: the ledger keeps it instead of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvw_ledger._fs import sha256_file
from kvw_ledger.errors import BadInputError, DataError

IGNORE_INDEX = -100

# Processors whose image placeholder is more than their `image_token`: Qwen2-VL's
# rope index looks for the vision-start token in front of the image pads.
_IMAGE_PLACEHOLDERS = {
    "Qwen2VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Qwen2_5_VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
}

# The JSON fields a Record holds as attributes; the others go to Record.extra.
_RECORD_KEYS = frozenset({"question", "answer", "image", "id"})

# Processor outputs that hold one value per token and are padded like input_ids.
_PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


@dataclass(frozen=True)
class Record:
    """One question/answer pair as read from a JSONL file."""

    question: str
    answer: str
    image: Path | None  # absolute path, resolved against the JSONL file's folder
    id: str | None
    where: str  # "file:line", for error messages
    # The record's other JSON fields (e.g. multiple-choice "options", "correct"); not
    # part of its identity, nor of the data fingerprint.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Example:
    """One encoded record."""

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX outside the answer
    vision: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # e.g. pixel_values, image_grid_thw
    per_token: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # (T,) extras, e.g. mm_token_type_ids
    where: str = ""


@dataclass
class Batch:
    """Right-padded model inputs plus the positions whose coefficients count."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, and vision tensors
    positions: torch.Tensor  # (N,) int64 flat indices into (B*T) of the selected positions
    n_tokens: int  # N, known on the host so no device sync is needed to count
    has_images: bool
    # (B, T) int64, IGNORE_INDEX outside the labelled tokens: a training loss's targets,
    # kept out of ``inputs`` because KVW's forwards pass no labels.
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (non-blocking copies)."""
        moved = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        return Batch(
            moved,
            self.positions.to(device, non_blocking=True),
            self.n_tokens,
            self.has_images,
            labels,
        )


def read_records(path: str | Path) -> list[Record]:
    """Reads and validates a JSONL data file.

    Raises:
        DataError: a line is not a JSON object, lacks a non-empty string question or
            answer, names a missing image, or the file has no records; the message
            names the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such data file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from e
    records = [
        _parse_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()
    ]
    if not records:
        raise DataError(f"{path}: no records; a data file needs at least one JSON line")
    return records


def _parse_line(path: Path, number: int, line: str) -> Record:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    return parse_record(obj, path.parent, where)


def parse_record(obj: Any, base_dir: Path, where: str) -> Record:
    """Validates one record given as a JSON object, its image path relative to ``base_dir``.

    Raises:
        DataError: as :func:`read_records`, naming ``where``.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with question and answer")
    for key in ("question", "answer"):
        value = obj.get(key)
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if not obj["answer"].strip():
        raise DataError(f"{where}: the answer is empty; every record needs an answer to forget")
    image = obj.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: field 'image' must be a path string")
        image_path = (Path(base_dir) / image).resolve()
        if not image_path.is_file():
            raise DataError(f"{where}: image {image} not found (looked for {image_path})")
    record_id = obj.get("id")
    return Record(
        obj["question"],
        obj["answer"],
        image_path,
        None if record_id is None else str(record_id),
        where,
        {k: v for k, v in obj.items() if k not in _RECORD_KEYS},
    )


def combine_jsonl(sources: Sequence[str | Path], dest: str | Path) -> Path:
    """Writes every record of ``sources``, in order, into one JSONL file at ``dest``,
    with image paths made relative to ``dest``'s folder (e.g. a retain set plus a
    withdrawn request's data, for ``revert --retain-with``).

    Raises:
        DataError: a source is unreadable or a record invalid (named by file and line).
    """
    dest = Path(dest)
    lines = []
    for source in sources:
        read_records(source)  # validates every line, naming the first bad one
        for line in Path(source).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("image") is not None:
                image = (Path(source).parent / obj["image"]).resolve()
                obj["image"] = os.path.relpath(image, dest.parent.resolve())
            lines.append(json.dumps(obj, ensure_ascii=False))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def fingerprint(records: Sequence[Record]) -> str:
    """sha256 over canonical records and image bytes (paths do not count, contents do)."""
    digest = hashlib.sha256(b"kvw-ledger-data-v1\n")
    for record in records:
        image_hash = None
        if record.image is not None:
            image_hash = sha256_file(record.image)
        canonical = {
            "question": record.question,
            "answer": record.answer,
            "id": record.id,
            "image": image_hash,
        }
        digest.update(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


class Encoder:
    """Turns records into :class:`Example` with a tokenizer or a processor.

    Args:
        processor: a tokenizer, or a multimodal processor with a ``tokenizer``.
        max_length: longest sequence kept (tokens); longer ones are cut at the end.
        label_eos: also label the eos or end-of-turn tokens after the answer (one more
            selected position per record); off by default, as in the authors' collate.
    """

    def __init__(
        self, processor: Any, max_length: int | None = None, *, label_eos: bool = False
    ) -> None:
        self.processor = processor
        self.label_eos = label_eos
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.chat_template = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        eos = self.tokenizer.eos_token_id
        if eos is None and not self.chat_template:
            raise BadInputError(
                "the tokenizer has no eos_token_id; set one in its tokenizer_config.json"
            )
        self.eos_token_id = eos

    @property
    def pad_token_id(self) -> int:
        """Id used for right padding (pad, else eos, else 0)."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def encode(self, record: Record) -> Example:
        """Encodes one record; raises DataError naming it when no answer token survives."""
        self._check_image(record)
        prompt_text, answer_text = self._texts(record)
        prompt_ids, vision, per_token = self._encode_prompt(record, prompt_text)
        answer_ids, answer_labels = self._encode_answer(record, answer_text)
        ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_labels
        # Per-token extras (e.g. which tokens are image tokens) are 0 over the answer.
        extras = {k: torch.cat([v, v.new_zeros(len(answer_ids))]) for k, v in per_token.items()}
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            extras = {k: v[: self.max_length] for k, v in extras.items()}
            if all(label == IGNORE_INDEX for label in labels):
                raise DataError(
                    f"{record.where}: the answer is truncated away (prompt is {len(prompt_ids)} tokens, "
                    f"max length {self.max_length}); shorten the question"
                )
        return Example(torch.tensor(ids), torch.tensor(labels), vision, extras, record.where)

    def encode_prompt(self, record: Record) -> Example:
        """The record's prompt alone, as :meth:`encode` begins it: what a model answers
        from (evaluation decodes after it). No label is set."""
        self._check_image(record)
        prompt_ids, vision, per_token = self._encode_prompt(record, self._texts(record)[0])
        ids = torch.tensor(prompt_ids)
        return Example(ids, torch.full_like(ids, IGNORE_INDEX), vision, per_token, record.where)

    def _check_image(self, record: Record) -> None:
        if record.image is not None and not hasattr(self.processor, "image_processor"):
            raise DataError(
                f"{record.where}: the record has an image but the model has no image processor; "
                "use a vision-language model or drop the image"
            )

    def _encode_answer(self, record: Record, text: str) -> tuple[list[int], list[int]]:
        """The ids after the prompt, and their labels (IGNORE_INDEX where not labelled).

        The ids are the same with and without ``label_eos``; only the labels differ.
        """
        no_answer = DataError(f"{record.where}: the answer {record.answer!r} tokenizes to nothing")
        if not self.chat_template:
            answer_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not answer_ids:
                raise no_answer
            eos = int(self.eos_token_id)
            return [*answer_ids, eos], [*answer_ids, eos if self.label_eos else IGNORE_INDEX]
        whole = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not whole:
            raise no_answer
        if self.label_eos:  # the whole assistant turn, as before the option existed
            return whole, whole
        start = text.find(record.answer)
        if start < 0:
            raise DataError(
                f"{record.where}: the chat template does not render the answer verbatim, so its "
                "tokens cannot be told from the end of the turn; pass --label-eos to label the "
                "whole assistant turn"
            )
        end = start + len(record.answer)
        if not getattr(self.tokenizer, "is_fast", False):
            # No offsets without a fast tokenizer: the answer and the turn's end apart.
            head = list(self.tokenizer(text[:end], add_special_tokens=False)["input_ids"])
            tail = list(self.tokenizer(text[end:], add_special_tokens=False)["input_ids"])
            if not head:
                raise no_answer
            return head + tail, head + [IGNORE_INDEX] * len(tail)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        # A token is the answer's when its characters overlap the answer's span.
        labels = [
            i if a < end and b > start and b > a else IGNORE_INDEX
            for i, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        if all(label == IGNORE_INDEX for label in labels):
            raise no_answer
        return ids, labels

    def _texts(self, record: Record) -> tuple[str, str]:
        if not self.chat_template:
            prompt = f"Question: {record.question}\nAnswer:"
            if record.image is not None:
                prompt = f"{self._image_placeholder()}\n{prompt}"
            return prompt, " " + record.answer
        if record.image is not None:
            user: dict[str, Any] = {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": record.question}],
            }
        else:
            user = {"role": "user", "content": record.question}
        assistant = {"role": "assistant", "content": record.answer}
        template_owner = self.processor if record.image is not None else self.tokenizer
        prompt = template_owner.apply_chat_template(
            [user], add_generation_prompt=True, tokenize=False
        )
        full = template_owner.apply_chat_template([user, assistant], tokenize=False)
        if not full.startswith(prompt):
            raise DataError(
                f"{record.where}: the chat template does not render the answer after the prompt, so "
                "the answer tokens cannot be located"
            )
        return prompt, full[len(prompt) :]

    def _image_placeholder(self) -> str:
        name = type(self.processor).__name__
        # By class or base class: loading may build a subclass (an image-only processor).
        placeholders = (_IMAGE_PLACEHOLDERS.get(k.__name__) for k in type(self.processor).__mro__)
        token = next((p for p in placeholders if p), None) or getattr(
            self.processor, "image_token", None
        )
        if not token:
            raise BadInputError(f"{name} has no image_token; give the model a chat template")
        return str(token)

    def _encode_prompt(
        self, record: Record, text: str
    ) -> tuple[list[int], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if record.image is None:
            add_special = not self.chat_template
            return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"]), {}, {}
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(record.image) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{record.where}: cannot read image {record.image} ({e})") from e
        out = self.processor(text=[text], images=[image], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        per_token = {k: v[0] for k, v in out.items() if k in _PER_TOKEN_KEYS}
        vision = {
            k: v
            for k, v in out.items()
            if k not in ("input_ids", "attention_mask", *_PER_TOKEN_KEYS)
        }
        return ids, vision, per_token


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pads examples into one batch and finds the positions that predict answer tokens.

    Position t is selected when ``attention_mask[t]`` and ``labels[t+1] != -100``
    (the reference's ``cause_mask``): the inputs that produce each answer token.
    """
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    per_token_keys = sorted({k for e in examples for k in e.per_token})
    per_token = {k: torch.zeros((len(examples), length), dtype=torch.long) for k in per_token_keys}
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = example.input_ids
        mask[row, :n] = 1
        labels[row, :n] = example.labels
        for key, values in example.per_token.items():
            per_token[key][row, :n] = values
    selected = cause_mask(labels, mask)
    positions = selected.flatten().nonzero().squeeze(1)  # (N,) on the host: no device sync later
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, **per_token}
    vision_keys = sorted({k for e in examples for k in e.vision})
    for key in vision_keys:
        inputs[key] = torch.cat([e.vision[key] for e in examples if key in e.vision])
    return Batch(inputs, positions, int(positions.numel()), bool(vision_keys), labels)


def cause_mask(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions that predict a labelled token, ``labels[t+1] != -100``,
    within the attention mask (what KVW measures, and where the benchmark's FFNs learn)."""
    cause = torch.zeros_like(attention_mask, dtype=torch.bool)
    cause[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return cause & attention_mask.bool()


def encode_all(encoder: Encoder, records: Sequence[Record]) -> list[Example]:
    """Encodes every record (errors name the first bad one)."""
    return [encoder.encode(r) for r in records]


def iter_batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
    order: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Batches ``examples`` in ``order`` (default: file order)."""
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, not {batch_size}")
    indices = list(range(len(examples))) if order is None else list(order)
    for start in range(0, len(indices), batch_size):
        yield collate([examples[i] for i in indices[start : start + batch_size]], pad_token_id)
