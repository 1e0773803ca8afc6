"""How much a model still knows: generation accuracy, multiple choice, ROUGE-L.

- Generation accuracy (as CLEAR counts it): greedy decoding from the prompt;
  a hit when the normalised answer is contained in the normalised output.
- Multiple-choice accuracy (as MLLMU-Bench): of four options, the one whose
  tokens (``" " + option``) have the highest summed log-likelihood after the
  prompt; a hit when it is the correct one.
- ROUGE-L: F1 of the longest common subsequence of normalised word tokens,
  between the generated output and the answer.

Records are read and prompts encoded by ``kvw_ledger.data`` (``read_records``,
``Encoder``), so the numbers measure what KVW weakened. Records may be given as
:class:`~kvw_ledger.data.Record` or as the JSON objects of a JSONL file (image
paths relative to ``base_dir``); multiple choice reads ``options`` and
``correct`` from the record's other fields. Decoding is batched with left padding
and a KV cache: a few hundred questions take seconds on a CPU.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from kvw_ledger.data import (
    IGNORE_INDEX,
    Encoder,
    Example,
    Record,
    collate,
    parse_record,
    read_records,
)
from kvw_ledger.errors import BadInputError

__all__ = [
    "evaluate_records",
    "evaluate_split",
    "generate_answers",
    "generation_accuracy",
    "mc_accuracy",
    "normalize",
    "rouge_l",
]

Processor = ProcessorMixin | PreTrainedTokenizerBase
Records = Sequence[Record | Mapping[str, Any]]
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings, over normalised whitespace tokens.

    Returns 0.0 when either side is empty.
    """
    a, b = normalize(prediction).split(), normalize(reference).split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)  # LCS lengths of a[:i] against every prefix of b
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _tokenizer(processor: Processor) -> PreTrainedTokenizerBase:
    return getattr(processor, "tokenizer", processor)


def _records(records: Records, base_dir: str | Path | None) -> list[Record]:
    """Records as :class:`Record`; JSON objects are validated as ``read_records`` does."""
    out = []
    for i, r in enumerate(records):
        if isinstance(r, Record):
            out.append(r)
            continue
        if r.get("image") is not None and base_dir is None:
            raise BadInputError("records name images: pass base_dir (the JSONL file's directory)")
        out.append(parse_record(r, Path(base_dir or "."), f"record {r.get('id', i + 1)!r}"))
    return out


def _usable(records: Sequence[Record], processor: Processor) -> list[Record]:
    # A text-only model (a tokenizer, no image processor) cannot see portraits.
    if getattr(processor, "image_processor", None) is not None:
        return list(records)
    return [r for r in records if r.image is None]


def _prompts(records: Sequence[Record], processor: Processor) -> list[Example]:
    encoder = Encoder(processor)
    return [encoder.encode_prompt(r) for r in records]


def _pixels(examples: Sequence[Example]) -> list[torch.Tensor]:
    return [e.vision["pixel_values"] for e in examples if "pixel_values" in e.vision]


