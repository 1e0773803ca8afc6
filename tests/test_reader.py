"""Tests for kvw_ledger.reader: the journal-only read path, and what it leaves unimported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from kvw_ledger import refs
from kvw_ledger.errors import (
    FormatVersionError,
    IntegrityError,
    LedgerNotFoundError,
    RefNotFoundError,
)
from kvw_ledger.ledger import Ledger
from kvw_ledger.reader import LedgerReader

HEAVY = ("torch", "transformers", "zarr")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    opened = Ledger.create(root / "led", root / "model", progress=False)
    opened.retain(tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(3, 40)), progress=False)
    return root / "led"


def _imported_by(*argv: str) -> tuple[list[str], str]:
    """Runs the CLI in a fresh interpreter; returns the heavy modules it imported and its stdout."""
    code = (
        "import io, json, sys, contextlib\n"
        "from kvw_ledger.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        main({list(argv)!r})\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        f"print(json.dumps([[m for m in {HEAVY!r} if m in sys.modules], out.getvalue()]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    heavy, stdout = json.loads(done.stdout)
    return heavy, stdout


def test_log_imports_neither_torch_transformers_nor_zarr(ledger: Path) -> None:
    heavy, stdout = _imported_by("log", str(ledger), "--json")
    assert heavy == []
    assert [e["op"] for e in json.loads(stdout)] == ["init", "retain"]


def test_help_imports_neither_torch_transformers_nor_zarr() -> None:
    heavy, stdout = _imported_by("--help")
    assert heavy == [] and "Usage: " in stdout
    heavy, stdout = _imported_by("forget", "--help")
    assert heavy == [] and "--layers" in stdout


def test_show_of_a_journal_only_entry_stays_light(ledger: Path) -> None:
    heavy, stdout = _imported_by("show", str(ledger), "HEAD", "--json")
    assert heavy == [] and json.loads(stdout)["id"] == "retain-2"


def test_the_package_itself_imports_no_torch() -> None:
    code = f"import sys, kvw_ledger; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_reader_sees_what_the_ledger_sees(ledger: Path) -> None:
    reader = LedgerReader.open(ledger)
    opened = Ledger.open(ledger)
    assert reader.entries() == opened.entries()
    assert reader.attrs == opened.store.attrs
    assert reader.entry("HEAD") == opened.head() and reader.entry(1).op == "init"
    assert reader.remote is None and reader.path == ledger


def test_refs_resolve_like_the_ledger(ledger: Path) -> None:
    entries = LedgerReader.open(ledger).entries()
    assert [refs.resolve(r, entries) for r in ("1", "HEAD", "HEAD~1", 2)] == [1, 2, 1, 2]
    with pytest.raises(RefNotFoundError, match="goes back past version 1"):
        refs.resolve("HEAD~2", entries)
    with pytest.raises(RefNotFoundError, match="version 3 does not exist; versions are 1..2"):
        refs.resolve("3", entries)


def test_no_ledger_a_newer_format_and_a_changed_root_are_refused(ledger: Path, tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError, match="no ledger at"):
        LedgerReader.open(tmp_path / "nothing")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "zarr.json").write_bytes((ledger / "zarr.json").read_bytes())
    with pytest.raises(LedgerNotFoundError, match="has no journal"):
        LedgerReader.open(tmp_path / "bare")

    newer = tmp_path / "newer"
    newer.mkdir()
    meta = json.loads((ledger / "zarr.json").read_bytes())
    meta["attributes"]["format_version"] = 99
    (newer / "zarr.json").write_text(json.dumps(meta))
    (newer / "journal").mkdir()
    with pytest.raises(FormatVersionError, match="format 99, this one reads up to 1"):
        LedgerReader.open(newer)

    changed = tmp_path / "changed"
    (changed / "journal").mkdir(parents=True)
    for entry in (ledger / "journal").iterdir():
        (changed / "journal" / entry.name).write_bytes(entry.read_bytes())
    meta["attributes"]["format_version"] = 1
    meta["attributes"]["towers"] = "all"
    (changed / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="differs from what init recorded"):
        LedgerReader.open(changed)
    assert LedgerReader.open(changed, check_root=False).attrs["towers"] == "all"
