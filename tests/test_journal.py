"""Tests for the hash-chained journal and the writer lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvw_ledger.errors import (
    BadInputError,
    ConcurrentCommitError,
    IntegrityError,
    LedgerLockedError,
    RefNotFoundError,
)
from kvw_ledger.journal import (
    OPS,
    Entry,
    Journal,
    Problem,
    canonical_json,
    default_operator,
    sha256_file,
)
from kvw_ledger.lock import WriterLock

FIXED = datetime(2026, 11, 23, 17, 42, tzinfo=UTC)


def _journal(root: Path) -> Journal:
    return Journal(root, clock=lambda: FIXED)


def _add_file(root: Path, rel: str, data: bytes) -> dict[str, str]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest()}


def _chain(root: Path, n: int) -> list[Entry]:
    journal = _journal(root)
    head = None
    made = []
    for i in range(n):
        files = _add_file(root, f"requests/r{i}/exponent/site", f"data {i}".encode())
        head = journal.append("forget" if i else "init", {"i": i}, files, parent=head)
        made.append(head)
    return made


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _mentions(problem_or_error: Problem | IntegrityError, path: Path, root: Path) -> bool:
    if isinstance(problem_or_error, Problem):
        return problem_or_error.path == path.relative_to(root).as_posix()
    return str(path) in str(problem_or_error)


# --- the journal -------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_and_newline_terminated() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}\n'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_sha256_file_streams(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_append_read_round_trip(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert journal.entries() == []
    assert journal.head() is None
    files = _add_file(tmp_path, "base/site.0", b"weights")
    first = journal.append("init", {"model": "tiny", "sites": [1, 2]}, files, parent=None)
    second = journal.append("forget", {"request": "r1"}, {}, parent=first)

    assert first.version == 1 and first.parent is None
    assert first.time == "2026-11-23T17:42:00Z"
    assert second.version == 2 and second.parent == first.hash
    assert journal.entries() == [first, second]
    assert journal.head() == second
    assert journal.get(1) == first
    assert first.hash == sha256_file(journal.entry_path(1))
    raw = journal.entry_path(1).read_bytes()
    assert raw == canonical_json(json.loads(raw))
    assert "hash" not in json.loads(raw)
    assert first.to_json() == {
        "version": 1,
        "op": "init",
        "time": "2026-11-23T17:42:00Z",
        "parent": None,
        "files": files,
        "body": {"model": "tiny", "sites": [1, 2]},
        "operator": default_operator(),
        "hash": first.hash,
    }
    with pytest.raises(RefNotFoundError, match="version 3 does not exist"):
        journal.get(3)
    with pytest.raises(RefNotFoundError):
        journal.get(0)


def test_permissions(tmp_path: Path) -> None:
    entry = _chain(tmp_path, 1)[0]
    journal = _journal(tmp_path)
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal.entry_path(entry.version).stat().st_mode) == 0o600
    assert [p.name for p in journal.path.iterdir()] == ["00000001.json"]  # no temp left


def test_append_rejects_bad_input(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    with pytest.raises(BadInputError, match="not one of"):
        journal.append("explode", {}, {}, parent=None)
    with pytest.raises(BadInputError, match="not JSON data"):
        journal.append("init", {"x": object()}, {}, parent=None)
    with pytest.raises(BadInputError):
        journal.append("init", {"x": float("inf")}, {}, parent=None)
    with pytest.raises(BadInputError, match=r"'\.\.'"):
        journal.append("init", {}, {"../escape": "0" * 64}, parent=None)
    with pytest.raises(BadInputError, match="sha256"):
        journal.append("init", {}, {"a": "xyz"}, parent=None)
    with pytest.raises(BadInputError):  # int keys would not read back as written
        journal.append("init", {2: "a", 10: "b"}, {}, parent=None)  # type: ignore[dict-item]
    with pytest.raises(BadInputError, match="naive"):
        Journal(tmp_path, clock=lambda: datetime(2026, 1, 1)).append("init", {}, {}, parent=None)
    assert journal.entries() == []


def test_append_rejects_a_parent_from_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = _journal(tmp_path / "other").append("init", {"other": True}, {}, parent=None)
    _chain(tmp_path / "mine", 1)
    with pytest.raises(BadInputError, match="does not match"):
        _journal(tmp_path / "mine").append("forget", {}, {}, parent=other)


def test_chain_verifies(tmp_path: Path) -> None:
    _chain(tmp_path, 5)
    assert _journal(tmp_path).verify(tmp_path) == []


def test_second_append_with_same_parent_fails_and_keeps_the_first(tmp_path: Path) -> None:
    first = _chain(tmp_path, 1)[0]
    journal = _journal(tmp_path)
    winner = journal.append("forget", {"who": "a"}, {}, parent=first)
    before = journal.entry_path(2).read_bytes()
    with pytest.raises(ConcurrentCommitError, match="committed journal version 2") as info:
        journal.append("forget", {"who": "b"}, {}, parent=first)
    assert isinstance(info.value, FileExistsError)
    assert journal.entry_path(2).read_bytes() == before
    assert journal.entries() == [first, winner]
    assert sorted(p.name for p in journal.path.iterdir()) == ["00000001.json", "00000002.json"]
    with pytest.raises(ConcurrentCommitError, match="version 1"):
        journal.append("init", {}, {}, parent=None)


def test_file_mismatch_and_missing_are_reported_with_the_path(tmp_path: Path) -> None:
    _chain(tmp_path, 3)
    (tmp_path / "requests/r1/exponent/site").write_bytes(b"tampered")
    (tmp_path / "requests/r2/exponent/site").unlink()
    problems = _journal(tmp_path).verify(tmp_path)
    assert [(p.path, p.severity) for p in problems] == [
        ("requests/r1/exponent/site", "error"),
        ("requests/r2/exponent/site", "error"),
    ]
    assert "altered" in problems[0].message and "journal/00000002.json" in problems[0].message
    assert problems[1].message.startswith("missing")


def test_gc_deleted_files_may_be_missing(tmp_path: Path) -> None:
    entries = _chain(tmp_path, 3)
    journal = _journal(tmp_path)
    gone = "requests/r1/exponent/site"
    (tmp_path / gone).unlink()
    assert [p.path for p in journal.verify(tmp_path)] == [gone]
    journal.append("gc", {"deleted_files": [gone]}, {}, parent=entries[-1])
    assert journal.verify(tmp_path) == []
    # a gc only excuses files recorded before it
    journal.append("forget", {}, _add_file(tmp_path, gone, b"again"), parent=journal.head())
    (tmp_path / gone).unlink()
    assert [p.path for p in journal.verify(tmp_path)] == [gone]


def test_chain_break_is_reported(tmp_path: Path) -> None:
    _chain(tmp_path, 3)
    journal = _journal(tmp_path)
    # a rewrite with a valid digest: only the chain can tell
    data = json.loads(journal.entry_path(2).read_bytes())
    data["body"]["i"] = 99
    del data["digest"]
    data["digest"] = hashlib.sha256(canonical_json(data)).hexdigest()
    journal.entry_path(2).write_bytes(canonical_json(data))
    journal.entries()  # each file is well formed
    problems = journal.verify(tmp_path)
    assert [p.path for p in problems] == ["journal/00000003.json"]
    assert "journal/00000002.json" in problems[0].message


def _rewrite(path: Path, change: Any) -> None:
    data = json.loads(path.read_bytes())
    change(data)
    del data["digest"]
    data["digest"] = hashlib.sha256(canonical_json(data)).hexdigest()
    path.write_bytes(canonical_json(data))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad_json", "not valid UTF-8 JSON"),
        ("bad_utf8", "not valid UTF-8 JSON"),
        ("not_object", "not a JSON object"),
        ("missing_field", "missing keys"),
        ("extra_field", "unexpected keys"),
        ("bad_op", "not one of"),
        ("bad_time", "has time"),
        ("bad_files", "not a sha256"),
        ("bad_body", "'body'"),
        ("bad_parent", "has parent"),
        ("version_mismatch", "file name says 2"),
        ("bool_version", "file name says 2"),
        ("not_canonical", "canonical"),
        ("bad_digest", "digest"),
        ("duplicate_key", "duplicate"),
        ("nan", "NaN"),
        ("bad_gc", "deleted_files"),
    ],
)
def test_malformed_entries_raise_integrity_error_naming_the_file(
    tmp_path: Path, case: str, message: str
) -> None:
    _chain(tmp_path, 3)
    journal = _journal(tmp_path)
    path = journal.entry_path(2)
    good = path.read_bytes()
    edits = {
        "bad_json": lambda: path.write_bytes(good[:-5]),
        "bad_utf8": lambda: path.write_bytes(b"\xff" + good),
        "not_object": lambda: path.write_bytes(b"[]\n"),
        "missing_field": lambda: _rewrite(path, lambda d: d.pop("time")),
        "extra_field": lambda: _rewrite(path, lambda d: d.update(extra=1)),
        "bad_op": lambda: _rewrite(path, lambda d: d.update(op="drop")),
        "bad_time": lambda: _rewrite(path, lambda d: d.update(time="yesterday")),
        "bad_files": lambda: _rewrite(path, lambda d: d.update(files={"a": 5})),
        "bad_body": lambda: _rewrite(path, lambda d: d.update(body=[])),
        "bad_parent": lambda: _rewrite(path, lambda d: d.update(parent=None)),
        "version_mismatch": lambda: _rewrite(path, lambda d: d.update(version=3)),
        "bool_version": lambda: _rewrite(path, lambda d: d.update(version=True)),
        "not_canonical": lambda: path.write_bytes(good.replace(b'":', b'": ', 1)),
        "bad_digest": lambda: path.write_bytes(good.replace(b'"i":1', b'"i":7')),
        "duplicate_key": lambda: path.write_bytes(good.replace(b'{"body"', b'{"body":{},"body"')),
        "nan": lambda: path.write_bytes(good.replace(b'"i":1', b'"i":NaN')),
        "bad_gc": lambda: _rewrite(path, lambda d: d.update(op="gc", body={"deleted_files": 3})),
    }
    edits[case]()
    with pytest.raises(IntegrityError, match=message) as info:
        journal.entries()
    assert str(path) in str(info.value)
    with pytest.raises(IntegrityError, match=message):
        journal.get(2)
    problems = journal.verify(tmp_path)
    assert problems and problems[0].path == "journal/00000002.json"


def test_numbering_gap_raises_naming_the_file_after_it(tmp_path: Path) -> None:
    _chain(tmp_path, 3)
    journal = _journal(tmp_path)
    journal.entry_path(2).unlink()
    for read in (journal.entries, journal.head):
        with pytest.raises(IntegrityError, match="version 2 is missing") as info:
            read()
        assert str(journal.entry_path(3)) in str(info.value)
    assert journal.verify(tmp_path)[0].path == "journal/00000003.json"


def test_first_entry_missing_and_malformed_names(tmp_path: Path) -> None:
    _chain(tmp_path, 2)
    journal = _journal(tmp_path)
    (journal.path / "000000003.json").write_bytes(b"{}")
    with pytest.raises(IntegrityError, match="malformed name"):
        journal.entries()
    (journal.path / "000000003.json").unlink()
    journal.entry_path(1).unlink()
    with pytest.raises(IntegrityError, match="version 1 is missing"):
        journal.entries()


def test_stray_temp_files_are_ignored(tmp_path: Path) -> None:
    entries = _chain(tmp_path, 2)
    journal = _journal(tmp_path)
    (journal.path / ".00000003.123.abcdef.tmp").write_bytes(b"half a wri")
    assert journal.entries() == entries
    assert journal.head() == entries[-1]
    assert journal.verify(tmp_path) == []


_json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_steps = st.lists(
    st.tuples(
        st.sampled_from(OPS),
        st.dictionaries(st.text(max_size=6), _json, max_size=3),
        st.lists(st.binary(max_size=16), max_size=2),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps, data=st.data())
def test_any_appends_verify_and_any_flipped_byte_is_caught(steps: Any, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        journal = _journal(root)
        head = None
        for step, (op, body, blobs) in enumerate(steps):
            files: dict[str, str] = {}
            for j, blob in enumerate(blobs):
                files.update(_add_file(root, f"data/é {step}/{j}.bin", blob))
            head = journal.append(op, body, files, parent=head)
        assert journal.verify(root) == []
        assert len(journal.entries()) == len(steps)

        version = data.draw(st.integers(1, len(steps)), label="version")
        path = journal.entry_path(version)
        raw = bytearray(path.read_bytes())
        index = data.draw(st.integers(0, len(raw) - 1), label="index")
        raw[index] ^= data.draw(st.integers(1, 255), label="mask")
        path.write_bytes(bytes(raw))

        try:
            journal.entries()
        except IntegrityError as e:
            assert _mentions(e, path, root)
        else:
            problems = journal.verify(root)
            assert any(_mentions(p, path, root) for p in problems)
        assert journal.verify(root)  # verify never raises and always notices


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_entry_bytes_raise_only_integrity_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        journal = _journal(root)
        journal.append("init", {}, {}, parent=None)
        journal.entry_path(2).write_bytes(content)
        with pytest.raises(IntegrityError, match=r"00000002\.json"):
            journal.entries()
        with pytest.raises(IntegrityError):
            journal.get(2)
        assert journal.verify(root)[0].path == "journal/00000002.json"


@settings(max_examples=100, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "version": _json | st.just(1),
            "op": _json | st.sampled_from(OPS),
            "time": _json | st.just("2026-02-30T00:00:00Z"),
            "parent": _json,
            "files": _json,
            "body": _json,
            "digest": _json | st.just("0" * 64),
        },
    )
)
def test_arbitrary_entry_fields_raise_only_integrity_error(fields: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        journal = _journal(root)
        journal.path.mkdir()
        journal.entry_path(1).write_bytes(canonical_json(fields))
        with pytest.raises(IntegrityError, match=r"00000001\.json"):
            journal.entries()


def test_deeply_nested_entry_is_an_integrity_error(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.path.mkdir()
    journal.entry_path(1).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(IntegrityError, match=r"00000001\.json"):
        journal.entries()


# --- the writer lock ---------------------------------------------------------------------


def test_lock_file_contents_and_release(tmp_path: Path) -> None:
    with WriterLock(tmp_path, operation="forget r1") as lock:
        assert lock.held
        record = json.loads((tmp_path / "lock").read_bytes())
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert record["operation"] == "forget r1"
        assert stat.S_IMODE((tmp_path / "lock").stat().st_mode) == 0o600
    assert not (tmp_path / "lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_second_acquirer_is_refused_with_the_pid(tmp_path: Path) -> None:
    with WriterLock(tmp_path, operation="retain"):
        with pytest.raises(LedgerLockedError) as info:
            WriterLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message
        assert "'retain'" in message and str(tmp_path / "lock") in message
        assert "remove" in message
        assert isinstance(info.value, BlockingIOError)
    assert not (tmp_path / "lock").exists()


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    record = {"pid": pid, "host": socket.gethostname(), "time": "2026-01-01T00:00:00Z",
              "operation": "forget"}
    (tmp_path / "lock").write_bytes(canonical_json(record))
    seen: list[str] = []
    with WriterLock(tmp_path, on_stale=seen.append):
        assert json.loads((tmp_path / "lock").read_bytes())["pid"] == os.getpid()
    assert len(seen) == 1 and f"dead pid {pid}" in seen[0]
    assert not (tmp_path / "lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_lock_of_a_live_or_foreign_holder_is_respected(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_bytes(canonical_json({"pid": _dead_pid(), "host": "elsewhere.example",
                                     "time": "t", "operation": "gc"}))
    with pytest.raises(LedgerLockedError, match=r"elsewhere\.example"):
        WriterLock(tmp_path).acquire()
    lock.write_bytes(canonical_json({"pid": os.getppid(), "host": socket.gethostname(),
                                     "time": "t", "operation": "gc"}))
    with pytest.raises(LedgerLockedError, match=f"pid {os.getppid()}"):
        WriterLock(tmp_path).acquire()
    assert lock.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b'{"pid": 0, "host": "h"}', b"[1]"])
def test_garbled_lock_is_treated_as_held(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "lock").write_bytes(content)
    with pytest.raises(LedgerLockedError, match="by hand"):
        WriterLock(tmp_path).acquire()
    assert (tmp_path / "lock").read_bytes() == content


def test_lock_is_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), WriterLock(tmp_path):
        1 / 0  # noqa: B018
    assert not (tmp_path / "lock").exists()
    with WriterLock(tmp_path):
        pass


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path)
    lock.acquire()
    (tmp_path / "lock").unlink()  # someone removed it by hand and another writer took it
    (tmp_path / "lock").write_bytes(b"someone else's")
    lock.release()
    lock.release()
    assert (tmp_path / "lock").read_bytes() == b"someone else's"


def _worker(root: str, worker: int, count: int) -> None:
    rng = random.Random(worker)
    journal = Journal(Path(root))
    stale_log = Path(root).parent / "stale.log"

    def on_stale(message: str) -> None:
        with open(stale_log, "a") as f:
            f.write(f"{worker}: {message}\n")

    done = 0
    while done < count:
        try:
            with WriterLock(Path(root), operation=f"worker {worker}", on_stale=on_stale):
                journal.append("forget", {"worker": worker, "i": done}, {}, parent=journal.head())
        except LedgerLockedError:
            time.sleep(rng.uniform(0.0005, 0.005))
            continue
        done += 1


def test_concurrent_writers_under_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "ledger"
    root.mkdir()
    dead = _dead_pid()
    record = {"pid": dead, "host": socket.gethostname(), "time": "t", "operation": "crashed"}
    (root / "lock").write_bytes(canonical_json(record))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    procs = [context.Process(target=_worker, args=(str(root), w, 10)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    journal = Journal(root)
    entries = journal.entries()
    assert len(entries) == 40
    assert sorted((e.body["worker"], e.body["i"]) for e in entries) == [
        (w, i) for w in range(4) for i in range(10)
    ]
    assert journal.verify(root) == []
    assert not (root / "lock").exists()
    assert sorted(p.name for p in root.iterdir()) == ["journal"]
    # exactly one writer took over the dead holder's lock
    stale = (tmp_path / "stale.log").read_text().splitlines()
    assert len(stale) == 1 and f"dead pid {dead}" in stale[0]


def test_adopt_copies_entries_byte_for_byte_and_only_in_chain_order(tmp_path: Path) -> None:
    made = _chain(tmp_path / "src", 3)
    source = _journal(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    mirror = _journal(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="records version 2 but its file name says 1"):
        mirror.adopt(source.raw(2), None)
    parent = None
    for entry in made:
        parent = mirror.adopt(source.raw(entry.version), parent)
        assert parent == entry
        assert mirror.raw(entry.version) == source.raw(entry.version)
    with pytest.raises(ConcurrentCommitError):
        mirror.adopt(source.raw(3), made[1])  # version 3 exists
    (tmp_path / "other").mkdir()
    other = _journal(tmp_path / "other")
    head = None
    for i in range(4):  # a chain with other bodies: its entry 4 names another entry 3
        head = other.append("init" if i == 0 else "forget", {"other": i}, {}, parent=head)
    with pytest.raises(IntegrityError, match="does not follow version 3"):
        mirror.adopt(other.raw(4), parent)
    assert [e.version for e in mirror.entries()] == [1, 2, 3]


# --- the fast parse of a sound entry -----------------------------------------------------


def _strict(raw: bytes, version: int, where: str) -> Entry | str:
    from kvw_ledger.entry import _parse_entry_strictly

    try:
        return _parse_entry_strictly(raw, version, where)
    except IntegrityError as e:
        return str(e)


def _parsed(raw: bytes, version: int, where: str) -> Entry | str:
    from kvw_ledger.journal import parse_entry

    try:
        return parse_entry(raw, version, where)
    except IntegrityError as e:
        return str(e)


def _resealed(content: dict[str, Any]) -> bytes:
    content = {k: v for k, v in content.items() if k != "digest"}
    content["digest"] = hashlib.sha256(canonical_json(content)).hexdigest()
    return canonical_json(content)


def test_the_fast_parse_accepts_and_rejects_exactly_what_the_strict_one_does(tmp_path: Path) -> None:
    from kvw_ledger.entry import _parse_sound_entry

    journal = _journal(tmp_path)
    init = journal.append("init", {}, _add_file(tmp_path, "zarr.json", b"{}"), parent=None)
    gc = journal.append(
        "gc", {"deleted_files": ["requests/a/x"], "note": {"digest": "0" * 64, "files": {}}},
        {"requests/b/c/d": "a" * 64}, parent=init,
    )
    raw = journal.raw(2)
    content = json.loads(raw)
    assert _parse_sound_entry(raw, 2) == gc == _strict(raw, 2, "w")
    variants = {
        "duplicate key": raw.replace(b'{"body":', b'{"op":"gc","body":', 1),
        "spaces": raw.replace(b'","', b'", "', 1),
        "a NaN": raw.replace(b'"note":{', b'"nan":NaN,"note":{', 1),
        "one byte": raw.replace(b'"gc"', b'"gC"', 1),
        "wrong version": raw,
    }
    for field, value in (
        ("files", {"requests/../x": "a" * 64}),
        ("files", {"requests//x": "a" * 64}),
        ("files", {"a\\b": "a" * 64}),
        ("files", {"": "a" * 64}),
        ("files", {"ok": "A" * 64}),
        ("files", {"ok": "a" * 63}),
        ("body", {"deleted_files": ["./x"]}),
        ("body", {"deleted_files": "x"}),
        ("time", "2026-02-30T00:00:00Z"),
        ("operator", ""),
    ):
        variants[f"{field}={value!r}"] = _resealed({**content, field: value})
    for why, altered in variants.items():
        version = 3 if why == "wrong version" else 2
        strict = _strict(altered, version, "w")
        assert isinstance(strict, str), why  # each variant is one the strict parser refuses
        assert _parse_sound_entry(altered, version) is None, why
        assert _parsed(altered, version, "w") == strict, why
    odd = _resealed({**content, "files": {"a/...": "b" * 64, "..a/b.": "c" * 64, "x\n": "d" * 64}})
    assert _parse_sound_entry(odd, 2) == _strict(odd, 2, "w") == _parsed(odd, 2, "w")
    assert isinstance(_parsed(odd, 2, "w"), Entry)