def generate_answers(
    model: PreTrainedModel,
    processor: Processor,
    records: Records,
    base_dir: str | Path | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to the records' questions.

    Args:
        model: a causal LM or LLaVA model.
        processor: its processor (LLaVA) or tokenizer (text-only).
        records: benchmark records; image records need a LLaVA processor.
        base_dir: directory image paths are relative to.
        batch_size: prompts decoded together.
        max_new_tokens: decoding stops here or at EOS.

    Returns:
        The decoded output of each record, special tokens removed.
    """
    prompts = _prompts(_records(records, base_dir), processor)
    return _decode(model, processor, prompts, batch_size, max_new_tokens)[0]


@torch.no_grad()
def _decode(
    model: PreTrainedModel,
    processor: Processor,
    prompts: list[Example],
    batch_size: int,
    max_new_tokens: int,
) -> tuple[list[str], list[torch.Tensor]]:
    # Greedy decoding; also returns each prompt's next-token log-probabilities
    # (V,), which score single-token options without another forward pass.
    tok = _tokenizer(processor)
    first_logp: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    pad, eos = tok.pad_token_id or 0, tok.eos_token_id
    device = model.device
    model.eval()
    answers: list[str] = [""] * len(prompts)
    # Batches of one modality and similar length waste the least padding.
    order = sorted(
        range(len(prompts)),
        key=lambda i: ("pixel_values" not in prompts[i].vision, len(prompts[i].input_ids)),
    )
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [prompts[i] for i in idx]
        width = max(len(p.input_ids) for p in chunk)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, p in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(p.input_ids) :] = p.input_ids
            mask[row, width - len(p.input_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        pix = _pixels(chunk)
        if pix:
            kwargs["pixel_values"] = torch.cat(pix).to(device, model.dtype)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # (B, V)
        for row, i in enumerate(idx):
            first_logp[i] = logp[row]
        generated = torch.empty((len(idx), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        last_pos = pos[:, -1:]
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # (B, V) -> (B,)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos,
                use_cache=True,
                **_cache_of(out),
            )
        for row, i in enumerate(idx):
            toks = generated[row].tolist()
            if eos in toks:
                toks = toks[: toks.index(eos)]
            answers[i] = tok.decode(toks, skip_special_tokens=True).strip()
    return answers, first_logp


def _cache_of(out: Any) -> dict[str, Any]:
    """The key-value cache of a forward's output, as the keyword the next step takes.

    transformers 5.x names it ``cache`` and deprecates ``past_key_values``, which
    4.x uses; the output's own key says which one this version speaks.
    """
    cache = getattr(out, "cache", None)
    if cache is not None:
        return {"cache": cache}
    return {"past_key_values": out.past_key_values}


def generation_accuracy(
    model: PreTrainedModel,
    processor: Processor,
    records: Records,
    base_dir: str | Path | None = None,
    batch_size: int = 64,
) -> float:
    """Fraction of records whose greedy output contains the normalised answer."""
    usable = _usable(_records(records, base_dir), processor)
    if not usable:
        return float("nan")
    outputs = generate_answers(model, processor, usable, base_dir, batch_size)
    hits = [normalize(r.answer) in normalize(o) for r, o in zip(usable, outputs, strict=True)]
    return sum(hits) / len(hits)


def option_loglik(
    model: PreTrainedModel,
    processor: Processor,
    records: Records,
    base_dir: str | Path | None = None,
    batch_size: int = 64,
) -> list[list[float]]:
    """Summed log-likelihood of each option's tokens (``" " + option``) after each prompt."""
    recs = _records(records, base_dir)
    prompts = _prompts(recs, processor)
    first_logp = _decode(model, processor, prompts, batch_size, 0)[1]
    return _option_scores(model, processor, recs, prompts, first_logp, batch_size)


@torch.no_grad()
def _option_scores(
    model: PreTrainedModel,
    processor: Processor,
    records: Sequence[Record],
    prompts: list[Example],
    first_logp: list[torch.Tensor],
    batch_size: int,
) -> list[list[float]]:
    tok = _tokenizer(processor)
    scores: list[list[float]] = []
    longer: list[tuple[int, int, Example]] = []  # multi-token options: prompt + option
    for k, (r, prompt) in enumerate(zip(records, prompts, strict=True)):
        if "options" not in r.extra or "correct" not in r.extra:
            raise BadInputError(
                f"{r.where}: the record has no 'options'/'correct' for multiple choice; "
                "pass multiple_choice=False"
            )
        row = []
        for j, opt in enumerate(r.extra["options"]):
            ids = tok(" " + str(opt), add_special_tokens=False)["input_ids"]
            row.append(float(first_logp[k][ids[0]]))  # the prompt's forward already scored it
            if len(ids) > 1:
                # Labelled from the option's second token: the first is scored already.
                labels = [IGNORE_INDEX] * (len(prompt.input_ids) + 1) + ids[1:]
                whole = torch.cat([prompt.input_ids, torch.tensor(ids)])
                longer.append((k, j, Example(whole, torch.tensor(labels), prompt.vision)))
        scores.append(row)
    pad = tok.pad_token_id or 0
    device = model.device
    for start in range(0, len(longer), batch_size):
        chunk = longer[start : start + batch_size]
        batch = collate([e for *_, e in chunk], pad)  # right padding: positions from 0
        ids_t, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        kwargs: dict[str, Any] = {}
        if "pixel_values" in batch.inputs:
            kwargs["pixel_values"] = batch.inputs["pixel_values"].to(device, model.dtype)
        logits = model(input_ids=ids_t.to(device), attention_mask=mask.to(device), **kwargs).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, V)
        for row_i, (k, j, e) in enumerate(chunk):
            # Option token t (t >= 1) is predicted at position t - 1 of the labelled ones.
            at = (e.labels != IGNORE_INDEX).nonzero().squeeze(1) - 1
            scores[k][j] += float(logp[row_i, at, e.labels[at + 1]].sum())
    return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def mc_accuracy(
    model: PreTrainedModel,
    processor: Processor,
    records: Records,
    base_dir: str | Path | None = None,
    batch_size: int = 64,
) -> float:
    """Four-option multiple-choice accuracy by option log-likelihood."""
    usable = _usable(_records(records, base_dir), processor)
    if not usable:
        return float("nan")
    scores = option_loglik(model, processor, usable, base_dir, batch_size)
    hits = [_argmax(s) == r.extra["correct"] for r, s in zip(usable, scores, strict=True)]
    return sum(hits) / len(hits)


