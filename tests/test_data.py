"""JSONL records to answer-only labels, fingerprints, and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch

from kvw_ledger.data import (
    IGNORE_INDEX,
    Encoder,
    Record,
    cause_mask,
    collate,
    combine_jsonl,
    encode_all,
    fingerprint,
    parse_record,
    read_records,
)
from kvw_ledger.errors import DataError


def test_prompt_and_answer_are_tokenized_apart_and_only_the_answer_is_labelled(
    tmp_path: Path,
) -> None:
    tok = tiny.char_tokenizer()
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Who?", "answer": "Ada"}])
    example = Encoder(tok).encode(read_records(path)[0])
    prompt = tok("Question: Who?\nAnswer:")["input_ids"]
    answer = tok(" Ada", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert example.input_ids.tolist() == [*prompt, *answer, eos]
    # As the authors' collate: the answer's own tokens only, the eos stays unlabelled.
    assert example.labels.tolist() == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX]


def test_label_eos_labels_the_eos_too_with_the_same_ids(tmp_path: Path) -> None:
    tok = tiny.char_tokenizer()
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Who?", "answer": "Ada"}])
    authors = Encoder(tok).encode(read_records(path)[0])
    with_eos = Encoder(tok, label_eos=True).encode(read_records(path)[0])
    assert with_eos.input_ids.tolist() == authors.input_ids.tolist()
    assert with_eos.labels[-1] == tok.eos_token_id and authors.labels[-1] == IGNORE_INDEX
    assert with_eos.labels[:-1].tolist() == authors.labels[:-1].tolist()
    # One more selected position per record: the one that predicts the eos.
    assert collate([with_eos], 0).n_tokens == collate([authors], 0).n_tokens + 1


def test_collate_pads_right_and_selects_positions_that_predict_answer_tokens(
    tmp_path: Path,
) -> None:
    tok = tiny.char_tokenizer()
    path = tiny.write_jsonl(
        tmp_path / "d.jsonl",
        [{"question": "Q", "answer": "Ab"}, {"question": "Longer?", "answer": "C"}],
    )
    examples = encode_all(Encoder(tok, label_eos=True), read_records(path))
    batch = collate(examples, tok.pad_token_id)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    assert ids.shape == (2, max(n0, n1)) and mask[0].tolist() == [1] * n0 + [0] * (
        ids.shape[1] - n0
    )
    assert (ids[0, n0:] == tok.pad_token_id).all()
    width = ids.shape[1]
    # Answers " Ab</s>" (4 tokens) and " C</s>" (3): the position before each answer token.
    expected = [n0 - 5 + k for k in range(4)] + [width + n1 - 4 + k for k in range(3)]
    assert batch.positions.tolist() == expected and batch.n_tokens == 7


def test_chat_template_puts_the_answer_in_the_assistant_turn(tmp_path: Path) -> None:
    tok = tiny.char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Who?", "answer": "Ada"}])
    def labelled(example: object) -> str:
        ids = [
            i
            for i, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True)  # type: ignore[attr-defined]
            if label != IGNORE_INDEX
        ]
        return tok.decode(ids)

    example = Encoder(tok).encode(read_records(path)[0])
    assert labelled(example) == "Ada"  # the answer only, not the turn's end
    assert tok.decode(example.input_ids[: len(example.input_ids) - 4]).endswith("assistant: ")
    whole_turn = Encoder(tok, label_eos=True).encode(read_records(path)[0])
    assert labelled(whole_turn) == "Ada\n"
    assert whole_turn.input_ids.tolist() == example.input_ids.tolist()


def test_a_template_that_alters_the_answer_is_refused_naming_the_record(tmp_path: Path) -> None:
    tok = tiny.char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Who?", "answer": "Ada"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the chat template does not render the answer verbatim"):
        Encoder(tok).encode(read_records(path)[0])
    assert Encoder(tok, label_eos=True).encode(read_records(path)[0]).labels.ne(IGNORE_INDEX).any()


def test_image_records_go_through_the_processor(tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "img" / "a.png")
    path = tiny.write_jsonl(
        tmp_path / "d.jsonl", [{"question": "Who is this?", "answer": "Ada", "image": "img/a.png"}]
    )
    example = Encoder(tiny.llava_processor()).encode(read_records(path)[0])
    assert example.vision["pixel_values"].shape == (1, 3, 16, 16)
    assert example.input_ids[:4].tolist() == [
        3,
        3,
        3,
        3,
    ]  # the <image> token, expanded to 4 patches


def test_fingerprint_covers_records_and_image_bytes_not_paths(tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "a.png", (1, 2, 3))
    tiny.save_image(tmp_path / "sub" / "b.png", (1, 2, 3))
    one = tiny.write_jsonl(
        tmp_path / "one.jsonl", [{"question": "Q", "answer": "A", "image": "a.png"}]
    )
    two = tiny.write_jsonl(
        tmp_path / "two.jsonl", [{"question": "Q", "answer": "A", "image": "sub/b.png"}]
    )
    assert fingerprint(read_records(one)) == fingerprint(read_records(two))
    tiny.save_image(tmp_path / "sub" / "b.png", (1, 2, 4))
    assert fingerprint(read_records(one)) != fingerprint(read_records(two))
    other = tiny.write_jsonl(
        tmp_path / "other.jsonl", [{"question": "Q", "answer": "B", "image": "a.png"}]
    )
    assert fingerprint(read_records(other)) != fingerprint(read_records(one))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"question": "Q", "answer": "A"}\n{"question": "Q", "answer": \n',
            r"d\.jsonl:2: not valid JSON",
        ),
        ('["Q", "A"]\n', r"d\.jsonl:1: expected a JSON object with question and answer"),
        ('{"question": "Q"}\n', r"d\.jsonl:1: field 'answer' must be a string"),
        ('{"question": 3, "answer": "A"}\n', r"d\.jsonl:1: field 'question' must be a string"),
        ('\n{"question": "Q", "answer": "  "}\n', r"d\.jsonl:2: the answer is empty"),
        (
            '{"question": "Q", "answer": "A", "image": "nope.png"}\n',
            r"d\.jsonl:1: image nope\.png not found",
        ),
        ("\n\n", r"d\.jsonl: no records"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: no such data file"):
        read_records(tmp_path / "missing.jsonl")


def test_answer_truncated_away_names_the_record(tmp_path: Path) -> None:
    path = tiny.write_jsonl(
        tmp_path / "d.jsonl", [{"question": "A rather long question?", "answer": "Ada"}]
    )
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: the answer is truncated away \(prompt is 41 tokens, max length 20\)",
    ):
        Encoder(tiny.char_tokenizer(), max_length=20).encode(read_records(path)[0])


def test_answer_that_tokenizes_to_nothing(tmp_path: Path) -> None:
    tok = tiny.char_tokenizer()
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the answer 'A' tokenizes to nothing"):
        Encoder(tok).encode(read_records(path)[0])


def test_image_record_for_a_text_model(tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "a.png")
    path = tiny.write_jsonl(
        tmp_path / "d.jsonl", [{"question": "Q", "answer": "A", "image": "a.png"}]
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: the record has an image but the model has no image processor"
    ):
        Encoder(tiny.char_tokenizer()).encode(read_records(path)[0])


def test_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = tiny.write_jsonl(
        tmp_path / "d.jsonl", [{"question": "Q", "answer": "A", "image": "a.png"}]
    )
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot read image"):
        Encoder(tiny.llava_processor()).encode(read_records(path)[0])


def test_positions_are_integers_on_the_host(tmp_path: Path) -> None:
    path = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.qa_records(3))
    batch = collate(encode_all(Encoder(tiny.char_tokenizer()), read_records(path)), 0)
    assert batch.positions.dtype == torch.long and batch.positions.device.type == "cpu"


def test_combine_jsonl_keeps_every_record_and_its_image(tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "a" / "img" / "x.png", (1, 2, 3))
    tiny.save_image(tmp_path / "b" / "y.png", (4, 5, 6))
    first = tiny.write_jsonl(tmp_path / "a" / "1.jsonl", [{"question": "Q1", "answer": "A1", "image": "img/x.png"}])
    second = tiny.write_jsonl(tmp_path / "b" / "g" / "2.jsonl", [{"question": "Q2", "answer": "A2", "image": "../y.png"},
                                                                 {"question": "Q3", "answer": "A3"}])
    combined = combine_jsonl([first, second], tmp_path / "c" / "all.jsonl")
    records = read_records(combined)
    assert [r.question for r in records] == ["Q1", "Q2", "Q3"]
    # The same records and image bytes: the fingerprints of the parts add up to the whole's.
    assert fingerprint(records) == fingerprint(read_records(first) + read_records(second))
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'answer' must be a string"):
        combine_jsonl([first, bad], tmp_path / "c" / "never.jsonl")


def test_other_fields_are_kept_aside_and_do_not_change_identity(tmp_path: Path) -> None:
    rows = [{"question": "Q?", "answer": "A", "options": ["A", "B"], "correct": 0, "id": 7}]
    path = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    (record,) = read_records(path)
    assert dict(record.extra) == {"options": ["A", "B"], "correct": 0} and record.id == "7"
    bare = tiny.write_jsonl(tmp_path / "e.jsonl", [{"question": "Q?", "answer": "A", "id": 7}])
    assert fingerprint([record]) == fingerprint(read_records(bare))  # extra fields do not count
    assert parse_record(rows[0], tmp_path, "mem:1") == Record("Q?", "A", None, "7", "mem:1")
    with pytest.raises(DataError, match="mem:2: field 'answer' must be a string"):
        parse_record({"question": "Q?"}, tmp_path, "mem:2")


def test_encode_prompt_is_the_prompt_encode_begins_with(tmp_path: Path) -> None:
    tiny.save_image(tmp_path / "a.png")
    rows = [{"question": "Who?", "answer": "Ada"}, {"question": "Who?", "answer": "Ada", "image": "a.png"}]
    path = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    encoder = Encoder(tiny.llava_processor())
    for record in read_records(path):
        whole, prompt = encoder.encode(record), encoder.encode_prompt(record)
        n = len(prompt.input_ids)
        assert whole.input_ids[:n].tolist() == prompt.input_ids.tolist()
        assert whole.labels[:n].eq(IGNORE_INDEX).all() and whole.labels[n] != IGNORE_INDEX
        assert prompt.labels.eq(IGNORE_INDEX).all()
        assert sorted(prompt.vision) == sorted(whole.vision)
        for key in whole.vision:
            assert torch.equal(prompt.vision[key], whole.vision[key])


def test_collate_keeps_the_labels_out_of_the_inputs(tmp_path: Path) -> None:
    tok = tiny.char_tokenizer()
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "Ab"}, {"question": "Qq", "answer": "C"}])
    examples = encode_all(Encoder(tok), read_records(path))
    batch = collate(examples, tok.pad_token_id)
    assert "labels" not in batch.inputs and batch.labels is not None
    for row, e in enumerate(examples):
        n = len(e.labels)
        assert batch.labels[row, :n].tolist() == e.labels.tolist()
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
    mask = cause_mask(batch.labels, batch.inputs["attention_mask"])
    assert mask.flatten().nonzero().squeeze(1).tolist() == batch.positions.tolist()
    assert torch.equal(batch.to("cpu").labels, batch.labels)
