"""Crash trials: a writer runs in a forked child and is killed with SIGKILL mid-write.

The parent has already imported torch and transformers and built a tiny model and a
prepared ledger, so each child starts in microseconds (``os.fork``) and runs one
Ledger verb. A trial is killed either at a random moment (``random_trial``) or at
one exact step of the write protocol (``step_trial``): before or after any array
write, group creation, rename, link, journal append, head swap or delete. After the
kill, :func:`check_after_crash` holds the ledger to the crash contract:

- it opens, and ``verify`` finds no error (leftover arrays are warnings);
- HEAD is the version before the command or the one the command commits;
- the next command succeeds (the same verb again if it did not commit, else a
  revert or gc), taking over the dead writer's lock, and the ledger verifies clean.

The same trials can send SIGINT (Ctrl-C) instead (``interrupt_step_trial``,
``interrupt_random_trial``): the child then runs the verb through the CLI, and
:func:`check_after_interrupt` holds it to the interrupt contract: exit 130 and
nothing committed, or exit 0 and committed; and after the next command (another
verb) no file is left that no entry names.

Used by tests/test_reliability.py and benchmarks/crash.py. POSIX only (fork).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiny
import torch
from tqdm import std as tqdm_std

from kvw_ledger import cli, sums
from kvw_ledger import journal as journal_module
from kvw_ledger import lock as lock_module
from kvw_ledger import store as store_module
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust tokenizer warns after fork

VERBS = ("forget", "revert", "rederive", "gc")
CHILD_TIMEOUT = 120.0  # seconds a child may run; each verb takes well under one
# The op each verb commits.
COMMITS = {"forget": "forget", "revert": "revert", "rederive": "rederive", "gc": "gc"}

# The steps a child can be killed at: (object, attribute) pairs wrapped in the child.
_METHODS = [
    (store_module.Store, "write_array"),
    (store_module.Store, "_ensure_groups"),
    (store_module.Store, "_swap_in"),
    (store_module.Store, "delete"),
    (store_module.Store, "write_head"),
    (journal_module.Journal, "append"),
    (lock_module.WriterLock, "acquire"),
    (lock_module.WriterLock, "release"),
]
_OS_CALLS = ("rename", "link", "unlink")  # counted only for paths inside the ledger


@dataclass(frozen=True)
class Scenario:
    """A prepared ledger and what the verbs need.

    ``prepared`` holds: init, retain stats ``retain-2`` and ``r2``, forget A, forget B
    (both with traces), revert A. So forget (request C), revert (B), rederive (B with
    r2) and gc (A's arrays) each have something to do.
    """

    root: Path
    model_dir: Path
    prepared: Path
    forget_c: Path
    durations: dict[str, float] = field(default_factory=dict)  # verb -> seconds, in a child


@dataclass
class Outcome:
    """What one trial found."""

    label: str  # verb, seed and trial (or step), for messages
    committed: bool  # whether the killed command's entry landed
    exit_code: int | None  # the child's, when it finished before the kill
    errors: list[str] = field(default_factory=list)  # broken promises: a corrupt ledger
    leftovers: list[str] = field(
        default_factory=list
    )  # warnings still there after the next command
    stale_warnings: int = 0  # stale-lock takeovers the next command reported

    @property
    def ok(self) -> bool:
        """No broken promise, and nothing of the crash left once the next command ran."""
        return not self.errors and not self.leftovers


def prepare(root: Path) -> Scenario:
    """Builds the tiny model, the data and the prepared ledger under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    model: Any = tiny.llama()
    model.save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget_a = tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(2, 0))
    forget_b = tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 10))
    forget_c = tiny.write_jsonl(root / "c.jsonl", tiny.qa_records(2, 20))
    prepared = root / "prepared"
    ledger = Ledger.create(prepared, model_dir, progress=False)
    ledger.retain(retain, progress=False)
    ledger.retain(retain, stats_id="r2", progress=False)
    ledger.forget(forget_a, request_id="A", config=KVWConfig(gamma=0.5), progress=False)
    ledger.forget(forget_b, request_id="B", config=KVWConfig(gamma=0.5), progress=False)
    ledger.revert("A", progress=False)
    scenario = Scenario(root, model_dir, prepared, forget_c)
    for verb in VERBS:  # warm every code path in the parent, then time each verb in a child
        work = root / f"warm-{verb}"
        shutil.copytree(prepared, work)
        run_verb(scenario, work, verb)
        shutil.rmtree(work)
        # the fastest of 3: a busy machine must not stretch every later kill delay
        scenario.durations[verb] = min(_time_in_child(scenario, verb) for _ in range(3))
    return scenario


