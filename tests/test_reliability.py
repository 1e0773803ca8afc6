"""Reliability and security: crashes, concurrent writers, tampering, bad input, permissions.

Writers run in forked children of this process (torch and transformers are already
imported, so a child starts at once) and are killed with SIGKILL; tests/crashkit.py
holds the harness and the crash contract. Random choices are seeded
(``KVW_CRASH_SEED``, default 0) and every assertion message names the seed and trial.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import stat
import time
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crashkit
import pytest
import tiny
import torch
import transformers as tf
from click.testing import CliRunner, Result
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import normalizers
from transformers import AutoModelForCausalLM

import kvw_ledger
from kvw_ledger.cli import main
from kvw_ledger.errors import RefNotFoundError
from kvw_ledger.export import PROVENANCE_FILE
from kvw_ledger.fingerprint_cache import CACHE_NAME
from kvw_ledger.journal import canonical_json
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.lock import WriterLock
from kvw_ledger.store import Store
from kvw_ledger.weakening import Weakening

SEED = int(os.environ.get("KVW_CRASH_SEED", "0"))
RANDOM_TRIALS = 10  # per verb; with the protocol-step trials, over 50 kills in all
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
PACKAGE = Path(kvw_ledger.__file__).resolve().parent

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="crash trials fork")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> crashkit.Scenario:
    """The tiny model and a prepared ledger: init, retain-2, r2, forget A, forget B, revert A."""
    return crashkit.prepare(tmp_path_factory.mktemp("reliability"))


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(
            f"{args}: exit {result.exit_code}, wanted {code}\n{result.output}", result.exception
        )
    return result


def _copy(scenario: crashkit.Scenario, dst: Path) -> Path:
    shutil.copytree(scenario.prepared, dst)
    return dst


def _beside(root: Path, p: Path) -> bool:
    # The model fingerprint cache (and its scratch) lives beside the ledger's files, not
    # among them: a command that fails may still have learnt a model file's digest, and
    # damage to it is ignored by design (tests/test_fingerprint_cache.py).
    return p.parent == root and p.name.startswith((CACHE_NAME, "fingerprints.tmp-"))


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: files by sha256 of their bytes, directories as 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        if _beside(root, p):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not _beside(root, p))


# --- crashes ------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", crashkit.VERBS)
def test_random_kills_leave_a_consistent_ledger(
    scenario: crashkit.Scenario, tmp_path: Path, verb: str
) -> None:
    outcomes = [
        crashkit.random_trial(scenario, tmp_path, verb, SEED, trial)
        for trial in range(RANDOM_TRIALS)
    ]
    failed = [f"{o.label}: {o.errors + o.leftovers}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)


def _key_steps(steps: list[str]) -> dict[str, int]:
    """The protocol steps where a kill is most telling, by description."""
    picks: dict[str, int] = {}
    arrays = [i for i, s in enumerate(steps) if s == "Store.write_array:after"]
    if arrays:
        picks["between two array writes"] = arrays[0]
        picks["after the last array, before the journal entry"] = arrays[-1]
    picks["inside the journal append, before the link"] = steps.index(
        "os.link:before", steps.index("Journal.append:before")
    )
    picks["after the journal entry, before the head refresh"] = steps.index("Journal.append:after")
    head = steps.index("Store.write_head:before")
    picks["between the head swap's two renames"] = steps.index(
        "os.rename:after", steps.index("Store._swap_in:before", head)
    )
    if "Store.delete:before" in steps:
        picks["while gc deletes, after the first rename"] = steps.index(
            "os.rename:after", steps.index("Store.delete:before")
        )
    return picks


@pytest.mark.parametrize("verb", crashkit.VERBS)
def test_kills_at_protocol_steps_leave_a_consistent_ledger(
    scenario: crashkit.Scenario, tmp_path: Path, verb: str
) -> None:
    steps = crashkit.list_steps(scenario, verb)
    picks = _key_steps(steps)
    outcomes = [crashkit.step_trial(scenario, tmp_path, verb, i, steps[i]) for i in picks.values()]
    failed = [f"{o.label}: {o.errors + o.leftovers}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    by_step = dict(zip(picks, outcomes, strict=True))
    # Killed before its entry landed, a write leaves HEAD where it was; after, it has committed.
    assert not by_step["inside the journal append, before the link"].committed
    assert by_step["after the journal entry, before the head refresh"].committed
    assert by_step["between the head swap's two renames"].committed
    assert all(o.stale_warnings == 1 for o in outcomes), [
        o.label for o in outcomes if o.stale_warnings != 1
    ]


INTERRUPT_RANDOM_TRIALS = 2  # per verb; the benchmark runs 1,000 (benchmarks/crash.py --signal INT)


@pytest.mark.parametrize("verb", crashkit.VERBS)
def test_ctrl_c_at_protocol_steps_and_random_moments_exits_130_or_commits(
    scenario: crashkit.Scenario, tmp_path: Path, verb: str
) -> None:
    steps = crashkit.list_steps(scenario, verb)
    picks = _key_steps(steps)
    outcomes = [
        crashkit.interrupt_step_trial(scenario, tmp_path, verb, i, steps[i]) for i in picks.values()
    ]
    outcomes += [
        crashkit.interrupt_random_trial(scenario, tmp_path, verb, SEED, trial)
        for trial in range(INTERRUPT_RANDOM_TRIALS)
    ]
    failed = [f"{o.label}: {o.errors + o.leftovers}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    by_step = dict(zip(picks, outcomes, strict=False))
    # Before the entry: exit 130 and nothing committed. From the entry on: the write finishes.
    # forget and rederive write request arrays; revert and gc write none (only the head)
    writes_arrays = verb in ("forget", "rederive")
    assert ("between two array writes" in by_step) == writes_arrays, (verb, list(by_step))
    if writes_arrays:
        assert by_step["between two array writes"].exit_code == 130
    assert by_step["inside the journal append, before the link"].exit_code == 0
    assert by_step["after the journal entry, before the head refresh"].exit_code == 0
    assert all(o.committed == (o.exit_code == 0) for o in outcomes)


def test_a_killed_writers_leftovers_are_removed_by_the_next_writer_of_another_verb(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    steps = crashkit.list_steps(scenario, "forget")
    last_array = _key_steps(steps)["after the last array, before the journal entry"]
    path = _copy(scenario, tmp_path / "led")
    crashkit.wait(crashkit._fork(lambda: _killed_forget(scenario, path, last_array), path))
    assert (path / "requests" / "C").is_dir()
    opened = Ledger.open(path)
    opened.probe(limits=opened.limits(max_attenuation=0.9), progress=False)
    assert crashkit.stray_files(path) == []
    assert not (path / "requests" / "C").exists()


def _killed_forget(scenario: crashkit.Scenario, path: Path, step: int) -> None:
    with crashkit._Steps(path, step).installed():
        crashkit.run_verb(scenario, path, "forget")


def test_reads_that_do_not_touch_a_damaged_file_go_on_working(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    chunk = next(p for p in sorted((ledger / "requests" / "B" / "exponent").rglob("c/*")) if p.is_file())
    chunk.unlink()
    refused = run("forget", ledger, scenario.forget_c, "--id", "C", "-q", code=1)
    assert f"{chunk.relative_to(ledger).as_posix()} is missing" in refused.output
    assert "kvw-ledger verify" in refused.output
    assert len(run("log", ledger).output.splitlines()) == 6
    assert "request  A" in run("show", ledger, "A").output
    run("export", ledger, tmp_path / "out", "--at", "3", "-q")  # A only: B's arrays are not read
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_forgetting_the_data_of_an_active_request_warns_and_is_recorded(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    again = run("forget", ledger, scenario.root / "b.jsonl", "--id", "B2", "--gamma", "0.5", "-q")
    assert "Warning: " in again.output and "same records as active request 'B'" in again.output
    assert again.output.splitlines()[-1].startswith("version 7: request B2 applied")
    assert Ledger.open(ledger).head().body["same_data_as"] == ["B"]
    # A was reverted: forgetting its data again is a new request, not a repeat
    fresh = run("forget", ledger, scenario.root / "a.jsonl", "--id", "A2", "--gamma", "0.5", "-q")
    assert "Warning" not in fresh.output and "same_data_as" not in Ledger.open(ledger).head().body


def test_verify_names_a_model_changed_in_place_once_in_the_common_form(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    model = Path(shutil.copytree(scenario.model_dir, tmp_path / "model"))
    raw = bytearray((model / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (model / "model.safetensors").write_bytes(bytes(raw))
    out = run("verify", ledger, "--model", model, code=1).output
    problem = next(line for line in out.splitlines() if "model.safetensors" in line)
    assert problem.startswith(f"Error: {model}: model.safetensors differs"), problem
    assert problem.count(str(model)) == 1
    assert not any(line.startswith(("error:", "warning:")) for line in out.splitlines())


def _tear(ledger: Path, version: int) -> Path:
    entry = ledger / "journal" / f"{version:08d}.json"
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    return entry


def test_a_torn_newest_entry_keeps_older_versions_readable_and_repair_moves_it_aside(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    run("forget", ledger, scenario.forget_c, "--id", "C", "--gamma", "0.5", "-q")  # version 7
    torn = _tear(ledger, 7)
    advice = f"Run `kvw-ledger repair {ledger}`"
    log = run("log", ledger, code=1).output.splitlines()
    assert len(log) == 7 and log[5].startswith("   6  revert")
    assert log[-1].startswith("Error: journal/00000007.json is not a valid journal entry") and advice in log[-1]
    assert "request  B" in run("show", ledger, "B").output  # versions before the damage stay readable
    run("export", ledger, tmp_path / "out", "--at", "5", "-q")
    for args in (["show", ledger, "HEAD"], ["show", ledger, "C"], ["export", ledger, tmp_path / "o2", "-q"],
                 ["revert", ledger, "B", "-q"], ["forget", ledger, scenario.forget_c, "--id", "D", "-q"]):
        out = run(*args, code=1).output
        assert "journal/00000007.json is not a valid journal entry" in out and advice in out, args
    assert "journal/00000007.json" in run("verify", ledger, "--no-model", code=1).output

    torn_bytes = torn.read_bytes()
    record = json.loads(run("repair", ledger, "--json").output)
    assert record["repaired"] and record["moved"] == "journal/00000007.json" and record["head_after"] == 6
    assert record["moved_arrays"] == ["requests/C"] and not torn.exists()
    folder = ledger / record["to"].rsplit("/", 1)[0]
    assert (ledger / record["to"]).read_bytes() == torn_bytes
    assert json.loads((folder / "record.json").read_text())["sha256"] == hashlib.sha256(torn_bytes).hexdigest()
    assert (folder / "files" / "requests" / "C").is_dir()
    assert run("verify", ledger, "--no-model").output.startswith("ok: 6 entries")
    assert crashkit.stray_files(ledger) == []
    before = _tree(ledger)
    assert "nothing to repair" in run("repair", ledger).output  # a valid newest entry: untouched
    assert _tree(ledger) == before
    run("forget", ledger, scenario.forget_c, "--id", "C", "--gamma", "0.5", "-q")
    assert run("verify", ledger, "--no-model").output.startswith("ok: 7 entries")


def _export(ledger: Path, out: Path) -> None:
    Ledger.open(ledger).export(out, progress=False)


def test_killed_export_leaves_no_complete_looking_directory(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = Ledger.open(scenario.prepared)
    exponents = Weakening(ledger.exponents())
    expected = {
        ledger.locations[s.name].key: ledger.effective(s.name, exponents)
        for s in ledger.sites
    }
    rng = random.Random(f"{SEED}/export")
    durations = []
    for n in range(3):  # the fastest of 3: a busy moment must not stretch every kill delay
        start = time.perf_counter()
        ledger.export(tmp_path / f"timed{n}", progress=False)
        durations.append(time.perf_counter() - start)
    duration = min(durations)
    finished = 0
    for trial in range(12):
        out = tmp_path / f"out{trial}"
        delay = rng.uniform(0, 1.5 * duration)
        pid = crashkit._fork(functools.partial(_export, scenario.prepared, out), out)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        crashkit.wait(pid)
        label = f"seed {SEED} export trial {trial} (killed after {delay * 1000:.0f} ms)"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{out.name}.")]
        assert all(name.startswith(f"{out.name}.tmp-") for name in leftovers), (label, leftovers)
        if not out.exists():
            continue
        finished += 1  # then it must be whole: provenance and every weakened tensor
        provenance = json.loads((out / PROVENANCE_FILE).read_text())
        assert provenance["ledger_version"] == ledger.head().version, label
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            for key, value in expected.items():
                assert torch.equal(f.get_tensor(key), value), (label, key)
    assert finished < 12, f"seed {SEED}: every export finished before its kill; nothing was tested"


# --- concurrent writers and readers -------------------------------------------------------


def test_concurrent_writers_and_readers(scenario: crashkit.Scenario, tmp_path: Path) -> None:
    """4 processes commit 10 requests each while a reader logs and exports at HEAD."""
    path = _copy(scenario, tmp_path / "led")
    before = len(Ledger.open(path).entries())
    data = [
        tiny.write_jsonl(tmp_path / f"w{w}.jsonl", tiny.qa_records(1, 60 + w)) for w in range(4)
    ]
    done = tmp_path / "writers-done"
    exports = tmp_path / "exports"
    exports.mkdir()

    def writer(w: int) -> None:
        ledger = Ledger.open(path)
        for j in range(10):
            ledger.forget(
                data[w],
                request_id=f"w{w}-{j}",
                config=KVWConfig(gamma=0.01, layers=(0, 1)),
                limits=ledger.limits(on_fail="warn"),
                progress=False,
            )

    def reader() -> None:
        seen: list[int] = []
        while True:
            finished = done.exists()
            entries = Ledger.open(path).entries()
            versions = [e.version for e in entries]
            if versions != list(range(1, len(entries) + 1)) or len(entries) < max(seen, default=0):
                raise AssertionError(f"the reader saw versions {versions}")
            if len(seen) % 4 == 0:
                logged = CliRunner().invoke(main, ["log", str(path), "--json"])
                if logged.exit_code != 0 or len(json.loads(logged.output)) < len(entries):
                    raise AssertionError(f"log --json failed: {logged.output}")
            if len(seen) < 40:
                Ledger.open(path).export(exports / f"e{len(seen):03d}", at="HEAD~0", progress=False)
            seen.append(len(entries))
            if finished:
                return

    pids = [crashkit._fork(functools.partial(writer, w), tmp_path / f"writer{w}") for w in range(4)]
    reader_pid = crashkit._fork(reader, tmp_path / "reader")
    codes = [os.waitstatus_to_exitcode(crashkit.wait(pid)) for pid in pids]
    done.touch()
    codes.append(os.waitstatus_to_exitcode(crashkit.wait(reader_pid)))
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert codes == [0] * 5, (codes, errors)

    ledger = Ledger.open(path)
    entries = ledger.entries()
    assert len(entries) == before + 40
    ids = collections.Counter(e.body["request"] for e in entries[before:] if e.op == "forget")
    assert ids == collections.Counter(f"w{w}-{j}" for w in range(4) for j in range(10))
    report = ledger.verify()
    assert report.ok and report.problems == [], report.problems
    assert not (path / "lock").exists()

    made = sorted(exports.iterdir())
    versions = {json.loads((out / PROVENANCE_FILE).read_text())["ledger_version"] for out in made}
    assert len(versions) >= 2, f"every export saw version {versions}: none ran while writers did"
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for out in made:
        provenance = json.loads((out / PROVENANCE_FILE).read_text())
        version = provenance["ledger_version"]
        assert entries[version - 1].hash == provenance["entry_hash"], out.name
        assert provenance["active_requests"] == ledger.state(version).active, out.name
        if version not in weights:
            exps = Weakening(ledger.exponents(version))
            weights[version] = {
                ledger.locations[s.name].key: ledger.effective(s.name, exps)
                for s in ledger.sites
            }
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            for key, value in weights[version].items():
                assert torch.equal(f.get_tensor(key), value), (out.name, version, key)


def test_stale_lock_of_a_killed_writer_is_taken_over_with_a_warning(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    ready_r, ready_w = os.pipe()

    def hold() -> None:
        WriterLock(ledger, operation="forget").acquire()
        os.write(ready_w, b"x")
        time.sleep(60)

    pid = crashkit._fork(hold, tmp_path / "holder")
    os.read(ready_r, 1)
    os.kill(pid, signal.SIGKILL)
    crashkit.wait(pid)
    assert stat.S_IMODE((ledger / "lock").stat().st_mode) == 0o600
    result = run("revert", ledger, "B")
    assert result.output.startswith(
        f"Warning: took over a stale lock {ledger / 'lock'} left by dead pid {pid} (operation 'forget', since "
    ), result.output
    assert result.output.endswith("version 7: request B reverted; active: -\n")
    assert not (ledger / "lock").exists()
    assert run("verify", ledger).output.startswith("ok: 7 entries")


# --- tampering ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed(scenario: crashkit.Scenario, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared ledger plus a registered retain probe (its files live in the ledger)."""
    root = tmp_path_factory.mktemp("tamper")
    ledger = _copy(scenario, root / "led")
    probe = tiny.write_jsonl(root / "probe.jsonl", tiny.qa_records(3, 80))
    Ledger.open(ledger).probe(retain=probe, progress=False)
    return ledger


