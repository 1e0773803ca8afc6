"""Tests for kvw_ledger.remote: ledgers at fsspec URLs, through local mirrors.

The URLs are fsspec's in-memory filesystem (shared by every thread of the test
process), each test under its own bucket; ``KVW_LEDGER_CACHE`` points each
"machine" at its own mirror directory.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import tiny
import torch
import zarr
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvw_ledger.cli import main
from kvw_ledger.errors import (
    FormatVersionError,
    IntegrityError,
    LedgerExistsError,
    LedgerLockedError,
    LedgerNotFoundError,
    StorageError,
)
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.remote import Remote, is_url, mirror_dir

CONFIG = KVWConfig(gamma=0.5)


@dataclass(frozen=True)
class Env:
    model_dir: Path
    retain: Path
    forget: tuple[Path, ...]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("remote")
    model_dir = root / "model"
    tiny.llama().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget = tuple(tiny.write_jsonl(root / f"f{i}.jsonl", tiny.qa_records(2, 3 * i)) for i in range(4))
    return Env(model_dir, retain, forget)


@pytest.fixture
def url() -> Iterator[str]:
    bucket = f"/t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{bucket}/ledger"
    fs = MemoryFileSystem()
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


class Machines:
    """Switches ``KVW_LEDGER_CACHE``, as if the next call ran on another machine."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch

    def on(self, name: str) -> None:
        self.monkeypatch.setenv("KVW_LEDGER_CACHE", str(self.tmp_path / f"cache-{name}"))


@pytest.fixture
def machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machines:
    m = Machines(tmp_path, monkeypatch)
    m.on("a")
    return m


def _with_request(env: Env, url: str) -> Ledger:
    ledger = Ledger.create(url, env.model_dir, progress=False)
    ledger.retain(env.retain, progress=False)
    ledger.forget(env.forget[0], request_id="A", config=CONFIG, progress=False)
    return ledger


@contextlib.contextmanager
def _entries_unpublishable() -> Iterator[None]:
    """Inside: every journal entry a push creates at the URL fails, as if the network dropped."""
    real_create = Remote._create

    def no_entries(self: Remote, rel: str, data: bytes) -> None:
        if rel.startswith("journal/"):
            raise StorageError(f"could not create {self.where(rel)} (network down)")
        real_create(self, rel, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Remote, "_create", no_entries)
        yield


def _flip_last_byte(url: str, rel: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    data = bytearray(fs.cat_file(f"{root}/{rel}"))
    data[-1] ^= 0x01
    fs.pipe_file(f"{root}/{rel}", bytes(data))


def test_is_url() -> None:
    assert is_url("s3://bucket/ledger") and is_url("memory://x")
    assert not is_url("/tmp/ledger") and not is_url("file:///tmp/ledger") and not is_url("led")


def test_a_second_machine_sees_every_version_bit_for_bit(env: Env, url: str, machines: Machines, tmp_path: Path) -> None:
    first = _with_request(env, url)
    first.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)
    assert first.location == url and first.path == mirror_dir(url)

    machines.on("b")
    second = Ledger.open(url)
    assert second.path != first.path
    assert [e.hash for e in second.entries()] == [e.hash for e in first.entries()]
    for version in range(1, first.head().version + 1):
        mine, theirs = first.exponents(version), second.exponents(version)
        assert all(torch.equal(mine[s], theirs[s]) for s in mine), version
    assert any(bool(w.any()) for w in second.exponents().values()), "nothing was weakened"

    second.revert("A")  # written from the second machine ...
    machines.on("a")
    again = Ledger.open(url)  # ... and seen by the first
    assert again.path == first.path and again.state().active == ["B"]
    assert again.export(tmp_path / "out", progress=False) == again.resolve("HEAD")
    exported = tiny.file_tensors(tmp_path / "out")
    assert second.export(tmp_path / "out-b", progress=False) == second.resolve("HEAD")
    expected = tiny.file_tensors(tmp_path / "out-b")
    assert all(tiny.same_bits(exported[k], expected[k]) for k in expected)
    assert again.verify().problems == []


