"""TOFU (``locuslab/TOFU``) -> our JSONL (text only).

- ``forget01/05/10``, ``retain90/95/99``, ``holdout01/05/10`` and ``full``:
  ``question`` and ``answer``.
- their ``_perturbed`` variants (``forget01_perturbed``..., ``retain_perturbed``,
  ``holdout01_perturbed``...): add ``paraphrased_question``,
  ``paraphrased_answer`` and ``perturbed_answer`` (a list), kept on the record
  for TOFU's truth ratio.
- ``real_authors`` and ``world_facts``: ``question``, ``option1``-``option4`` and
  ``answer`` (the right option's text): multiple choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvw_ledger.errors import DataError
from kvw_ledger.importers._common import Row, Schema, record, text

_SPLITS = (
    "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "holdout01", "holdout05", "holdout10", "full",
)  # fmt: skip
_OPTIONS = ("option1", "option2", "option3", "option4")


def _qa(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    extra: dict[str, Any] = {}
    if "perturbed_answer" in row:
        perturbed = row["perturbed_answer"]
        if perturbed is not None and not isinstance(perturbed, list):
            raise DataError(f"{ctx.where}, column 'perturbed_answer': expected a list of answers")
        extra = {
            "paraphrased_question": text(row["paraphrased_question"]) or None,
            "paraphrased_answer": text(row["paraphrased_answer"]) or None,
            "perturbed_answers": [text(a) for a in perturbed or []],
        }
    return [record(row["question"], row["answer"], f"{ctx.id}/qa", task="qa", modality="text", **extra)]


def _choice(row: Mapping[str, Any], ctx: Row) -> list[dict[str, Any] | None]:
    options = [text(row[k]) for k in _OPTIONS]
    answer = text(row["answer"])
    if answer not in options:
        raise DataError(f"{ctx.where}: the answer {answer!r} is none of {', '.join(_OPTIONS)}")
    return [record(row["question"], answer, f"{ctx.id}/choice", task="multiple_choice",
                   modality="text", options=options, correct=options.index(answer))]  # fmt: skip


_QA = Schema(("question", "answer"), _qa)
_PERTURBED = Schema(
    ("question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"), _qa
)
_CHOICE = Schema(("question", *_OPTIONS, "answer"), _choice)

CONFIGS: dict[str, Schema] = {
    **{s: _QA for s in _SPLITS},
    **{f"{s}_perturbed": _PERTURBED for s in (*_SPLITS, "retain")},
    "real_authors": _CHOICE,
    "world_facts": _CHOICE,
}