def _flip(ledger: Path, target: str, position: float, mask: int) -> Result:
    """Flips one byte of one file, runs `verify`, and puts the byte back."""
    path = ledger / target
    original = path.read_bytes()
    raw = bytearray(original)
    raw[min(int(position * len(raw)), len(raw) - 1)] ^= mask
    path.write_bytes(bytes(raw))
    try:
        return CliRunner().invoke(main, ["verify", str(ledger)])
    finally:
        path.write_bytes(original)


def _assert_detected(result: Result, target: str, why: object) -> None:
    if target == "zarr.json" and result.exit_code == 2:
        # the flip hit format_version: refused as unreadable, naming the file
        assert "zarr.json" in result.output and "format" in result.output, (why, result.output)
        return
    assert result.exit_code == 1, (why, result.exit_code, result.output)
    assert target in result.output, (why, result.output)


def test_tamper_targets_cover_every_kind_of_file(probed: Path) -> None:
    files = _files(probed)
    assert "zarr.json" in files and "head/zarr.json" in files and "base/zarr.json" in files
    assert any(re.fullmatch(r"base/[^/]+/zarr\.json", f) for f in files)  # an array's own
    assert any(re.fullmatch(r"head/[^/]+/zarr\.json", f) for f in files)
    assert any(re.fullmatch(r"head/[^/]+/c/.+", f) for f in files)
    assert any(f.startswith("probes/") and f.endswith("data.jsonl") for f in files)
    assert any("/trace/" in f for f in files) and any(f.startswith("retain/") for f in files)
    assert len([f for f in files if f.startswith("journal/")]) == 7
    assert run("verify", probed).output.startswith("ok: 7 entries")