def test_zarr_opens_the_url_and_reads_the_base(env: Env, url: str, machines: Machines) -> None:
    ledger = _with_request(env, url)
    group = zarr.open_group(url, mode="r")
    site = ledger.sites[0].name
    assert group.attrs["format_version"] == 1
    stored = torch.from_numpy(group[f"base/{site}"][...])  # float32 model: native dtype
    assert torch.equal(stored, ledger.base(site))


def test_a_tampered_chunk_at_the_url_is_named_by_pull_and_verify(env: Env, url: str, machines: Machines) -> None:
    ledger = _with_request(env, url)
    array = ledger.store.list_arrays("requests/A/exponent")[0]
    rel = f"{array}/c/0"
    _flip_last_byte(url, rel)

    problems = ledger.verify().problems  # the mirror is whole; the URL is not
    assert [p.path for p in problems if p.severity == "error"] == [f"{url}/{rel}"]
    machines.on("b")
    with pytest.raises(IntegrityError, match=f"{url}/{rel} has sha256"):
        Ledger.open(url)
    assert not mirror_dir(url).exists(), "a failed first pull must not leave a half mirror"


def test_a_tampered_entry_at_the_url_is_refused(env: Env, url: str, machines: Machines) -> None:
    _with_request(env, url)
    _flip_last_byte(url, "journal/00000002.json")
    machines.on("b")
    with pytest.raises(IntegrityError, match="00000002.json"):
        Ledger.open(url)


def test_a_writer_with_a_stale_mirror_pulls_before_it_commits(env: Env, url: str, machines: Machines) -> None:
    first = _with_request(env, url)
    machines.on("b")
    second = Ledger.open(url)
    machines.on("a")
    first.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)  # second's mirror is now behind
    machines.on("b")
    entry = second.forget(env.forget[2], request_id="C", config=CONFIG, progress=False)
    assert entry.version == 5 and second.state().active == ["A", "B", "C"]
    assert Remote(url).versions() == [1, 2, 3, 4, 5]
    machines.on("c")
    assert Ledger.open(url).state().active == ["A", "B", "C"]


