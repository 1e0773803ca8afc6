"""Data parallel: ``torchrun --nproc_per_node 2 kvw-ledger forget|retain`` with gloo on the CPU.

Each rank measures its share of every batch; the all-reduced sums give every rank
the gate one process computes. Every run has a deadline, one thread per process,
and a port nobody else holds, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner

from kvw_ledger import distributed
from kvw_ledger.cli import main
from kvw_ledger.distributed import LOCAL, World
from kvw_ledger.errors import DataError, PeerFailedError, StabilityCheckError
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger

DEADLINE_S = 240
TORCHRUN = Path(sys.executable).with_name("torchrun")
KVW_LEDGER = Path(sys.executable).with_name("kvw-ledger")
FORGET_ARGS = ["--batch-size", "3", "--gamma", "0.5", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 kvw-ledger ARGS`` on the CPU, under a deadline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(KVW_LEDGER), *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=DEADLINE_S)


def rank_exit_codes(run: subprocess.CompletedProcess[str]) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's failure summary."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", run.stderr)
    return {int(rank): int(code) for rank, code in found}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model, data, and a ledger with retain statistics measured by one process."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir = root / "model"
    tiny.llama(seed=1, hidden_size=32, intermediate_size=64).save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(8, offset=20))
    tiny.write_jsonl(root / "forget.jsonl", tiny.qa_records(7))
    (root / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\nnot json\n')
    ledger = Ledger.create(root / "ledger", model_dir, progress=False)
    ledger.retain(root / "retain.jsonl", batch_size=3, progress=False)
    return root


def _copy(env: Path, name: str) -> Path:
    target = env / name
    shutil.copytree(env / "ledger", target)
    return target


def _arrays(ledger: Ledger, prefix: str) -> dict[str, torch.Tensor]:
    return {n: ledger.store.read_array(n) for n in ledger.store.list_arrays(prefix)}


def test_torchrun_forget_equals_one_process(env: Path) -> None:
    one, two = _copy(env, "forget-one"), _copy(env, "forget-two")
    config = KVWConfig(gamma=0.5, batch_size=3)
    single = Ledger.open(one).forget(env / "forget.jsonl", request_id="a", config=config, progress=False)
    run = torchrun("forget", str(two), str(env / "forget.jsonl"), "--id", "a", *FORGET_ARGS)
    assert run.returncode == 0, run.stderr
    # Rank 0 alone prints (and writes): one result line, with one process's figures.
    body = single.body
    assert run.stdout.count("request a applied") == 1
    assert (
        f"version {single.version}: request a applied ({body['records']} records, "
        f"{body['batches']} batches, {body['tokens']} answer tokens)"
    ) in run.stdout
    a, b = Ledger.open(one), Ledger.open(two)
    wa, wb = a.request_exponents("a"), b.request_exponents("a")
    assert set(wa) == set(wb)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"torchrun/gloo forget: max abs exponent difference vs one process {diff:.3g}")
    assert diff <= 1e-6
    assert any(bool(w.any()) for w in wb.values())
    # The same progressive order: the per-batch C_f traces match batch by batch.
    ta, tb = _arrays(a, "requests/a/trace"), _arrays(b, "requests/a/trace")
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].shape == tb[name].shape
        assert torch.allclose(ta[name], tb[name], rtol=1e-5, atol=1e-7), name
    body_a, body_b = a.head().body, b.head().body
    assert (body_a["batches"], body_a["tokens"]) == (body_b["batches"], body_b["tokens"])
    assert len(b.entries()) == len(a.entries())  # one commit, by rank 0 only
    assert b.verify().ok


def test_torchrun_retain_equals_one_process(env: Path) -> None:
    one, two = _copy(env, "retain-one"), _copy(env, "retain-two")
    Ledger.open(one).retain(env / "retain.jsonl", stats_id="r2", batch_size=3, progress=False)
    run = torchrun("retain", str(two), str(env / "retain.jsonl"), "--id", "r2", "--batch-size", "3", "-q")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("retain stats r2 from 8 records") == 1
    a, b = Ledger.open(one), Ledger.open(two)
    ra, rb = _arrays(a, "retain/r2"), _arrays(b, "retain/r2")
    assert set(ra) == set(rb) and ra
    for name in ra:
        assert torch.allclose(ra[name], rb[name], rtol=1e-6, atol=1e-8), name
    assert a.head().body["tokens"] == b.head().body["tokens"]  # counts reduce exactly
    assert b.verify().ok


def test_bad_input_fails_every_rank_alike_without_hanging(env: Path) -> None:
    ledger = _copy(env, "bad-input")
    before = sorted(p.name for p in (ledger / "journal").iterdir())
    run = torchrun("forget", str(ledger), str(env / "bad.jsonl"), "--id", "x", "-q")
    assert run.returncode != 0
    assert rank_exit_codes(run) == {0: 2, 1: 2}, run.stderr
    assert run.stderr.count("bad.jsonl:2: not valid JSON") == 2  # both ranks say why
    assert sorted(p.name for p in (ledger / "journal").iterdir()) == before


def test_rank_0s_failed_stability_check_exits_every_rank_1(env: Path) -> None:
    ledger = _copy(env, "unstable")
    before = sorted(p.name for p in (ledger / "journal").iterdir())
    run = torchrun(
        "forget", str(ledger), str(env / "forget.jsonl"), "--id", "x", *FORGET_ARGS,
        "--max-attenuation", "0.00001",
    )  # fmt: skip
    assert rank_exit_codes(run) == {0: 1, 1: 1}, run.stderr
    assert run.stderr.count("stability check(s) and was not committed") == 2
    assert sorted(p.name for p in (ledger / "journal").iterdir()) == before
    assert not (ledger / "requests" / "x").exists()
    assert Ledger.open(ledger).verify().ok


def test_verbs_that_run_in_one_process_refuse_a_launcher(env: Path) -> None:
    result = CliRunner().invoke(main, ["revert", str(env / "ledger"), "a"], env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2
    assert "kvw-ledger revert runs in one process, not under torchrun (WORLD_SIZE=2)" in result.output


def test_one_process_world_shards_nothing_away() -> None:
    assert World.from_env() is LOCAL or os.environ.get("WORLD_SIZE", "1") != "1"
    assert LOCAL.shard([1, 2, 3]) == [1, 2, 3]
    assert World(rank=1, size=2).shard([0, 1, 2, 3, 4]) == [1, 3]
    assert World(rank=0, size=2).shard([0]) == [0] and World(rank=1, size=2).shard([0]) == []
    with LOCAL.together() as shared:
        shared.value = 7
    assert shared.main == 7
    with pytest.raises(DataError), LOCAL.together():
        raise DataError("x.jsonl:1: not valid JSON")


def test_a_peers_error_is_raised_again_with_its_class_message_and_exit_code() -> None:
    status = distributed._status(StabilityCheckError("the step failed 1 stability check(s)"))
    rebuilt = distributed._rebuild(status, 0)
    assert type(rebuilt) is StabilityCheckError and rebuilt.exit_code == 1
    assert str(rebuilt) == "the step failed 1 stability check(s)"
    foreign = distributed._rebuild(distributed._status(RuntimeError("CUDA out of memory")), 1)
    assert type(foreign) is PeerFailedError and foreign.exit_code == 1
    assert str(foreign) == "rank 1 failed: RuntimeError: CUDA out of memory"


def test_malformed_launcher_variables_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer; start the job with torchrun"):
        World.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 is outside WORLD_SIZE=2"):
        World.from_env()


def test_a_failure_on_one_rank_reaches_every_rank(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(_free_port()), str(Path(__file__).with_name("dp_worker.py")), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:  # rank 1's error, on both ranks, with its class, message and exit code
        assert seen["together"] == ["DataError", "rank1.jsonl:3: not valid JSON", 2]
        assert seen["shared"] == "from rank 0"
        assert seen["sums"] == [3.0, 3.0, 3.0]
    assert ranks[0]["all_reduce"] == [3.0, 3.0, 3.0]  # the failing rank itself raises its own error
    assert ranks[1]["all_reduce"] == [
        "PeerFailedError",
        "another rank failed while measuring its share of a batch (its error is above); nothing was committed",
    ]


def test_under_nccl_auto_is_each_ranks_own_gpu() -> None:
    from kvw_ledger.weights import rank_device as _rank_device

    rank3 = World(rank=3, size=4, local_rank=3, backend="nccl")
    assert _rank_device(None, rank3) == _rank_device("auto", rank3) == "cuda:3"
    assert _rank_device("cuda:1", rank3) == "cuda:1"  # an explicit device stays
    assert _rank_device("auto", World(rank=1, size=2, local_rank=1, backend="gloo")) == "auto"