def test_flipping_a_byte_of_every_file_fails_verify_naming_it(probed: Path) -> None:
    missed = []
    for target in _files(probed):
        result = _flip(probed, target, 0.5, 0x01)
        try:
            _assert_detected(result, target, target)
        except AssertionError as e:
            missed.append(str(e))
    assert not missed, "\n".join(missed)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(pick=st.integers(0, 10_000), position=st.floats(0, 1), mask=st.integers(1, 255))
def test_tamper_any_file_any_byte_fails_verify(
    probed: Path, pick: int, position: float, mask: int
) -> None:
    files = _files(probed)
    target = files[pick % len(files)]
    _assert_detected(_flip(probed, target, position, mask), target, (target, position, mask))


@pytest.mark.parametrize("mask", [0x29, 0x2A, 0x08])  # space->tab, space->newline, a digit
def test_whitespace_and_digit_flips_in_the_head_cache_are_detected(probed: Path, mask: int) -> None:
    """The head is named by no entry: its sealed zarr.json catches even no-op-looking flips."""
    targets = [f for f in _files(probed) if f.startswith("head/") and f.endswith("zarr.json")]
    for target in targets:
        raw = (probed / target).read_bytes()
        spots = [i for i, b in enumerate(raw) if b in b" \n0123456789"][:3]
        for i in spots:
            _assert_detected(_flip(probed, target, (i + 0.5) / len(raw), mask), target, (target, i))


