"""Tests for kvw_ledger.errors: which exit code each kind of failure carries to the CLI.

Another writer in the way (its lock held past the wait, a commit that lost the race)
is a transient condition: exit 75 (EX_TEMPFAIL, "try again later"), never 2 (bad
input, which fails again however often it is retried). Each condition is produced for
real against a ledger and run through the CLI, as text and as ``--json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import tiny
from click.testing import CliRunner, Result

from kvw_ledger import errors
from kvw_ledger.cli import main
from kvw_ledger.journal import Journal
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger

EX_TEMPFAIL = 75  # sysexits.h


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger after init, retain and one request, B."""
    root = tmp_path_factory.mktemp("errors")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    ledger = Ledger.create(root / "led", root / "model", progress=False)
    ledger.retain(tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(3, 40)), progress=False)
    forget = tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 10))
    ledger.forget(forget, request_id="B", config=KVWConfig(gamma=0.5), progress=False)
    return root / "led"


@pytest.fixture
def ledger(prepared: Path, tmp_path: Path) -> Path:
    shutil.copytree(prepared, tmp_path / "led")
    return tmp_path / "led"


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "model-fingerprints.json"  # a cache beside the ledger
    }


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _json_error(result: Result) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(result.output)
    assert set(error) == {"error", "exit_code"}, error
    return error


def test_each_error_carries_the_exit_code_of_its_kind() -> None:
    transient = [errors.LedgerLockedError, errors.ConcurrentCommitError]
    for cls in transient:
        assert issubclass(cls, errors.TransientError) and cls("x").exit_code == EX_TEMPFAIL
    # Still the built-ins callers catch without knowing this package.
    assert isinstance(errors.LedgerLockedError("x"), BlockingIOError)
    assert isinstance(errors.ConcurrentCommitError("x"), FileExistsError)
    for cls in (errors.BadInputError, errors.StorageError, errors.RefNotFoundError):
        assert not issubclass(cls, errors.TransientError) and cls("x").exit_code == 2
    assert errors.IntegrityError("x").exit_code == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_a_lock_held_past_the_wait_exits_75_and_changes_nothing(
    ledger: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    # A live holder: this very process, as another writer's lock file names it.
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": "2026-01-01T00:00:00Z",
              "operation": "forget"}
    (ledger / "lock").write_text(json.dumps(record))
    monkeypatch.setattr(Ledger, "lock_timeout", 0.2)
    before = _tree(ledger)
    result = _run("revert", ledger, "B", *(["--json"] if as_json else []))
    assert result.exit_code == EX_TEMPFAIL, result.output
    message = _json_error(result)["error"] if as_json else result.output
    assert f"ledger is locked by pid {os.getpid()}" in message
    assert f"lock file {ledger / 'lock'}" in message
    if as_json:
        assert _json_error(result)["exit_code"] == EX_TEMPFAIL
    assert _tree(ledger) == before
    (ledger / "lock").unlink()  # the other writer is done: the same command now succeeds
    assert _run("revert", ledger, "B").exit_code == 0


@pytest.mark.parametrize("as_json", [False, True])
def test_a_commit_that_loses_the_race_exits_75(
    ledger: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    # Another writer that ignored the lock commits the very version this write is about
    # to create, a moment before it: the journal's exclusive create refuses the loser.
    real_append = Journal.append
    raced: list[int] = []

    def append(self: Journal, op: str, body: dict[str, Any], files: dict[str, str], **kwargs: Any) -> Any:
        if not raced:
            winner = real_append(self, op, body, files, **kwargs)
            raced.append(winner.version)
        return real_append(self, op, body, files, **kwargs)

    monkeypatch.setattr(Journal, "append", append)
    head = Ledger.open(ledger).head().version
    result = _run("revert", ledger, "B", *(["--json"] if as_json else []))
    assert raced == [head + 1]
    assert result.exit_code == EX_TEMPFAIL, result.output
    message = _json_error(result)["error"] if as_json else result.output
    assert f"another writer committed journal version {head + 1}" in message
    assert "retry under the writer lock" in message
    if as_json:
        assert _json_error(result)["exit_code"] == EX_TEMPFAIL
    assert not (ledger / "lock").exists()  # the loser let go of its lock
    assert Ledger.open(ledger).head().version == head + 1  # the winner's entry, and one only


def test_bad_input_still_exits_2_beside_them(ledger: Path) -> None:
    result = _run("revert", ledger, "nobody", "--json")
    assert result.exit_code == 2
    error = _json_error(result)
    assert error["exit_code"] == 2 and "no request 'nobody' in this ledger" in error["error"]