def run_verb(scenario: Scenario, path: Path, verb: str) -> None:
    """Runs one verb on the ledger at ``path`` (what the child does)."""
    ledger = Ledger.open(path)
    if verb == "forget":
        ledger.forget(
            scenario.forget_c, request_id="C", config=KVWConfig(gamma=0.5), progress=False
        )
    elif verb == "revert":
        ledger.revert("B", progress=False)
    elif verb == "rederive":
        ledger.rederive("r2", progress=False)
    elif verb == "gc":
        ledger.gc()
    else:
        raise ValueError(f"unknown verb {verb!r}")


def _time_in_child(scenario: Scenario, verb: str) -> float:
    work = scenario.root / f"time-{verb}"
    shutil.copytree(scenario.prepared, work)
    start = time.perf_counter()
    pid = _fork(lambda: run_verb(scenario, work, verb), work)
    status = wait(pid)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{verb} failed in a child: {(work.parent / (work.name + '.err')).read_text()}"
        )
    shutil.rmtree(work)
    return elapsed


def _fork(body: Callable[[], int | None], path: Path, interruptible: bool = False) -> int:
    """Forks a child that runs ``body`` and exits with the code it returns (0 for None), or 1
    writing its traceback beside ``path``. An ``interruptible`` child turns SIGINT into
    KeyboardInterrupt, as a command line process does, and exits 130 on one that escapes."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler if interruptible else signal.SIG_DFL)
        # The parent's OpenMP threads do not exist here: a parallel region would wait
        # for them forever. One thread runs every torch op inline.
        torch.set_num_threads(1)
        _private_tqdm_lock()
        code = body() or 0
    except KeyboardInterrupt:
        code = cli.INTERRUPTED if interruptible else 1  # as Python exits on an uncaught one
        if not interruptible:
            with contextlib.suppress(BaseException):
                (path.parent / (path.name + ".err")).write_text(traceback.format_exc())
    except BaseException:
        with contextlib.suppress(BaseException):
            (path.parent / (path.name + ".err")).write_text(traceback.format_exc())
    finally:
        os._exit(code)


def _private_tqdm_lock() -> None:
    """Gives this (forked) child a tqdm write lock of its own.

    tqdm's default lock includes a multiprocessing lock shared with the parent
    across fork; a child SIGKILLed while creating a progress bar would leave it
    held, and the parent's next bar would wait for it forever.
    """
    classes = [tqdm_std.tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_lock" in vars(cls) or cls is tqdm_std.tqdm:
            cls._lock = threading.RLock()  # type: ignore[attr-defined]


def wait(pid: int, timeout: float = CHILD_TIMEOUT) -> int:
    """Reaps child ``pid`` and returns its wait status; a child still running after
    ``timeout`` seconds is killed and the wait fails, so a hung child fails its test
    instead of hanging the suite."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} still running after {timeout:.0f} s; killed it")
        time.sleep(0.005)


# --- killing at an exact step -------------------------------------------------------------