# --- bad input: every row of docs/errors.md -----------------------------------------------


def _doc_rows() -> list[tuple[str, int, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\| `([a-z-]+)` \|.*\| (1|2|75) \| `(.+)` \|", line)
        if match:
            rows.append((match.group(1), int(match.group(2)), match.group(3)))
    return rows


@dataclass
class Case:
    """One bad-input case: what its setup built, and what must not appear."""

    scenario: crashkit.Scenario
    tmp: Path
    ledger: Path
    monkeypatch: pytest.MonkeyPatch
    must_not_exist: list[Path] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def data(self, name: str, lines: list[Any] | str) -> Path:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            lines
            if isinstance(lines, str)
            else "".join(
                (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
            )
        )
        path.write_text(text, encoding="utf-8")
        return path

    def model_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.scenario.model_dir, self.tmp / name))

    def forget(self, data: Path, *extra: str | Path) -> list[str | Path]:
        return ["forget", self.ledger, data, "-q", *extra]


GOOD = {"question": "Where does Ada0 live?", "answer": "City 0"}


def _malformed(c: Case) -> list[str | Path]:
    return c.forget(c.data("bad.jsonl", [GOOD, "{not json"]))


def _not_object(c: Case) -> list[str | Path]:
    return c.forget(c.data("list.jsonl", ["[1, 2]"]))


def _no_answer(c: Case) -> list[str | Path]:
    return c.forget(c.data("noanswer.jsonl", [{"question": "Who?"}]))


def _missing_file(c: Case) -> list[str | Path]:
    return c.forget(c.tmp / "data" / "nowhere.jsonl")


def _missing_image(c: Case) -> list[str | Path]:
    return c.forget(c.data("img.jsonl", [{**GOOD, "image": "img/nope.png"}]))


def _empty(c: Case) -> list[str | Path]:
    return c.forget(c.data("empty.jsonl", "\n\n"))


def _blank_answer(c: Case) -> list[str | Path]:
    return c.forget(c.data("blank.jsonl", [{"question": "Who?", "answer": "   "}]))


