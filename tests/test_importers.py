"""Tests for kvw_ledger.importers: small parquet files in the hubs' exact schemas -> our JSONL."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from kvw_ledger import data
from kvw_ledger.cli import main
from kvw_ledger.errors import BadInputError, DataError
from kvw_ledger.importers import import_benchmark

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OPTIONS = pa.struct([(k, pa.string()) for k in "ABCD"])
CHOICE = pa.list_(pa.struct([("Question", pa.string()), ("Options", OPTIONS), ("Correct_Answer", pa.string())]))
TASK = pa.list_(pa.struct([("Question", pa.string()), ("Ground_Truth", pa.string()), ("Type", pa.string())]))
CLASSIFICATION = pa.struct([("Image_Textual_Questions", CHOICE), ("Pure_Text_Questions", CHOICE)])


def png(colour: tuple[int, int, int]) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{colour[0]}.png"}


def write(path: Path, columns: dict[str, tuple[pa.DataType, list[Any]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, type=t) for k, (t, v) in columns.items()})
    pq.write_table(table, path)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mllmu_person(pid: str, colour: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "image": png(colour), "ID": pid, "biography": f"{pid} was born in Lyon.",
        "question": "Who is this?", "answer": f"Person {pid}",
        "Classification_Task": {
            "Image_Textual_Questions": [{"Question": "Where was this person born?",
                                         "Options": {"A": "Paris", "B": "Lyon", "C": "Nice", "D": "Metz"},
                                         "Correct_Answer": "B"}],
            "Pure_Text_Questions": [{"Question": f"Where was {pid} born?",
                                     "Options": {"A": "Lyon", "B": "Paris", "C": "Nice", "D": "Metz"},
                                     "Correct_Answer": "A"}],
        },
        "Generation_Task": [{"Question": "What city is this person from?", "Ground_Truth": "Lyon", "Type": "Image_Textual"},
                            {"Question": f"What city is {pid} from?", "Ground_Truth": "Lyon", "Type": "Pure_Text"}],
        "Mask_Task": [{"Question": f"{pid} was born in __.", "Ground_Truth": "Lyon", "Type": "Pure_Text"}],
    }  # fmt: skip


PROFILE_TYPES = {
    "image": IMAGE, "ID": pa.string(), "biography": pa.string(), "question": pa.string(),
    "answer": pa.string(), "Classification_Task": CLASSIFICATION, "Generation_Task": TASK, "Mask_Task": TASK,
}  # fmt: skip


def write_profiles(path: Path, people: list[dict[str, Any]], drop: str | None = None) -> Path:
    return write(path, {k: (t, [p[k] for p in people]) for k, t in PROFILE_TYPES.items() if k != drop})


@pytest.fixture
def mllmu(tmp_path: Path) -> Path:
    src = tmp_path / "MLLMU-Bench"
    people = [mllmu_person("p1", (200, 0, 0)), mllmu_person("p2", (0, 200, 0))]
    write_profiles(src / "forget_5" / "train-00000-of-00001.parquet", people[:1])
    write_profiles(src / "retain_95" / "train-00000-of-00001.parquet", people[1:])
    test = {k: (t, [people[0][k]]) for k, t in PROFILE_TYPES.items() if k not in ("image", "question", "answer")}
    test["images"] = (pa.list_(IMAGE), [[png((1, 2, 3)), png((4, 5, 6))]])
    write(src / "Test_Set" / "train-00000-of-00001.parquet", test)
    metadata = json.dumps([{"Question": "What is her job?", "Answer": "Baker"},
                           {"Question": "Where does she live?", "Answer": "Lyon"}])  # fmt: skip
    write(src / "ft_Data" / "train-00000-of-00001.parquet",
          {"image": (IMAGE, [png((200, 0, 0))]), "ID": (pa.string(), ["p1"]), "metadata": (pa.string(), [metadata])})  # fmt: skip
    return src


def test_mllmu_every_task_becomes_records_that_data_and_evaluate_read(mllmu: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = import_benchmark("mllmu", mllmu, out)
    assert [s.name for s in report.splits] == ["forget_5", "retain_95", "Test_Set", "ft_Data"]
    forget = read(out / "forget_5.jsonl")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in forget:
        by_task.setdefault(r["task"], []).append(r)
    assert {t: len(v) for t, v in by_task.items()} == {"qa": 1, "classification": 2, "generation": 2, "mask": 1}
    qa = by_task["qa"][0]
    assert (qa["question"], qa["answer"], qa["biography"], qa["person"]) == (
        "Who is this?", "Person p1", "p1 was born in Lyon.", "p1")
    image_mc, text_mc = by_task["classification"]
    assert image_mc["options"] == ["Paris", "Lyon", "Nice", "Metz"] and image_mc["correct"] == 1
    assert image_mc["answer"] == "Lyon" and image_mc["modality"] == "image" and "image" in image_mc
    assert text_mc["correct"] == 0 and "image" not in text_mc and text_mc["modality"] == "text"
    gen_image, gen_text = by_task["generation"]
    assert "image" in gen_image and "image" not in gen_text and gen_text["answer"] == "Lyon"
    assert by_task["mask"][0]["question"] == "p1 was born in __." and "image" not in by_task["mask"][0]
    # The image written beside the JSONL is the parquet's bytes, and data.py reads every record.
    assert (out / qa["image"]).read_bytes() == png((200, 0, 0))["bytes"]
    records = data.read_records(out / "forget_5.jsonl")
    assert len(records) == len(forget) and records[0].image == (out / qa["image"]).resolve()
    assert len({r["id"] for r in forget}) == len(forget)
    assert report.splits[0].multiple_choice == 2
    # ft_Data: the JSON-string metadata, each pair about the same image (written once).
    ft = read(out / "ft_Data.jsonl")
    assert [(r["question"], r["answer"]) for r in ft] == [("What is her job?", "Baker"), ("Where does she live?", "Lyon")]
    assert ft[0]["image"] == qa["image"] and report.splits[3].images == 0
    # Test_Set: every image-grounded item once per view, text items once.
    test = read(out / "Test_Set.jsonl")
    views = {r["image"] for r in test if "image" in r}
    assert len(views) == 2
    assert sum(r["task"] == "classification" and "image" in r for r in test) == 2
    assert sum(r["task"] == "classification" and "image" not in r for r in test) == 1


def test_mllmu_options_are_scored_by_evaluate(mllmu: Path, tmp_path: Path) -> None:
    import tiny

    from kvw_ledger import evaluate

    out = tmp_path / "out"
    import_benchmark("mllmu", mllmu, out, ["forget_5"])
    records = [r for r in read(out / "forget_5.jsonl") if "image" not in r and "options" in r]
    model, tok = tiny.llama(), tiny.char_tokenizer()
    result = evaluate.evaluate_records(model, tok, records, out)
    assert result["text"]["n"] == 1 and 0.0 <= result["text"]["mc_acc"] <= 1.0
    scores = evaluate.option_loglik(model, tok, records, out)
    assert len(scores[0]) == 4
    best = max(range(4), key=scores[0].__getitem__)
    assert result["text"]["mc_acc"] == float(best == records[0]["correct"])


def test_clear_configs_and_variants(tmp_path: Path) -> None:
    src, out = tmp_path / "CLEAR", tmp_path / "out"
    person = {"image": (IMAGE, [png((9, 9, 9))]), "caption": (pa.string(), ["A man in a red hat."]),
              "name": (pa.string(), ["Ann Bel"])}  # fmt: skip
    write(src / "forget01" / "train-00000-of-00001.parquet", person)
    write(src / "forget01+tofu" / "train-00000-of-00001.parquet", {
        "image": (IMAGE, [png((9, 9, 9)), None]), "caption": (pa.string(), ["A man in a red hat.", None]),
        "question": (pa.string(), [None, "What genre does Ann Bel write?"]), "answer": (pa.string(), [None, "Poetry"]),
    })  # fmt: skip
    write(src / "forget01_perturbed" / "train-00000-of-00001.parquet", {
        **person, "perturbed_captions": (pa.list_(pa.string()), [["A woman.", "A dog."]]),
        "paraphrased_caption": (pa.string(), ["A red-hatted man."]),
        "perturbed_names": (pa.list_(pa.string()), [["Cy Dee", "Ed Fox", "Gil Ho"]]),
    })  # fmt: skip
    write(src / "real_faces" / "train-00000-of-00001.parquet", {
        "image": (IMAGE, [png((1, 1, 1))]), "answer": (pa.string(), ["Ada Lovelace"]),
        "options": (pa.list_(pa.string()), [["Marie Curie", "Emmy Noether", "Rosalind Franklin"]]),
    })  # fmt: skip
    write(src / "real_world" / "train-00000-of-00001.parquet", {
        "image": (IMAGE, [png((2, 2, 2))]), "question": (pa.string(), ["What landmark is this?"]),
        "answer": (pa.string(), ["Eiffel Tower"]), "options": (pa.list_(pa.string()), [["Big Ben", "Colosseum"]]),
    })  # fmt: skip
    import_benchmark("clear", src, out)
    caption, recognition = read(out / "forget01.jsonl")
    assert (caption["task"], caption["answer"]) == ("caption", "A man in a red hat.")
    assert (recognition["task"], recognition["answer"], recognition["name"]) == ("recognition", "Ann Bel", "Ann Bel")
    assert caption["image"] == recognition["image"] and "options" not in recognition
    mixed = read(out / "forget01+tofu.jsonl")
    assert [(r["task"], r["modality"]) for r in mixed] == [("caption", "image"), ("qa", "text")]
    assert mixed[1]["answer"] == "Poetry" and "image" not in mixed[1]
    pcap, prec = read(out / "forget01_perturbed.jsonl")
    assert pcap["paraphrased_answer"] == "A red-hatted man." and pcap["perturbed_answers"] == ["A woman.", "A dog."]
    assert sorted(prec["options"]) == sorted(["Ann Bel", "Cy Dee", "Ed Fox", "Gil Ho"])
    assert prec["options"][prec["correct"]] == "Ann Bel"
    (face,) = read(out / "real_faces.jsonl")
    assert face["question"] == "What is the name of the person in the image?"
    assert len(face["options"]) == 4 and face["options"][face["correct"]] == "Ada Lovelace"
    (world,) = read(out / "real_world.jsonl")
    assert world["options"][world["correct"]] == "Eiffel Tower" and len(world["options"]) == 3
    for name in ("forget01", "forget01+tofu", "forget01_perturbed", "real_faces", "real_world"):
        data.read_records(out / f"{name}.jsonl")
    # The answer's place among the options is fixed by the record, not by chance.
    again = tmp_path / "again"
    import_benchmark("clear", src, again, ["real_faces"])
    assert read(again / "real_faces.jsonl") == [face]


def test_tofu_splits_perturbed_and_multiple_choice(tmp_path: Path) -> None:
    src, out = tmp_path / "TOFU", tmp_path / "out"
    qa = {"question": (pa.string(), ["Who wrote X?", "Where?"]), "answer": (pa.string(), ["Jo", "Oslo"])}
    for config in ("forget01", "retain99", "holdout01"):
        write(src / config / "train-00000-of-00001.parquet", qa)
    write(src / "forget01_perturbed" / "train-00000-of-00001.parquet", {
        "question": (pa.string(), ["Who wrote X?"]), "answer": (pa.string(), ["Jo"]),
        "paraphrased_question": (pa.string(), ["X was written by whom?"]),
        "paraphrased_answer": (pa.string(), ["It was Jo."]),
        "perturbed_answer": (pa.list_(pa.string()), [["Al", "Bo", "Cy"]]),
    })  # fmt: skip
    write(src / "world_facts" / "train-00000-of-00001.parquet", {
        "question": (pa.string(), ["Capital of France?"]), "option1": (pa.string(), ["Rome"]),
        "option2": (pa.string(), ["Paris"]), "option3": (pa.string(), ["Oslo"]), "option4": (pa.string(), ["Bern"]),
        "answer": (pa.string(), ["Paris"]),
    })  # fmt: skip
    report = import_benchmark("tofu", src, out)
    assert [s.name for s in report.splits] == ["forget01", "retain99", "holdout01", "forget01_perturbed", "world_facts"]
    assert [(r["question"], r["answer"]) for r in read(out / "holdout01.jsonl")] == [("Who wrote X?", "Jo"), ("Where?", "Oslo")]
    (p,) = read(out / "forget01_perturbed.jsonl")
    assert (p["paraphrased_question"], p["paraphrased_answer"], p["perturbed_answers"]) == (
        "X was written by whom?", "It was Jo.", ["Al", "Bo", "Cy"])
    (mc,) = read(out / "world_facts.jsonl")
    assert mc["options"] == ["Rome", "Paris", "Oslo", "Bern"] and mc["correct"] == 1


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_import_prints_json_and_text(mllmu: Path, tmp_path: Path) -> None:
    result = cli("import", "mllmu", mllmu, tmp_path / "j", "--split", "forget_5", "--json")
    assert result.exit_code == 0, result.output
    (split,) = json.loads(result.output)["splits"]
    assert (split["name"], split["records"], split["multiple_choice"], split["images"]) == ("forget_5", 6, 2, 1)
    result = cli("import", "mllmu", mllmu, tmp_path / "t", "--split", "ft_Data")
    assert result.exit_code == 0, result.output
    assert result.output == f"ft_Data: 2 records, 1 new images -> {tmp_path / 't' / 'ft_Data.jsonl'}\n"


def test_a_file_missing_a_column_is_named_with_the_column(mllmu: Path, tmp_path: Path) -> None:
    bad = write_profiles(mllmu / "forget_10" / "train-00000-of-00001.parquet",
                         [mllmu_person("p3", (0, 0, 9))], drop="Mask_Task")  # fmt: skip
    result = cli("import", "mllmu", mllmu, tmp_path / "out", "--split", "forget_10")
    assert result.exit_code == 2
    assert f"{bad}: missing column 'Mask_Task'" in result.output
    assert not (tmp_path / "out" / "forget_10.jsonl").exists()


def test_bad_inputs_are_refused_by_name(mllmu: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"--split 'forget_7' is not a mllmu config"):
        import_benchmark("mllmu", mllmu, tmp_path / "o", ["forget_7"])
    with pytest.raises(BadInputError, match=r"no parquet files for config 'Full_Set'"):
        import_benchmark("mllmu", mllmu, tmp_path / "o", ["Full_Set"])
    with pytest.raises(BadInputError, match="no such directory"):
        import_benchmark("tofu", tmp_path / "nowhere", tmp_path / "o")
    import_benchmark("mllmu", mllmu, tmp_path / "o", ["forget_5"])
    with pytest.raises(BadInputError, match="already exists; import never overwrites"):
        import_benchmark("mllmu", mllmu, tmp_path / "o", ["forget_5"])
    person = mllmu_person("p4", (5, 5, 5))
    person["Classification_Task"]["Pure_Text_Questions"][0]["Correct_Answer"] = "E"
    path = write_profiles(mllmu / "Full_Set" / "train-00000-of-00001.parquet", [person])
    with pytest.raises(DataError, match=rf"{path}: row 0, column 'Classification_Task.Pure_Text_Questions': Correct_Answer 'E'"):
        import_benchmark("mllmu", mllmu, tmp_path / "o2", ["Full_Set"])
    person = mllmu_person("p5", (6, 6, 6))
    person["image"] = {"bytes": b"not an image", "path": "x.png"}
    path = write_profiles(mllmu / "retain_90" / "train-00000-of-00001.parquet", [person])
    with pytest.raises(DataError, match=rf"{path}: row 0, column 'image': the image bytes are not a readable image"):
        import_benchmark("mllmu", mllmu, tmp_path / "o3", ["retain_90"])
    (mllmu / "retain_85").mkdir()
    (mllmu / "retain_85" / "train.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(DataError, match="not a readable parquet file"):
        import_benchmark("mllmu", mllmu, tmp_path / "o4", ["retain_85"])