class _Steps:
    """Counts the protocol steps a child takes; sends itself ``signum`` (SIGKILL, or SIGINT)
    at step ``kill_at``."""

    def __init__(self, ledger: Path, kill_at: int | None, signum: int = signal.SIGKILL) -> None:
        self.ledger = str(ledger)
        self.kill_at = kill_at
        self.signum = signum
        self.names: list[str] = []

    def step(self, name: str) -> None:
        self.names.append(name)
        if self.kill_at is not None and len(self.names) - 1 == self.kill_at:
            os.kill(os.getpid(), self.signum)

    def wrap(
        self, name: str, fn: Callable[..., Any], only_ledger_paths: bool = False
    ) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counted = not only_ledger_paths or any(str(a).startswith(self.ledger) for a in args[:2])
            if counted:
                self.step(f"{name}:before")
            result = fn(*args, **kwargs)
            if counted:
                self.step(f"{name}:after")
            return result

        return wrapped

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wraps the protocol's steps (in the child only; the parent never calls this)."""
        originals: list[tuple[Any, str, Any]] = []
        for owner, attr in _METHODS:
            originals.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, self.wrap(f"{owner.__name__}.{attr}", getattr(owner, attr)))
        for attr in _OS_CALLS:
            originals.append((os, attr, getattr(os, attr)))
            setattr(os, attr, self.wrap(f"os.{attr}", getattr(os, attr), only_ledger_paths=True))
        try:
            yield
        finally:
            for owner, attr, original in reversed(originals):
                setattr(owner, attr, original)


def list_steps(scenario: Scenario, verb: str) -> list[str]:
    """The steps ``verb`` takes on the prepared ledger, in order (run once in a child)."""
    work = scenario.root / f"steps-{verb}"
    shutil.copytree(scenario.prepared, work)
    out = scenario.root / f"steps-{verb}.json"

    def body() -> None:
        steps = _Steps(work, None)
        with steps.installed():
            run_verb(scenario, work, verb)
        out.write_text(json.dumps(steps.names))

    pid = _fork(body, work)
    status = wait(pid)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{verb} failed in a child: {(work.parent / (work.name + '.err')).read_text()}"
        )
    shutil.rmtree(work)
    return list(json.loads(out.read_text()))


def step_trial(scenario: Scenario, workdir: Path, verb: str, index: int, step: str) -> Outcome:
    """Kills the child at protocol step ``index`` (named ``step``) of ``verb``, then checks."""
    path = workdir / f"{verb}-step{index}"
    shutil.copytree(scenario.prepared, path)
    before = Ledger.open(path).head().version

    def body() -> None:
        with _Steps(path, index).installed():
            run_verb(scenario, path, verb)

    pid = _fork(body, path)
    status = wait(pid)
    label = f"{verb} killed at step {index} ({step})"
    return check_after_crash(scenario, path, verb, before, label, _exit_code(status))


# --- killing at a random moment -----------------------------------------------------------


def random_trial(scenario: Scenario, workdir: Path, verb: str, seed: int, trial: int) -> Outcome:
    """Kills the child after a seeded random delay in [0, 1.2 x the verb's duration]."""
    rng = random.Random(f"{seed}/{verb}/{trial}")
    delay = rng.uniform(0.0, 1.2 * scenario.durations[verb])
    path = workdir / f"{verb}-{trial}"
    shutil.copytree(scenario.prepared, path)
    before = Ledger.open(path).head().version
    pid = _fork(lambda: run_verb(scenario, path, verb), path)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    status = wait(pid)  # reaped: from now on its pid is gone
    label = f"seed {seed} {verb} trial {trial} (killed after {delay * 1000:.0f} ms)"
    return check_after_crash(scenario, path, verb, before, label, _exit_code(status))


def _exit_code(status: int) -> int | None:
    return None if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)


# --- Ctrl-C: SIGINT at an exact step or a random moment -------------------------------------


def cli_args(scenario: Scenario, path: Path, verb: str) -> list[str]:
    """The command line that does what :func:`run_verb` does."""
    if verb == "forget":
        return ["forget", str(path), str(scenario.forget_c), "--id", "C", "--gamma", "0.5", "-q"]
    if verb == "revert":
        return ["revert", str(path), "B", "-q"]
    if verb == "rederive":
        return ["rederive", str(path), "--retain-stats", "r2", "-q"]
    if verb == "gc":
        return ["gc", str(path), "--reverted"]
    raise ValueError(f"unknown verb {verb!r}")