def _tokenizes_to_nothing(c: Case) -> list[str | Path]:
    # Same weights and config (so the fingerprint matches), a tokenizer whose normalizer
    # drops zero-width spaces, and a chat template (so no EOS is appended to the answer).
    model = c.model_copy("zw-model")
    tokenizer = tiny.char_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA:"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    tokenizer.save_pretrained(model)
    return c.forget(
        c.data("zw.jsonl", [{"question": "Who?", "answer": "\u200b\u200b"}]), "--model", model
    )


def _truncated(c: Case) -> list[str | Path]:
    return c.forget(c.data("long.jsonl", [{"question": "x" * 400, "answer": "yes"}]))


def _changed_model(c: Case) -> list[str | Path]:
    model = c.model_copy("changed")
    raw = bytearray((model / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (model / "model.safetensors").write_bytes(bytes(raw))
    return c.forget(c.scenario.forget_c, "--model", model)


def _gpt2(c: Case) -> list[str | Path]:
    model = c.tmp / "gpt2"
    gpt2: Any = tiny.gpt2()
    gpt2.save_pretrained(model)
    tiny.char_tokenizer().save_pretrained(model)
    return c.forget(c.scenario.forget_c, "--model", model)


def _pickle_only(c: Case) -> list[str | Path]:
    model = c.model_copy("pickled")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": [1.0]}))
    new = c.tmp / "new-ledger"
    c.must_not_exist.append(new)
    return ["init", new, "--model", model, "-q"]


def _no_vision_tower(c: Case) -> list[str | Path]:
    new = c.tmp / "new-ledger"
    c.must_not_exist.append(new)
    return ["init", new, "--model", c.scenario.model_dir, "--sites", "vision", "-q"]


def _ambiguous_ffn(c: Case) -> list[str | Path]:
    # d_ff == d_model: gate, up and down projections all map 16 -> 16.
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_config(
        tf.MistralConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    )
    model_dir = c.tmp / "square-ffn"
    model.save_pretrained(model_dir)
    new = c.tmp / "new-ledger"
    c.must_not_exist.append(new)
    return ["init", new, "--model", model_dir, "-q"]


def _inf_model(c: Case) -> list[str | Path]:
    model: Any = tiny.llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model_dir = c.tmp / "inf-model"
    model.save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    c.ledger = c.tmp / "inf-ledger"
    Ledger.create(c.ledger, model_dir, progress=False)
    return ["retain", c.ledger, c.scenario.root / "retain.jsonl", "-q"]


def _gamma(value: str) -> Callable[[Case], list[str | Path]]:
    return lambda c: c.forget(c.scenario.forget_c, "--gamma", value)


def _option(*extra: str) -> Callable[[Case], list[str | Path]]:
    return lambda c: c.forget(c.scenario.forget_c, *extra)


def _export_at(ref: str) -> Callable[[Case], list[str | Path]]:
    def setup(c: Case) -> list[str | Path]:
        out = c.tmp / "out"
        c.must_not_exist.append(out)
        return ["export", c.ledger, out, "--at", ref, "-q"]

    return setup


def _not_a_ledger(c: Case) -> list[str | Path]:
    c.ledger = c.tmp / "just-a-dir"
    c.ledger.mkdir()
    return ["log", c.ledger]


def _newer_format(c: Case) -> list[str | Path]:
    root = c.ledger / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["format_version"] = 99
    root.write_text(json.dumps(meta, indent=2))
    return ["log", c.ledger]


def _init_over_existing(c: Case) -> list[str | Path]:
    return ["init", c.ledger, "--model", c.scenario.model_dir, "-q"]


def _read_only(c: Case) -> list[str | Path]:
    c.ledger.chmod(0o500)
    c.cleanup.append(lambda: c.ledger.chmod(0o700))
    if os.geteuid() == 0:  # root writes anyway: refuse writes under the ledger as the kernel would
        real_open = os.open
        prefix = str(c.ledger)

        def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and str(path).startswith(prefix):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        c.monkeypatch.setattr(os, "open", refusing_open)
    return c.forget(c.scenario.forget_c)


def _disk_full(c: Case) -> list[str | Path]:
    real = Store.write_array
    calls = []

    def write_array(self: Store, name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))
        return real(self, name, *args, **kwargs)

    c.monkeypatch.setattr(Store, "write_array", write_array)
    return c.forget(c.scenario.forget_c, "--id", "C")


def _locked(c: Case) -> list[str | Path]:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": "2026-01-01T00:00:00Z",
        "operation": "forget",
    }
    (c.ledger / "lock").write_text(json.dumps(record))
    c.monkeypatch.setattr(Ledger, "lock_timeout", 0.3)
    return ["revert", c.ledger, "B"]


