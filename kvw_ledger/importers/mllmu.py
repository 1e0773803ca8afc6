"""MLLMU-Bench (``MLLMMU/MLLMU-Bench``) -> our JSONL.

Each row is one person. Its records:

- ``qa``: the row's own ``question``/``answer``, about the image;
- ``classification``: ``Classification_Task.Image_Textual_Questions`` (with the image)
  and ``.Pure_Text_Questions`` (without), four options ``A``-``D`` kept as
  ``options`` in letter order with ``correct`` the index of ``Correct_Answer``;
- ``generation`` and ``mask`` (fill in the blank): ``Generation_Task`` and
  ``Mask_Task``, each a list of ``Question``, ``Ground_Truth`` and ``Type``
  (``Image_Textual`` items get the image, ``Pure_Text`` ones do not);
- ``ft_Data`` rows hold only ``image``, ``ID`` and ``metadata``, a JSON string
  listing ``Question``/``Answer`` pairs about the image (the fine-tuning set);
- ``Test_Set`` rows hold ``images``, a list of views of the person: every
  image-grounded item is written once per view.

The biography goes on the ``qa`` record as ``biography`` (for reference; data.py
ignores it), and every record carries ``person`` (the row's ``ID``), ``task`` and
``modality``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kvw_ledger.errors import DataError
from kvw_ledger.importers._common import Row, Schema, record, text

_LETTERS = "ABCDEFGH"
_PROFILE = ("image", "ID", "question", "answer", "Classification_Task", "Generation_Task", "Mask_Task")


def _items(value: Any, column: str, ctx: Row) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{ctx.where}, column {column!r}: expected a list, found {type(value).__name__}")
    return value


def _options(item: Mapping[str, Any], column: str, ctx: Row) -> tuple[list[str], int]:
    raw = ctx.field(item, "Options", column)
    correct = text(ctx.field(item, "Correct_Answer", column)).upper()
    if isinstance(raw, Mapping):
        letters = sorted(k for k, v in raw.items() if v is not None)  # a struct: A, B, C, D
        options = [text(raw[k]) for k in letters]
    elif isinstance(raw, list):
        letters = list(_LETTERS[: len(raw)])
        options = [text(o) for o in raw]
    else:
        raise DataError(f"{ctx.where}, column {column!r}: Options must be a struct or a list")
    if correct not in letters:
        raise DataError(
            f"{ctx.where}, column {column!r}: Correct_Answer {correct!r} is none of the "
            f"options {', '.join(letters)}"
        )
    return options, letters.index(correct)


def _profile(row: Mapping[str, Any], ctx: Row, views: list[Any], column: str) -> list[dict[str, Any] | None]:
    person = text(row["ID"])
    paths = [ctx.image(v, column) for v in views]
    out: list[dict[str, Any] | None] = []

    def add(task: str, question: Any, answer: Any, with_image: bool, n: int, **extra: Any) -> None:
        modality = "image" if with_image else "text"
        base = {"person": person, "task": task, "modality": modality}
        stem = f"{ctx.id}/{task}-{modality}{n}"
        if not with_image:
            out.append(record(question, answer, stem, **base, **extra))
            return
        for v, path in enumerate(paths):
            suffix = f"/view{v}" if len(paths) > 1 else ""
            out.append(record(question, answer, stem + suffix, path, **base, **extra))

    if "question" in row:
        add("qa", row["question"], row.get("answer"), True, 0, biography=text(row.get("biography")) or None)
    tasks = row["Classification_Task"] or {}
    for key, with_image in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False)):
        column = f"Classification_Task.{key}"
        for n, item in enumerate(_items(ctx.field(tasks, key, "Classification_Task"), column, ctx)):
            options, correct = _options(item, column, ctx)
            question = ctx.field(item, "Question", column)
            add("classification", question, options[correct], with_image, n,
                options=options, correct=correct)  # fmt: skip
    for column, task in (("Generation_Task", "generation"), ("Mask_Task", "mask")):
        for n, item in enumerate(_items(row[column], column, ctx)):
            kind = text(ctx.field(item, "Type", column))
            add(task, ctx.field(item, "Question", column), ctx.field(item, "Ground_Truth", column),
                kind != "Pure_Text", n, type=kind)  # fmt: skip
    return out


def _profile_row(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    return _profile(row, ctx, [row["image"]], "image")


def _test_row(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    return _profile(row, ctx, _items(row["images"], "images", ctx), "images")


def _ft_row(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    try:
        pairs = json.loads(row["metadata"]) if row["metadata"] else []
    except (TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{ctx.where}, column 'metadata': not a JSON string ({e})") from e
    if not isinstance(pairs, list):
        raise DataError(f"{ctx.where}, column 'metadata': expected a JSON list of Question/Answer pairs")
    image = ctx.image(row["image"], "image")
    base = {"person": text(row["ID"]), "task": "qa", "modality": "image"}
    return [
        record(ctx.field(p, "Question", "metadata"), ctx.field(p, "Answer", "metadata"),
               f"{ctx.id}/qa{n}", image, **base)
        for n, p in enumerate(pairs)
    ]


_FORGET_RETAIN = Schema(_PROFILE, _profile_row, optional=("biography",))
# Test_Set has several views per person instead of one image, and no QA of its own.
_TEST = Schema(
    ("images", "ID", "Classification_Task", "Generation_Task", "Mask_Task"),
    _test_row,
    optional=("question", "answer", "biography"),
)

CONFIGS: dict[str, Schema] = {
    **{name: _FORGET_RETAIN for name in (
        "forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85",
        "Full_Set", "Retain_Set",
    )},
    "Test_Set": _TEST,
    "ft_Data": Schema(("image", "ID", "metadata"), _ft_row),
}
