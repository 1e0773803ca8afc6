"""``--json`` on the verbs that write, and errors as JSON objects (kvw_ledger.cli)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny
from click.testing import CliRunner, Result

from kvw_ledger.cli import main

ENTRY_KEYS = {"version", "op", "id", "hash", "parent", "time", "operator", "active", "body", "stability"}


def invoke(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(
            f"{args}: exit {result.exit_code}, wanted {code}\n{result.output}", result.exception
        )
    return result


def as_json(*args: str | Path, code: int = 0) -> Any:
    """The verb's stdout, which must be exactly one JSON document."""
    return json.loads(invoke(*args, "--json", code=code).stdout)


def _entry_hash(ledger: Path, version: int) -> str:
    return hashlib.sha256((ledger / "journal" / f"{version:08d}.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class Env:
    root: Path
    ledger: Path
    printed: dict[str, Any]  # verb -> what its --json printed, in the order run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("cli-json")
    model = root / "model"
    tiny.llama().save_pretrained(model)
    tiny.char_tokenizer().save_pretrained(model)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget_a = tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(2, 0))
    forget_b = tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 10))
    ledger = root / "led"
    printed = {
        "init": as_json("init", ledger, "--model", model, "-q"),
        "retain": as_json("retain", ledger, retain, "--id", "r1", "-q"),
        "probe": as_json("probe", ledger, "--retain", retain, "--max-attenuation", "0.9", "-q"),
        "forget": as_json("forget", ledger, forget_a, "--id", "A", "--gamma", "0.5", "--layers", "0:3", "-q"),
        "forget-b": as_json("forget", ledger, forget_b, "--id", "B", "--gamma", "0.5", "-q"),
        "rederive": as_json("rederive", ledger, "A", "--retain-stats", "r1", "-q"),
        "revert": as_json("revert", ledger, "A", "--reason", "withdrawn", "-q"),
        "export": as_json("export", ledger, root / "out", "--at", "5", "-q"),
        "gc": as_json("gc", ledger, "--reverted"),
    }
    yield Env(root, ledger, printed)


@pytest.mark.parametrize(
    ("verb", "version", "op", "id_"),
    [
        ("init", 1, "init", None),
        ("retain", 2, "retain", "r1"),
        ("probe", 3, "probe", None),
        ("forget", 4, "forget", "A"),
        ("forget-b", 5, "forget", "B"),
        ("rederive", 6, "rederive", "r1"),
        ("revert", 7, "revert", "A"),
        ("gc", 8, "gc", None),
    ],
)
def test_each_write_verb_prints_its_entry(env: Env, verb: str, version: int, op: str, id_: str | None) -> None:
    printed = env.printed[verb]
    assert set(printed) == ENTRY_KEYS
    journal = json.loads((env.ledger / "journal" / f"{version:08d}.json").read_bytes())
    assert (printed["version"], printed["op"], printed["id"]) == (version, op, id_)
    assert printed["hash"] == _entry_hash(env.ledger, version)
    assert printed["parent"] == journal["parent"] and printed["time"] == journal["time"]
    assert printed["operator"] == journal["operator"]
    assert printed["body"] == journal["body"]
    assert printed["active"] == journal["body"]["active"]
    assert printed["stability"] == journal["body"].get("stability")


def test_steps_that_change_head_print_their_stability_figures(env: Env) -> None:
    for verb in ("forget", "forget-b", "rederive", "revert"):
        stability = env.printed[verb]["stability"]
        assert stability["passed"] is True and stability["failed"] == []
        assert 0 < stability["max_attenuation"] <= 0.9, verb  # B stays active after the revert
        assert set(stability["probes"]) == {"retain"}
    assert env.printed["forget"]["active"] == ["A"]
    assert env.printed["revert"]["active"] == ["B"]
    assert env.printed["gc"]["body"]["deleted"] == ["A"]
    assert env.printed["probe"]["body"]["limits"] == {"max_attenuation": 0.9}


def test_export_prints_the_version_it_wrote(env: Env) -> None:
    printed = env.printed["export"]
    assert set(printed) == {"path", "version", "id", "hash", "head_hash", "active"}
    provenance = json.loads((env.root / "out" / "kvw_provenance.json").read_text())
    assert printed["path"] == str(env.root / "out")
    assert (printed["version"], printed["id"], printed["active"]) == (5, "B", ["A", "B"])
    assert printed["hash"] == provenance["entry_hash"] == _entry_hash(env.ledger, 5)
    assert printed["head_hash"] == provenance["head_hash"] == _entry_hash(env.ledger, 7)


def test_without_json_the_text_is_unchanged(env: Env, tmp_path: Path) -> None:
    ledger = shutil.copytree(env.ledger, tmp_path / "led")
    result = invoke("gc", ledger, "--reverted")
    assert result.stdout == "version 9: deleted 0 files of 0 reverted request(s): -\n"


# --- errors ---------------------------------------------------------------------------------


def _error(*args: str | Path, code: int) -> dict[str, Any]:
    result = invoke(*args, "--json", code=code)
    printed = json.loads(result.stdout)
    assert set(printed) == {"error", "exit_code"} and printed["exit_code"] == code
    return printed


def test_a_library_error_is_a_json_object_with_the_same_exit_code(env: Env) -> None:
    printed = _error("forget", env.ledger, env.root / "nowhere.jsonl", "-q", code=2)
    assert "nowhere.jsonl: no such data file" in printed["error"]
    assert "no such data file" in _error("retain", env.ledger, env.root / "nowhere.jsonl", code=2)["error"]
    assert "not a version, a request id" in _error("show", env.ledger, "nope", code=2)["error"]
    assert "no ledger at" in _error("log", env.root / "nothing-here", code=2)["error"]


def test_a_failed_stability_check_is_a_json_object_and_exit_1(env: Env, tmp_path: Path) -> None:
    ledger = shutil.copytree(env.ledger, tmp_path / "led")
    before = sorted((ledger / "journal").iterdir())
    printed = _error(
        "forget", ledger, env.root / "a.jsonl", "--id", "C", "--gamma", "0.5",
        "--max-attenuation", "0.001", "-q", code=1,
    )
    assert "was not committed" in printed["error"] and "(limit 0.001) FAILED" in printed["error"]
    assert sorted((ledger / "journal").iterdir()) == before


def test_warnings_stay_on_stderr_so_stdout_is_pure_json(env: Env, tmp_path: Path) -> None:
    ledger = shutil.copytree(env.ledger, tmp_path / "led")
    result = invoke(
        "forget", ledger, env.root / "a.jsonl", "--id", "C", "--gamma", "0.5",
        "--max-attenuation", "0.001", "--on-fail", "warn", "-q", "--json",
    )
    printed = json.loads(result.stdout)
    assert printed["id"] == "C" and printed["stability"]["passed"] is False
    assert "Warning: committed although attenuation" in result.stderr


def test_usage_errors_are_json_objects_too(env: Env) -> None:
    assert "Missing argument 'DATA'" in _error("forget", env.ledger, code=2)["error"]
    assert "'--gamma'" in _error("forget", env.ledger, "a.jsonl", "--gamma", "x", code=2)["error"]
    printed = _error("rederive", env.ledger, "--retain-stats", "r1", "--exact", "nonsense", code=2)
    assert "must look like REQUEST_ID=DATA.jsonl" in printed["error"]


def test_without_json_errors_stay_on_stderr(env: Env) -> None:
    result = invoke("forget", env.ledger, env.root / "nowhere.jsonl", "-q", code=2)
    assert result.stdout == "" and result.stderr.startswith("Error: ")
    assert "nowhere.jsonl: no such data file" in result.stderr