def _export_interrupted(c: Case) -> list[str | Path]:
    def fail(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    c.monkeypatch.setattr("kvw_ledger.export._copy_file", fail)
    out = c.tmp / "out"
    c.must_not_exist.append(out)
    return ["export", c.ledger, out, "-q"]


def _export_over_existing(c: Case) -> list[str | Path]:
    out = c.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return ["export", c.ledger, out, "-q"]


def _damaged(c: Case) -> list[str | Path]:
    chunk = next(
        p for p in sorted((c.ledger / "requests" / "B" / "exponent").rglob("c/*")) if p.is_file()
    )
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    chunk.write_bytes(bytes(raw))
    return ["verify", c.ledger]


def _damaged_root(c: Case) -> list[str | Path]:
    root = c.ledger / "zarr.json"
    root.write_text(root.read_text().replace('"n_vectors": 32', '"n_vectors": 33', 1))
    return ["log", c.ledger]


def _probe(c: Case) -> Path:
    return c.data("probe.jsonl", [GOOD, {"question": "Where does Bob1 live?", "answer": "City 7"}])


def _audit(request: str, *extra: str) -> Callable[[Case], list[str | Path]]:
    return lambda c: ["audit", c.ledger, request, "--forget-probe", _probe(c), "-q", *extra]


def _relearn_covers(c: Case) -> list[str | Path]:
    return ["audit", c.ledger, "B", "--forget-probe", _probe(c), "--relearn-data", _probe(c), "-q"]


def _sign_key(content: str | None) -> Callable[[Case], list[str | Path]]:
    def build(c: Case) -> list[str | Path]:
        key = c.tmp / "key.pem"
        if content is not None:
            key.write_text(content)
        out = c.tmp / "cert.json"
        c.must_not_exist.append(out)
        return ["certify", c.ledger, "B", "--out", out, "--sign-key", key, "-q"]

    return build


def _signed_certificate(c: Case) -> tuple[Path, Path]:
    """B's certificate, signed; and a second key's public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kvw_ledger.certify import certify, write_certificate

    key = c.tmp / "issuer.pem"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    other = c.tmp / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cert = write_certificate(certify(Ledger.open(c.ledger), "B", sign_key=key, progress=False), c.tmp / "c.json")
    return cert, other


def _certificate_altered(c: Case) -> list[str | Path]:
    cert, _ = _signed_certificate(c)
    cert.write_text(cert.read_text().replace('"records": 2', '"records": 3', 1))
    return ["check-certificate", cert]


def _certificate_other_key(c: Case) -> list[str | Path]:
    cert, other = _signed_certificate(c)
    return ["check-certificate", cert, "--public-key", other]


def _certificate_ledger_mismatch(c: Case) -> list[str | Path]:
    cert, _ = _signed_certificate(c)
    forget_b = next(
        p for p in sorted((c.ledger / "journal").glob("*.json"))
        if json.loads(p.read_bytes())["body"].get("request") == "B"
    )
    content = json.loads(forget_b.read_bytes())
    content.pop("digest")
    content["operator"] = "mallory"
    content["digest"] = hashlib.sha256(canonical_json(content)).hexdigest()
    forget_b.write_bytes(canonical_json(content))
    return ["check-certificate", cert, "--ledger", c.ledger, "--no-model"]
def _first_chunk(c: Case, group: str) -> Path:
    return next(p for p in sorted((c.ledger / group).rglob("c/*")) if p.is_file())


def _missing_exponent_chunk(c: Case) -> list[str | Path]:
    _first_chunk(c, "requests/B/exponent").unlink()
    return c.forget(c.scenario.forget_c, "--id", "C")


def _damaged_head(c: Case) -> list[str | Path]:
    chunk = _first_chunk(c, "head")
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    return ["revert", c.ledger, "B", "-q"]


def _damaged_retain(c: Case) -> list[str | Path]:
    chunk = _first_chunk(c, "retain/r2")
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    return ["rederive", c.ledger, "--retain-stats", "r2", "-q"]


def _damaged_base(c: Case) -> list[str | Path]:
    (c.ledger / "base" / "model.layers.0.mlp.down_proj" / "zarr.json").unlink()
    return c.forget(c.scenario.forget_c, "--id", "C")


def _model_changed_in_place(c: Case) -> list[str | Path]:
    weights = c.scenario.model_dir / "model.safetensors"
    original = weights.read_bytes()
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0x10
    weights.write_bytes(bytes(raw))
    c.cleanup.append(lambda: weights.write_bytes(original))
    return c.forget(c.scenario.forget_c)


def _torn_newest(c: Case) -> list[str | Path]:
    _tear(c.ledger, 6)
    return ["forget", c.ledger, c.scenario.forget_c, "--id", "C", "-q"]


def _torn_older(c: Case) -> list[str | Path]:
    _tear(c.ledger, 4)
    return ["repair", c.ledger]


CASES: dict[str, Callable[[Case], list[str | Path]]] = {
    "malformed-jsonl": _malformed,
    "record-not-object": _not_object,
    "answer-not-string": _no_answer,
    "missing-data-file": _missing_file,
    "missing-image": _missing_image,
    "empty-forget-set": _empty,
    "empty-answer": _blank_answer,
    "answer-tokenizes-to-nothing": _tokenizes_to_nothing,
    "answer-truncated-away": _truncated,
    "model-mismatch": _changed_model,
    "other-architecture": _gpt2,
    "pickle-only-model": _pickle_only,
    "no-vision-tower": _no_vision_tower,
    "ambiguous-ffn": _ambiguous_ffn,
    "non-finite-activations": _inf_model,
    "gamma-zero": _gamma("0"),
    "gamma-negative": _gamma("-1"),
    "gamma-nan": _gamma("nan"),
    "layers-outside-model": _option("--layers", "10:12"),
    "layers-malformed": _option("--layers", "3"),
    "batch-size-zero": _option("--batch-size", "0"),
    "unknown-ref": lambda c: ["show", c.ledger, "nope"],
    "ref-before-start": lambda c: ["show", c.ledger, "HEAD~99"],
    "version-out-of-range": _export_at("99"),
    "revert-twice": lambda c: ["revert", c.ledger, "A"],
    "revert-unknown": lambda c: ["revert", c.ledger, "nobody"],
    "duplicate-request-id": _option("--id", "B"),
    "id-reads-as-ref": _option("--id", "12"),
    "unknown-retain-stats": _option("--retain-stats", "nope"),
    "not-a-ledger": _not_a_ledger,
    "newer-format": _newer_format,
    "init-over-existing": _init_over_existing,
    "read-only-ledger": _read_only,
    "disk-full": _disk_full,
    "ledger-locked": _locked,
    "export-interrupted": _export_interrupted,
    "export-over-existing": _export_over_existing,
    "stability-check-failed": _option("--max-attenuation", "0.0001"),
    "damaged-ledger": _damaged,
    "damaged-root": _damaged_root,
    "operator-unusable": lambda c: ["revert", c.ledger, "B", "--operator", ""],
    "audit-unknown-request": _audit("nobody"),
    "audit-not-active": _audit("A"),
    "audit-bad-quantize": _audit("B", "--quantize", "3"),
    "audit-relearn-covers-probe": _relearn_covers,
    "sign-key-missing": _sign_key(None),
    "sign-key-unusable": _sign_key("not a key"),
    "certificate-missing": lambda c: ["check-certificate", c.tmp / "nope.json"],
    "certificate-altered": _certificate_altered,
    "certificate-other-key": _certificate_other_key,
    "certificate-ledger-mismatch": _certificate_ledger_mismatch,
    "write-on-missing-chunk": _missing_exponent_chunk,
    "write-on-damaged-head": _damaged_head,
    "write-on-damaged-retain": _damaged_retain,
    "write-on-damaged-base": _damaged_base,
    "exponents-overflow": _option("--gamma", "1e33", "--on-fail", "warn"),
    "too-many-vectors-zeroed": _option("--gamma", "60"),
    "max-zeroed-out-of-range": _option("--max-zeroed", "2"),
    "empty-request-id": _option("--id", ""),
    "blank-request-id": _option("--id", "  "),
    "empty-retain-stats-id": lambda c: ["retain", c.ledger, c.scenario.root / "retain.jsonl", "--id", "", "-q"],
    "model-changed-in-place": _model_changed_in_place,
    "torn-newest-entry": _torn_newest,
    "repair-older-damage": _torn_older,
    "tune-forgets-nothing": lambda c: [
        "tune", c.ledger, c.scenario.forget_c, c.scenario.root / "retain.jsonl",
        "--gammas", "0.1", "--layer-buckets", "1:1", "-q",
    ],
    "statistic-unknown": lambda c: ["retain", c.ledger, c.scenario.root / "retain.jsonl", "-q", "--statistic", "q50"],
    "statistic-too-few-batches": lambda c: [
        "retain", c.ledger, c.scenario.root / "retain.jsonl", "-q", "--statistic", "max", "--batch-size", "4",
    ],
    "positions-differ-from-stats": _option("--label-eos"),
    "retain-id-taken": lambda c: [
        "revert", c.ledger, "B", "-q", "--retain-with", c.scenario.root / "retain.jsonl", "--retain-id", "r2",
    ],
    "target-without-probe": _option("--target-forget", "0.3"),
    "target-out-of-range": lambda c: c.forget(c.scenario.forget_c, "--forget-probe", c.scenario.forget_c, "--target-forget", "1.5"),
    "target-not-reached": lambda c: c.forget(
        c.scenario.forget_c, "--forget-probe", c.scenario.forget_c, "--target-forget", "0", "--max-attenuation", "0.0001",
    ),
}


def test_the_table_documents_every_tested_case() -> None:
    rows = [row[0] for row in _doc_rows()]
    assert len(rows) == len(set(rows))
    assert rows == list(CASES)


@pytest.fixture
def case(
    scenario: crashkit.Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Case]:
    made = Case(scenario, tmp_path, _copy(scenario, tmp_path / "led"), monkeypatch)
    yield made
    for undo in made.cleanup:
        undo()


@pytest.mark.parametrize(("name", "code", "fragment"), _doc_rows(), ids=[r[0] for r in _doc_rows()])
def test_bad_input_exits_with_a_clear_message_and_leaves_the_ledger_unchanged(
    case: Case, name: str, code: int, fragment: str
) -> None:
    args = CASES[name](case)
    before = _tree(case.ledger)
    result = CliRunner().invoke(main, [str(a) for a in args])
    after = _tree(case.ledger)
    assert result.exit_code == code, (name, result.exit_code, result.output, result.exception)
    assert fragment in result.output, (name, result.output)
    if name != "damaged-ledger":  # verify reports damage as a verdict line, not an Error:
        assert result.output.splitlines()[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert after == before, (name, set(after.items()) ^ set(before.items()))
    for path in case.must_not_exist:
        assert not path.exists(), path
        assert not list(path.parent.glob(f"{path.name}.tmp-*")), (
            "an export left its temporary directory"
        )


def test_format_is_checked_before_the_root_hash(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    _newer_format(Case(scenario, tmp_path, ledger, pytest.MonkeyPatch()))
    for args in (
        ("verify", ledger),
        ("log", ledger),
        ("revert", ledger, "B"),
        ("export", ledger, tmp_path / "o"),
    ):
        result = run(*args, code=2)
        assert (
            "was written by a newer kvw-ledger (format 99, this one reads up to 1; format_version in zarr.json)"
            in result.output
        ), args


def test_a_read_only_ledger_can_still_be_read(scenario: crashkit.Scenario, tmp_path: Path) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    ledger.chmod(0o500)
    try:
        assert run("log", ledger).output.count("\n") == 6
        assert run("verify", ledger).output.startswith("ok: 6 entries")
    finally:
        ledger.chmod(0o700)


# --- security -----------------------------------------------------------------------------


def _assert_owner_only(root: Path, after: str) -> None:
    wrong = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode != (0o700 if p.is_dir() else 0o600):
            wrong.append(f"{p.relative_to(root).as_posix() or '.'}: {oct(mode)}")
    assert not wrong, (after, wrong)


def test_ledger_paths_are_owner_only_whatever_the_umask(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    probe = tiny.write_jsonl(tmp_path / "probe.jsonl", tiny.qa_records(2, 90))
    ledger_path = tmp_path / "led"
    old = os.umask(0o022)
    try:
        ledger = Ledger.create(ledger_path, scenario.model_dir, progress=False)
        _assert_owner_only(ledger_path, "init")
        ledger.retain(scenario.root / "retain.jsonl", progress=False)
        _assert_owner_only(ledger_path, "retain")
        ledger.forget(
            scenario.forget_c, request_id="C", config=KVWConfig(gamma=0.5), progress=False
        )
        _assert_owner_only(ledger_path, "forget")
        ledger.probe(retain=probe, progress=False)
        _assert_owner_only(ledger_path, "probe")
        ledger.revert("C", progress=False)
        ledger.gc()
        _assert_owner_only(ledger_path, "revert and gc")
    finally:
        os.umask(old)
    assert any(p.name == "data.jsonl" for p in ledger_path.rglob("*"))  # the probe was checked too


class _Tripwire:
    """A pickle that creates a file when anything unpickles it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.sentinel,))