def test_two_writers_at_once_both_commit_one_after_the_other(env: Env, url: str, machines: Machines) -> None:
    _with_request(env, url)
    ledgers = []
    for name in ["X", "Y"]:  # two machines, each with its own mirror
        machines.on(name)
        ledgers.append(Ledger.open(url))
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_forget, args=(ledger, name, data, errors))
        for ledger, name, data in zip(ledgers, ["X", "Y"], env.forget[1:3], strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    machines.on("z")
    final = Ledger.open(url)
    assert sorted(final.state().active) == ["A", "X", "Y"]
    assert [e.op for e in final.entries()][-2:] == ["forget", "forget"]
    assert final.verify().problems == []


def _forget(ledger: Ledger, name: str, data: Path, errors: list[BaseException]) -> None:
    try:
        ledger.forget(data, request_id=name, config=CONFIG, progress=False)
    except BaseException as e:
        errors.append(e)


def test_a_held_lock_at_the_url_makes_a_writer_wait_then_fail(env: Env, url: str, machines: Machines) -> None:
    ledger = _with_request(env, url)
    ledger.lock_timeout = 0.3
    with Remote(url).lock("someone else's forget"), pytest.raises(LedgerLockedError, match=f"{url}/lock"):
        ledger.revert("A")
    assert Remote(url).versions() == [1, 2, 3]
    ledger.revert("A")
    assert Remote(url).versions() == [1, 2, 3, 4]


class _ClientError(Exception):
    """What botocore raises for an S3 error answer: the answer's fields in ``response``."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code}) when calling the PutObject operation")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize(("code", "status"), [("PreconditionFailed", 412), ("ConditionalRequestConflict", 409)])
def test_a_precondition_failure_on_the_lock_is_another_writer_exit_75(
    env: Env, url: str, machines: Machines, monkeypatch: pytest.MonkeyPatch, code: str, status: int
) -> None:
    # s3fs turns a 412 into FileExistsError only when the answer names its condition; a
    # store that leaves it out (or answers 409 to a racing conditional write) gives an
    # OSError whose cause is the client error.
    ledger = _with_request(env, url)
    real_pipe = MemoryFileSystem.pipe_file

    def pipe_file(self: MemoryFileSystem, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> Any:
        if mode == "create" and path.endswith("/lock"):
            raise OSError(22, "Invalid argument") from _ClientError(code, status)
        return real_pipe(self, path, value, mode=mode, **kw)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", pipe_file)
    monkeypatch.setattr(Ledger, "lock_timeout", 0.2)
    result = CliRunner().invoke(main, ["revert", url, "A", "--json"])
    assert result.exit_code == 75, result.output
    error = json.loads(result.output)
    assert error["exit_code"] == 75 and f"{url} is locked by" in error["error"]
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", real_pipe)
    assert Remote(url).versions() == [1, 2, 3]  # nothing was published
    ledger.revert("A")  # the other writer is gone: the same write now goes through
    assert Remote(url).versions() == [1, 2, 3, 4]


def test_another_refusal_of_an_exclusive_create_stays_a_storage_error(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pipe_file(self: MemoryFileSystem, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> Any:
        raise OSError(13, "Permission denied") from _ClientError("AccessDenied", 403)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", pipe_file)
    with pytest.raises(StorageError, match="exclusively") as info:
        Remote(url)._create("lock", b"{}")
    assert info.value.exit_code == 2


def test_a_failed_push_leaves_the_url_as_it_was_and_the_next_write_publishes_it(
    env: Env, url: str, machines: Machines
) -> None:
    ledger = _with_request(env, url)
    with _entries_unpublishable(), pytest.raises(StorageError, match="committed in the local copy .* not published"):
        ledger.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)

    assert Remote(url).versions() == [1, 2, 3]
    assert ledger.head().version == 4  # committed in the mirror
    warnings = [p for p in Remote(url).verify() if p.severity == "warning"]
    assert warnings and all("named by no journal entry" in p.message for p in warnings)
    assert [p for p in Remote(url).verify() if p.severity == "error"] == []
    machines.on("b")
    assert Ledger.open(url).state().active == ["A"]  # readers elsewhere see the last published version

    machines.on("a")
    ledger.revert("A")  # publishes B's forget first, then the revert
    assert Remote(url).versions() == [1, 2, 3, 4, 5]
    machines.on("c")
    fresh = Ledger.open(url)
    assert fresh.state().active == ["B"]
    assert fresh.verify().problems == []


def test_gc_deletes_the_files_at_the_url_too(env: Env, url: str, machines: Machines) -> None:
    ledger = _with_request(env, url)
    ledger.revert("A")
    ledger.gc()
    fs, root = fsspec.core.url_to_fs(url)
    assert not [p for p in fs.find(root) if "/requests/A/" in p]
    machines.on("b")
    fresh = Ledger.open(url)
    assert list(fresh.state().deleted) == ["A"]
    assert not (fresh.path / "requests" / "A").exists()
    assert fresh.verify().problems == []


def test_create_refuses_a_url_that_holds_a_ledger(env: Env, url: str, machines: Machines) -> None:
    Ledger.create(url, env.model_dir, progress=False)
    machines.on("b")
    with pytest.raises(LedgerExistsError, match=url):
        Ledger.create(url, env.model_dir, progress=False)


def test_open_of_an_empty_url_says_so_and_leaves_no_mirror(url: str, machines: Machines) -> None:
    with pytest.raises(LedgerNotFoundError, match=f"no ledger at {url}"):
        Ledger.open(url)
    assert not mirror_dir(url).exists()


class _Overwriting(MemoryFileSystem):
    """A filesystem whose exclusive create silently replaces the file."""

    protocol = "overwriting"

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: object) -> None:
        super().pipe_file(path, value, **kwargs)


def test_a_filesystem_without_exclusive_create_is_refused_for_writes(env: Env, machines: Machines) -> None:
    fsspec.register_implementation("overwriting", _Overwriting, clobber=True)
    url = f"overwriting://t-{uuid.uuid4().hex[:12]}/ledger"
    with pytest.raises(StorageError, match="exclusive create"):
        Ledger.create(url, env.model_dir, progress=False)
    assert not Remote(url).exists(), "nothing may be published without a safe lock"


def test_the_cli_works_on_a_url(env: Env, url: str, machines: Machines) -> None:
    runner = CliRunner()
    init = runner.invoke(main, ["init", url, "--model", str(env.model_dir)])
    assert init.exit_code == 0, init.output
    assert init.stdout == f"created {url}: 4 sites, version 1\n"
    retain = runner.invoke(main, ["retain", url, str(env.retain), "--id", "base-stats"])
    assert retain.exit_code == 0, retain.output
    forget = runner.invoke(main, ["forget", url, str(env.forget[0]), "--id", "A", "--gamma", "0.5"])
    assert forget.exit_code == 0, forget.output
    log = runner.invoke(main, ["log", url, "--json"])
    assert log.exit_code == 0, log.output
    entries = json.loads(log.stdout)
    assert [(e["op"], e["active"]) for e in entries] == [("init", []), ("retain", []), ("forget", ["A"])]
    machines.on("b")
    verify = runner.invoke(main, ["verify", url])
    assert verify.exit_code == 0, verify.output


# --- the same over S3's wire protocol (moto's S3 server on localhost, s3fs) ---------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    s3fs = pytest.importorskip("s3fs")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh client reads the endpoint above
    bucket = f"kvw-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}/ledgers/tiny"


def test_over_s3_two_machines_write_in_turn_and_gc_deletes_objects(env: Env, s3_url: str, machines: Machines) -> None:
    first = _with_request(env, s3_url)
    machines.on("b")
    second = Ledger.open(s3_url)
    machines.on("a")
    first.forget(env.forget[1], request_id="B", config=CONFIG, progress=False)
    machines.on("b")
    second.revert("A")  # its mirror was behind: it pulls B's forget first
    second.gc()
    assert Remote(s3_url).versions() == [1, 2, 3, 4, 5, 6]

    machines.on("c")
    fresh = Ledger.open(s3_url)
    assert fresh.state().active == ["B"] and list(fresh.state().deleted) == ["A"]
    mine, theirs = fresh.exponents(), second.exponents()  # downloaded vs written there
    assert all(torch.equal(mine[s], theirs[s]) for s in mine)
    assert any(bool(w.any()) for w in mine.values())
    fs, root = fsspec.core.url_to_fs(s3_url)
    assert not [p for p in fs.find(root) if "/requests/A/" in p]
    assert fresh.verify().problems == []


def test_over_s3_the_lock_and_entries_are_created_exclusively(env: Env, s3_url: str, machines: Machines) -> None:
    ledger = Ledger.create(s3_url, env.model_dir, progress=False)
    ledger.lock_timeout = 0.2
    with Remote(s3_url).lock("another writer"), pytest.raises(LedgerLockedError, match="another writer"):
        ledger.retain(env.retain, progress=False)
    with pytest.raises(FileExistsError):
        Remote(s3_url)._create("journal/00000001.json", b"{}")
    assert Ledger.open(s3_url).head().op == "init"


def test_a_mirror_whose_unpublished_version_lost_the_race_is_refused(
    env: Env, url: str, machines: Machines
) -> None:
    ledger = _with_request(env, url)
    with _entries_unpublishable(), pytest.raises(StorageError):
        ledger.revert("A")  # version 4 exists only in this mirror
    machines.on("b")
    Ledger.open(url).forget(env.forget[1], request_id="B", config=CONFIG, progress=False)  # another 4

    machines.on("a")
    with pytest.raises(IntegrityError, match=f"differ from version 4 on .*remove {ledger.path}"):
        ledger.forget(env.forget[2], request_id="C", config=CONFIG, progress=False)
    assert Remote(url).versions() == [1, 2, 3, 4]  # nothing published over the other writer's 4


def test_a_pull_cut_off_midway_adopts_nothing_past_it_and_the_next_completes(
    env: Env, url: str, machines: Machines, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_request(env, url)
    machines.on("b")
    real_read = Remote.read
    reads = {"n": 0}

    def flaky(self: Remote, rel: str) -> bytes | None:
        if not rel.startswith("journal/"):
            reads["n"] += 1
            if reads["n"] == 5:
                raise StorageError(f"could not read {self.where(rel)} (connection reset)")
        return real_read(self, rel)

    Ledger.open(url)  # a mirror at version 3
    machines.on("a")
    Ledger.open(url).forget(env.forget[1], request_id="B", config=CONFIG, progress=False)
    machines.on("b")
    mirror = mirror_dir(url)
    monkeypatch.setattr(Remote, "read", flaky)
    with pytest.raises(StorageError, match="connection reset"):
        Ledger.open(url)
    monkeypatch.setattr(Remote, "read", real_read)
    assert [p.name for p in sorted((mirror / "journal").iterdir())][-1] == "00000003.json"
    assert not list(mirror.glob("pull.tmp-*")), "the pull's scratch directory is left behind"
    caught_up = Ledger.open(url)
    assert caught_up.state().active == ["A", "B"]
    assert caught_up.verify().problems == []


def test_the_cli_exit_codes_on_a_damaged_and_on_a_locked_url(env: Env, url: str, machines: Machines) -> None:
    ledger = _with_request(env, url)
    runner = CliRunner()
    with Remote(url).lock("a forget elsewhere"):
        Ledger.lock_timeout, saved = 0.2, Ledger.lock_timeout
        try:
            locked = runner.invoke(main, ["revert", url, "A"])
        finally:
            Ledger.lock_timeout = saved
    assert locked.exit_code == 75 and f"{url} is locked by pid" in locked.output  # try again later
    _flip_last_byte(url, f"{ledger.store.list_arrays('requests/A/exponent')[0]}/c/0")
    verify = runner.invoke(main, ["verify", url])
    assert verify.exit_code == 1 and f"{url}/requests/A/exponent/" in verify.output


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=5))
def test_writes_from_any_machines_in_any_order_make_one_history_every_mirror_agrees_on(
    env: Env, machines: Machines, steps: list[tuple[str, bool]]
) -> None:
    url = f"memory:///h-{uuid.uuid4().hex[:12]}/ledger"
    machines.on(f"init-{uuid.uuid4().hex[:8]}")
    ledger = Ledger.create(url, env.model_dir, progress=False)
    ledger.retain(env.retain, progress=False)
    tag = uuid.uuid4().hex[:8]  # fresh mirrors for every example
    opened = {}
    expected = []  # the active set a single writer would reach
    for n, (machine, forget) in enumerate(steps):
        machines.on(f"{machine}-{tag}")
        if machine not in opened:
            opened[machine] = Ledger.open(url)
        here = opened[machine]  # its mirror may be any number of versions behind
        if forget or not expected:
            here.forget(env.forget[n % len(env.forget)], request_id=f"r{n}", config=CONFIG, progress=False)
            expected.append(f"r{n}")
        else:
            here.revert(expected.pop(0))
    versions = Remote(url).versions()
    assert versions == list(range(1, 3 + len(steps)))
    assert Remote(url).verify() == []
    machines.on(f"reader-{tag}")
    reader = Ledger.open(url)
    assert reader.state().active == expected
    for machine in opened:
        machines.on(f"{machine}-{tag}")
        mine = Ledger.open(url)  # pulls whatever this machine missed
        assert [e.hash for e in mine.entries()] == [e.hash for e in reader.entries()]
        a, b = mine.exponents(), reader.exponents()
        assert all(torch.equal(a[s], b[s]) for s in a)
    MemoryFileSystem().rm(url.removeprefix("memory://").rsplit("/", 1)[0], recursive=True)


def test_a_ledger_of_a_newer_format_at_the_url_is_refused_before_anything_is_adopted(
    env: Env, url: str, machines: Machines
) -> None:
    Ledger.create(url, env.model_dir, progress=False)
    fs, root = fsspec.core.url_to_fs(url)
    meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
    meta["attributes"]["format_version"] = 99
    fs.pipe_file(f"{root}/zarr.json", json.dumps(meta).encode())
    machines.on("b")
    with pytest.raises(FormatVersionError, match=f"{url} was written by a newer kvw-ledger .format 99"):
        Ledger.open(url)
    assert not mirror_dir(url).exists()
