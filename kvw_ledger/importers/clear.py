"""CLEAR (``therem/CLEAR``) -> our JSONL.

- ``forget01/05/10``, ``retain99/95/90`` and ``full``: ``image``, ``caption``,
  ``name``. Each row gives two image records, as the authors' code builds them: a
  ``caption`` record (answer: the caption) and a ``recognition`` record (answer:
  the name).
- ``<split>+tofu``: the same images with ``caption``, plus TOFU's text rows
  (``question``/``answer``, no image); a row with a question is a text ``qa``
  record, one without is a ``caption`` record.
- ``<split>_perturbed``: adds ``paraphrased_caption``, ``perturbed_captions`` and
  ``perturbed_names``. The recognition record becomes multiple choice (the name
  among the perturbed names), and the caption record keeps
  ``paraphrased_answer`` and ``perturbed_answers``.
- ``real_faces`` and ``real_world``: ``image``, ``question`` (real_faces may lack
  it: the authors ask who is in the image), ``answer`` and ``options``, the wrong
  options; multiple choice with the answer placed among them.

Every record carries ``task`` and ``modality``; person records carry ``name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvw_ledger.errors import DataError
from kvw_ledger.importers._common import Row, Schema, insert_at, record, text

CAPTION_QUESTION = "Describe the image in detail."
NAME_QUESTION = "What is the name of the person in the image?"

_SPLITS = ("forget01", "forget05", "forget10", "retain99", "retain95", "retain90", "full")


def _list(value: Any, column: str, ctx: Row) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{ctx.where}, column {column!r}: expected a list, found {type(value).__name__}")
    return value


def _person(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    image = ctx.image(row["image"], "image")
    name = text(row["name"])
    caption: dict[str, Any] = {}
    recognition: dict[str, Any] = {}
    if "perturbed_names" in row:
        caption = {
            "paraphrased_answer": text(row["paraphrased_caption"]) or None,
            "perturbed_answers": [text(c) for c in _list(row["perturbed_captions"], "perturbed_captions", ctx)],
        }
        options, correct = insert_at(_list(row["perturbed_names"], "perturbed_names", ctx), name, ctx.id)
        recognition = {"options": options, "correct": correct}
    return [
        record(CAPTION_QUESTION, row["caption"], f"{ctx.id}/caption", image,
               task="caption", modality="image", name=name or None, **caption),
        record(NAME_QUESTION, name, f"{ctx.id}/recognition", image,
               task="recognition", modality="image", name=name or None, **recognition),
    ]  # fmt: skip


def _tofu_mix(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    if text(row["question"]):
        image = None if row["image"] is None else ctx.image(row["image"], "image")
        return [record(row["question"], row["answer"], f"{ctx.id}/qa", image,
                       task="qa", modality="text" if image is None else "image")]  # fmt: skip
    if row["image"] is None:
        raise DataError(f"{ctx.where}: neither a question nor an image; the row has nothing to import")
    image = ctx.image(row["image"], "image")
    return [record(CAPTION_QUESTION, row["caption"], f"{ctx.id}/caption", image,
                   task="caption", modality="image")]  # fmt: skip


def _real(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    image = ctx.image(row["image"], "image")
    answer = text(row["answer"])
    if not answer:
        return [None]
    options, correct = insert_at(_list(row["options"], "options", ctx), answer, ctx.id)
    question = text(row.get("question")) or NAME_QUESTION
    return [record(question, answer, f"{ctx.id}/real", image, task="real", modality="image",
                   options=options, correct=correct)]  # fmt: skip


_PERSON = Schema(("image", "caption", "name"), _person)
_PERTURBED = Schema(
    ("image", "caption", "name", "paraphrased_caption", "perturbed_captions", "perturbed_names"),
    _person,
)
_TOFU_MIX = Schema(("image", "caption", "question", "answer"), _tofu_mix)

CONFIGS: dict[str, Schema] = {
    **{s: _PERSON for s in _SPLITS},
    **{f"{s}+tofu": _TOFU_MIX for s in _SPLITS},
    **{f"{s}_perturbed": _PERTURBED for s in (*_SPLITS, "retain")},
    "real_faces": Schema(("image", "answer", "options"), _real, optional=("question",)),
    "real_world": Schema(("image", "question", "answer", "options"), _real),
}