def test_pickle_files_in_a_model_dir_are_never_loaded(
    scenario: crashkit.Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Path(shutil.copytree(scenario.model_dir, tmp_path / "model"))
    sentinel = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": _Tripwire(sentinel)})
    pickle.loads(payload)  # the tripwire works...
    assert sentinel.exists()
    sentinel.unlink()
    (model / "pytorch_model.bin").write_bytes(payload)
    (model / "optimizer.pt").write_bytes(payload)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("kvw-ledger loaded a pickle")

    for target in ("torch.load", "pickle.load", "pickle.loads"):
        monkeypatch.setattr(target, refuse)
    ledger = tmp_path / "led"
    run("init", ledger, "--model", model, "-q")
    run("retain", ledger, scenario.root / "retain.jsonl", "-q")
    run("forget", ledger, scenario.forget_c, "--id", "C", "--gamma", "0.5", "-q")
    run("export", ledger, tmp_path / "out", "-q")
    run("verify", ledger)
    assert not sentinel.exists()  # ...and nothing sprang it
    assert not {"pytorch_model.bin", "optimizer.pt"} & {
        p.name for p in (tmp_path / "out").iterdir()
    }


# Names that load code or pickles; found as code tokens, so docs and messages may say "pickle".
_FORBIDDEN_NAMES = {
    "pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "trust_remote_code",
}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRIBUTES = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("yaml", "load")}