def evaluate_records(
    model: PreTrainedModel,
    processor: Processor,
    records: Records,
    base_dir: str | Path | None = None,
    batch_size: int = 64,
    multiple_choice: bool = True,
    max_new_tokens: int = 8,
) -> dict[str, dict[str, float]]:
    """Per modality (``"image"``, ``"text"``): ``gen_acc``, ``mc_acc``, ``rouge_l`` and ``n``.

    A modality with no usable records (image records for a text-only model) is left out.
    """
    usable = _usable(_records(records, base_dir), processor)
    prompts = _prompts(usable, processor)
    outputs, first_logp = _decode(model, processor, prompts, batch_size, max_new_tokens)
    mc_scores = None
    if multiple_choice:
        mc_scores = _option_scores(model, processor, usable, prompts, first_logp, batch_size)
    result: dict[str, dict[str, float]] = {}
    for modality in ("image", "text"):
        rows = [i for i, r in enumerate(usable) if (r.image is not None) == (modality == "image")]
        if not rows:
            continue
        gen = [normalize(usable[i].answer) in normalize(outputs[i]) for i in rows]
        rl = [rouge_l(outputs[i], usable[i].answer) for i in rows]
        stats = {
            "gen_acc": sum(gen) / len(rows),
            "rouge_l": sum(rl) / len(rows),
            "n": float(len(rows)),
        }
        if mc_scores is not None:
            mc = [_argmax(mc_scores[i]) == usable[i].extra["correct"] for i in rows]
            stats["mc_acc"] = sum(mc) / len(rows)
        result[modality] = stats
    return result


def evaluate_split(
    model: PreTrainedModel,
    processor: Processor,
    jsonl_path: str | Path,
    batch_size: int = 64,
    max_records: int | None = None,
    multiple_choice: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate a JSONL split; see :func:`evaluate_records`.

    Args:
        model: the model to measure.
        processor: its processor or tokenizer.
        jsonl_path: the split; image paths are relative to its directory.
        batch_size: prompts per forward pass.
        max_records: evaluate a seeded random subset of this size (the same every call).
        multiple_choice: also compute ``mc_acc`` (records need ``options`` and ``correct``).
    """
    records = read_records(jsonl_path)
    if max_records is not None and len(records) > max_records:
        # A seeded sample, not a stride: records alternate modality, a stride may not.
        keep = sorted(random.Random(0).sample(range(len(records)), max_records))
        records = [records[i] for i in keep]
    return evaluate_records(model, processor, records, batch_size=batch_size, multiple_choice=multiple_choice)