def run_cli(args: list[str], path: Path) -> int:
    """Runs the CLI in this (child) process, its output beside ``path``; returns its exit code."""
    out = os.open(path.parent / (path.name + ".out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    try:
        cli.main(args, prog_name="kvw-ledger")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def interrupt_step_trial(scenario: Scenario, workdir: Path, verb: str, index: int, step: str) -> Outcome:
    """Sends SIGINT to the CLI child at protocol step ``index`` of ``verb``, then checks."""
    path = workdir / f"{verb}-int-step{index}"
    shutil.copytree(scenario.prepared, path)
    before = Ledger.open(path).head().version

    def body() -> int:
        with _Steps(path, index, signal.SIGINT).installed():
            return run_cli(cli_args(scenario, path, verb), path)

    pid = _fork(body, path, interruptible=True)
    status = wait(pid)
    label = f"{verb} interrupted at step {index} ({step})"
    return check_after_interrupt(scenario, path, verb, before, label, _exit_code(status))


def interrupt_random_trial(scenario: Scenario, workdir: Path, verb: str, seed: int, trial: int) -> Outcome:
    """Sends SIGINT to the CLI child after a seeded random delay in [0, 1.2 x the verb's duration]."""
    rng = random.Random(f"int/{seed}/{verb}/{trial}")
    delay = rng.uniform(0.0, 1.2 * scenario.durations[verb])
    path = workdir / f"{verb}-int-{trial}"
    shutil.copytree(scenario.prepared, path)
    before = Ledger.open(path).head().version
    pid = _fork(lambda: run_cli(cli_args(scenario, path, verb), path), path, interruptible=True)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    status = wait(pid)
    label = f"seed {seed} {verb} trial {trial} (interrupted after {delay * 1000:.0f} ms)"
    return check_after_interrupt(scenario, path, verb, before, label, _exit_code(status))


def check_after_interrupt(
    scenario: Scenario, path: Path, verb: str, before: int, label: str, exit_code: int | None
) -> Outcome:
    """The interrupt contract: exit 130 with nothing committed, or exit 0 with the entry
    committed; then the crash contract, the next command being another verb."""
    outcome = Outcome(label, committed=False, exit_code=exit_code)
    output = path.parent / (path.name + ".out")
    said = output.read_text(errors="replace") if output.exists() else ""
    if exit_code not in (0, cli.INTERRUPTED):
        err = path.parent / (path.name + ".err")
        outcome.errors.append(
            f"exit {exit_code}, not 0 or {cli.INTERRUPTED}: {said} {err.read_text() if err.exists() else ''}"
        )
        return outcome
    if "Traceback" in said:
        outcome.errors.append(f"the command printed a traceback: {said}")
    checked = check_after_crash(scenario, path, verb, before, label, 0 if exit_code == 0 else None,
                                next_verb="other")
    checked.exit_code = exit_code
    if exit_code == cli.INTERRUPTED and checked.committed:
        checked.errors.append(f"exit {cli.INTERRUPTED} although version {before + 1} was committed")
    if exit_code == 0 and "Error" in said:
        checked.errors.append(f"exit 0 with an error message: {said}")
    checked.errors[:0] = outcome.errors
    return checked


def stray_files(path: Path) -> list[str]:
    """Files under the ledger that no entry names and no part of the format owns: verify's
    leftover warnings, plus scratch (temp directories, ``*.partial``, unfinished journal or
    lock files) that verify does not list."""
    report = Ledger.open(path).verify(check_model=False)
    strays = [p.path for p in report.problems if p.severity != "error"]
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        name = p.name
        if (
            (p.parent == path and (".tmp-" in name or ".old-" in name))
            or name.endswith((".partial", ".tmp"))
        ):
            strays.append(rel)
    return strays


# --- the contract -------------------------------------------------------------------------


def check_after_crash(
    scenario: Scenario,
    path: Path,
    verb: str,
    before: int,
    label: str,
    exit_code: int | None,
    next_verb: str = "same",
) -> Outcome:
    """Holds a ledger whose writer was killed to the crash contract (see the module doc).

    ``next_verb`` "other" makes the next command after an uncommitted write another
    verb (``probe``, setting a limit), which must clean up what the dead writer left
    just the same.
    """
    outcome = Outcome(label, committed=False, exit_code=exit_code)
    if exit_code not in (None, 0):
        err = path.parent / (path.name + ".err")
        outcome.errors.append(
            f"the child failed on its own: {err.read_text() if err.exists() else '?'}"
        )
        return outcome
    try:
        ledger = Ledger.open(path)
    except Exception as e:  # any failure to open is the finding
        outcome.errors.append(f"the ledger does not open: {e!r}")
        return outcome
    report = ledger.verify(check_model=False)
    outcome.errors += [
        f"verify: {p.path}: {p.message}" for p in report.problems if p.severity == "error"
    ]
    head = ledger.head()
    if head.version not in (before, before + 1):
        outcome.errors.append(f"HEAD is version {head.version}; expected {before} or {before + 1}")
        return outcome
    outcome.committed = head.version == before + 1
    if outcome.committed and head.op != COMMITS[verb]:
        outcome.errors.append(f"version {head.version} is a {head.op}, not a {COMMITS[verb]}")
    if exit_code == 0 and not outcome.committed:
        outcome.errors.append("the child finished but its entry is missing")
    if outcome.errors:
        return outcome
    _check_weights(ledger, outcome)
    # The next command: the same verb again if it never committed, else a revert or gc.
    warnings: list[str] = []
    ledger.on_stale = warnings.append
    locked = (path / "lock").exists()
    ledger.lock_timeout = 5.0
    try:
        if not outcome.committed and next_verb == "same":
            run_verb_on(ledger, scenario, verb)
        elif not outcome.committed:
            ledger.probe(limits=ledger.limits(max_attenuation=0.95), progress=False)
        else:
            active = ledger.state().active
            if active:
                ledger.revert(active[-1], progress=False)
            else:
                ledger.gc()
    except Exception as e:
        outcome.errors.append(f"the next command failed: {e!r}")
        return outcome
    outcome.stale_warnings = len(warnings)
    if locked and not warnings:
        outcome.errors.append("a dead writer's lock was taken over without a warning")
    if (path / "lock").exists():
        outcome.errors.append("the next command left the lock file behind")
    after = Ledger.open(path)
    report = after.verify(check_model=False)
    outcome.errors += [
        f"verify after the next command: {p.path}: {p.message}"
        for p in report.problems
        if p.severity == "error"
    ]
    outcome.leftovers += [f"after the next command: stray file {f}" for f in stray_files(path)]
    expected = before + 2 if outcome.committed else before + 1
    if after.head().version != expected:
        outcome.errors.append(
            f"after the next command HEAD is {after.head().version}, not {expected}"
        )
    return outcome


def run_verb_on(ledger: Ledger, scenario: Scenario, verb: str) -> None:
    """As :func:`run_verb`, on an open ledger (so its callbacks are kept)."""
    if verb == "forget":
        ledger.forget(
            scenario.forget_c, request_id="C", config=KVWConfig(gamma=0.5), progress=False
        )
    elif verb == "revert":
        ledger.revert("B", progress=False)
    elif verb == "rederive":
        ledger.rederive("r2", progress=False)
    else:
        ledger.gc()


def _check_weights(ledger: Ledger, outcome: Outcome) -> None:
    """The exponents read at HEAD (head cache or not) equal the sum replayed from the journal."""
    state = ledger.state()
    try:
        got = ledger.exponents()
        want = sums.total(ledger, state).exponents
    except Exception as e:
        outcome.errors.append(f"HEAD's exponents cannot be read: {e!r}")
        return
    for site, value in want.items():
        if not torch.equal(got[site].view(torch.int32), value.view(torch.int32)):
            outcome.errors.append(f"HEAD's exponents at {site} differ from the replayed sum")


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts for a report: trials, committed, corrupt (any broken promise), stale takeovers."""
    return {
        "trials": len(outcomes),
        "committed": sum(o.committed for o in outcomes),
        "finished_before_kill": sum(o.exit_code == 0 for o in outcomes),
        "stale_lock_takeovers": sum(o.stale_warnings > 0 for o in outcomes),
        "corrupt": sum(bool(o.errors) for o in outcomes),
        "leftovers_after_next_command": sum(bool(o.leftovers) and not o.errors for o in outcomes),
    }