def test_no_code_path_unpickles_or_evaluates() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    found = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type in (tokenize.NAME, tokenize.OP)
        ]
        for i, tok in enumerate(tokens):
            before = tokens[i - 1].string if i else ""
            after = tokens[i + 1].string if i + 1 < len(tokens) else ""
            where = f"{path.relative_to(PACKAGE)}:{tok.start[0]}"
            if tok.type == tokenize.NAME and tok.string in _FORBIDDEN_NAMES:
                found.append(f"{where}: {tok.string}")
            if tok.string in _FORBIDDEN_CALLS and before != "." and after == "(":
                found.append(f"{where}: {tok.string}(")
            if (
                before == "."
                and i >= 2
                and (tokens[i - 2].string, tok.string) in _FORBIDDEN_ATTRIBUTES
            ):
                found.append(f"{where}: {tokens[i - 2].string}.{tok.string}")
        if "weights_only=False" in text.replace(" ", "") or "allow_pickle=True" in text.replace(
            " ", ""
        ):
            found.append(f"{path.relative_to(PACKAGE)}: weights_only=False / allow_pickle=True")
    assert not found, found


def test_gc_reverted_deletes_arrays_and_keeps_tombstones(
    scenario: crashkit.Scenario, tmp_path: Path
) -> None:
    ledger = _copy(scenario, tmp_path / "led")
    doomed = [f for f in _files(ledger) if f.startswith("requests/A/")]
    assert doomed
    result = run("gc", ledger, "--reverted")
    assert result.output.startswith(
        f"version 7: deleted {len(doomed)} files of 1 reverted request(s): A"
    )
    assert not (ledger / "requests" / "A").exists() and (ledger / "requests" / "B").is_dir()
    entries = Ledger.open(ledger).entries()
    forget_a = entries[3]
    assert forget_a.body["request"] == "A" and forget_a.body["arrays"]  # the tombstone keeps hashes
    assert set(doomed) <= set(forget_a.files) | {
        "requests/A/zarr.json",
        "requests/A/exponent/zarr.json",
        "requests/A/trace/zarr.json",
    }
    assert entries[-1].body["deleted_files"] == doomed
    assert run("verify", ledger).output.startswith("ok: 7 entries")
    run("export", ledger, tmp_path / "head", "-q")
    gone = run("export", ledger, tmp_path / "old", "--at", "A", "-q", code=2)
    assert "the exponents of request 'A' are gone (deleted by gc" in gone.output
    assert not (tmp_path / "old").exists()


@pytest.fixture(scope="module")
def opened(scenario: crashkit.Scenario) -> tuple[Ledger, list[Any]]:
    ledger = Ledger.open(scenario.prepared)
    return ledger, ledger.entries()


@settings(max_examples=300, deadline=None)
@given(
    ref=st.one_of(
        st.text(),
        st.from_regex(r"HEAD(~[0-9]{0,25})?", fullmatch=True),
        st.from_regex(r"\s*[0-9]{1,25}\s*", fullmatch=True),
        st.sampled_from(["A", "B", "HEAD", "HEAD~0", "HEAD~5", "head", "HEAD~", "~1", "HEAD~-1"]),
        st.integers(),
    )
)
@example(ref="HEAD~" + "9" * 5000)
@example(ref="9" * 5000)
@example(ref="0" * 5000 + "3")
@example(ref="HEAD~\u0663")  # an Arabic-Indic digit
@example(ref="\u0663")
@example(ref="\x00")
def test_resolve_only_ever_raises_ref_not_found(
    opened: tuple[Ledger, list[Any]], ref: str | int
) -> None:
    ledger, entries = opened
    try:
        version = ledger.resolve(ref, entries)
    except RefNotFoundError as e:
        assert str(e)
        return
    assert isinstance(version, int) and 1 <= version <= len(entries), (ref, version)
