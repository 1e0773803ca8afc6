"""Retain statistics: the calibrated accessor's quantiles, and the answer positions
(``label_eos``) recorded with every retain and forget, old ledgers included."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny
import torch

from kvw_ledger.data import Encoder, encode_all, read_records
from kvw_ledger.errors import BadInputError
from kvw_ledger.journal import Journal
from kvw_ledger.kvw import KVWConfig, exponents_from_trace
from kvw_ledger.ledger import Ledger
from kvw_ledger.retain_stat import measure
from kvw_ledger.sites import discover_sites

CONFIG = KVWConfig(gamma=0.5, batch_size=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stat")
    model = root / "model"
    tiny.llama().save_pretrained(model)
    tiny.char_tokenizer().save_pretrained(model)
    Ledger.create(root / "bare", model, progress=False)
    return {
        "root": root,
        "model": model,
        "bare": root / "bare",
        "retain": tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(9, 40)),
        "forget": tiny.write_jsonl(root / "forget.jsonl", tiny.qa_records(2, 3)),
    }


def _copy(env: dict[str, Path], name: str) -> Ledger:
    shutil.copytree(env["bare"], env["root"] / name)
    return Ledger.open(env["root"] / name)


def _plain_batch_means(model: Any, examples: list, batch_size: int) -> dict[int, torch.Tensor]:
    """Per layer, the (n_batches, d_ff) means of |down_proj input| at the answer-predicting
    positions, written without kvw_ledger: a seeded shuffle, full batches only."""
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    order = order[: len(order) // batch_size * batch_size]
    layers = model.model.layers
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    for start in range(0, len(order), batch_size):
        rows = [examples[j] for j in order[start : start + batch_size]]
        seen: dict[int, torch.Tensor] = {}
        handles = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i, seen=seen: seen.__setitem__(i, a[0]))
            for i, layer in enumerate(layers)
        ]
        sums = {i: torch.zeros(layers[i].mlp.down_proj.in_features) for i in out}
        count = 0
        try:
            for row in rows:  # one record at a time: no padding to mask
                labels = row.labels
                with torch.no_grad():
                    model(input_ids=row.input_ids[None])
                take = torch.zeros(len(labels), dtype=torch.bool)
                take[:-1] = labels[1:] != -100
                for i in out:
                    sums[i] += seen[i][0][take].float().abs().sum(0)
                count += int(take.sum())
        finally:
            for h in handles:
                h.remove()
        for i in out:
            out[i].append(sums[i] / count)
    return {i: torch.stack(v) for i, v in out.items()}


@pytest.mark.parametrize("statistic", ["q90", "q99", "max"])
def test_quantiles_and_max_are_taken_per_neuron_over_batch_means(env: dict[str, Path], statistic: str) -> None:
    model = tiny.llama()
    examples = encode_all(Encoder(tiny.char_tokenizer()), read_records(env["retain"]))
    got = measure(model, discover_sites(model), examples, statistic, 2, 0, progress=False)
    plain = _plain_batch_means(model, examples, 2)
    assert got.batches == 4  # 9 records at batch size 2: four full batches, the last one dropped
    for site in discover_sites(model):
        means = plain[site.layer]
        want = means.amax(0) if statistic == "max" else torch.from_numpy(
            np.quantile(means.numpy(), {"q90": 0.9, "q99": 0.99}[statistic], axis=0).astype(np.float32)
        )
        torch.testing.assert_close(got.values[site.name], want, rtol=1e-5, atol=1e-6)
        assert bool((got.values[site.name] >= means.mean(0) - 1e-6).all())


def test_a_calibrated_stat_is_registered_used_by_forget_and_rederived_fast(env: dict[str, Path]) -> None:
    ledger = _copy(env, "calibrated")
    mean = ledger.retain(env["retain"], stats_id="mean", batch_size=2, progress=False)
    q90 = ledger.retain(env["retain"], stats_id="q90", batch_size=2, statistic="q90", progress=False)
    assert mean.body["statistic"] == "mean" and "batches" not in mean.body
    assert q90.body["statistic"] == "q90" and q90.body["batches"] == 4 and q90.body["batch_size"] == 2
    assert q90.body["label_eos"] is False and q90.body["shuffle_seed"] == 0
    one_batch = KVWConfig(gamma=0.5, batch_size=2)  # the two forget records: one batch
    direct = ledger.forget(env["forget"], request_id="A", config=one_batch, retain_stats="q90", progress=False)
    assert direct.body["retain_stats"] == "q90" and direct.body["label_eos"] is False
    w_q90 = ledger.request_exponents("A")
    sites = [s.name for s in ledger.sites if s.name in w_q90]
    for site in sites:  # the accessor compared with the stored quantile
        trace = ledger.store.read_array(f"requests/A/trace/{site}")
        q = ledger.store.read_array(f"retain/q90/{site}")
        assert torch.equal(exponents_from_trace(trace, q, one_batch), w_q90[site])
    ledger.revert("A", progress=False)
    ledger.forget(env["forget"], request_id="B", config=one_batch, retain_stats="mean", progress=False)
    w_mean = ledger.request_exponents("B")
    assert sum(float(w_mean[s].sum()) for s in sites) > sum(float(w_q90[s].sum()) for s in sites)
    # One batch: its C_f was measured before any weakening of this request, so fast
    # re-derivation with the quantile gives exactly the request made with it.
    ledger.rederive("q90", ["B"], progress=False)
    rederived = ledger.request_exponents("B")
    for site in sites:
        assert torch.equal(rederived[site], w_q90[site])
    assert ledger.verify().ok


def test_bad_statistics_are_refused_before_anything_is_written(env: dict[str, Path]) -> None:
    ledger = _copy(env, "bad")
    before = [e.version for e in ledger.entries()]
    with pytest.raises(BadInputError, match="--statistic must be one of mean, q90, q99, max, not 'q50'"):
        ledger.retain(env["retain"], statistic="q50", progress=False)
    with pytest.raises(BadInputError, match="needs at least two retain batches of 8 records; the retain data has 9"):
        ledger.retain(env["retain"], statistic="max", batch_size=8, progress=False)
    assert [e.version for e in ledger.entries()] == before
    assert ledger.verify().ok


def _without_new_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes entries as kvw-ledger did before ``statistic`` and ``label_eos`` existed."""
    append = Journal.append

    def old_append(self: Journal, op: str, body: dict, files: dict, **kwargs: Any) -> Any:
        body = {k: v for k, v in body.items() if k not in ("statistic", "label_eos")}
        return append(self, op, body, files, **kwargs)

    monkeypatch.setattr(Journal, "append", old_append)


def test_an_old_ledger_opens_verifies_and_replays_with_the_eos_labelled(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        _without_new_fields(old_code)
        ledger = _copy(env, "old")
        ledger.retain(env["retain"], stats_id="r1", label_eos=True, progress=False)
        ledger.forget(env["forget"], request_id="A", config=CONFIG, label_eos=True, progress=False)
    old = Ledger.open(env["root"] / "old")
    assert "label_eos" not in old.state().requests["A"].body
    assert old.verify().ok
    w = old.request_exponents("A")
    # A new request on it counts positions as its retain stats did: with the eos.
    entry = old.forget(env["forget"], request_id="B", config=CONFIG, progress=False)
    assert entry.body["label_eos"] is True
    with pytest.raises(BadInputError, match="does not label the eos token, but retain stats 'r1' were measured with --label-eos"):
        old.forget(env["forget"], request_id="C", config=CONFIG, label_eos=False, progress=False)
    # Exact re-derivation re-encodes A's data as A was encoded: the same exponents, bit for bit.
    old.rederive("r1", ["A"], exact={"A": env["forget"]}, progress=False)
    again = old.request_exponents("A")
    for site, value in w.items():
        assert torch.equal(again[site], value), site
    # New stats measured the new way cannot re-derive a request that counted the eos.
    old.retain(env["retain"], stats_id="r2", progress=False)
    with pytest.raises(BadInputError, match="request 'A' labels the eos token, but retain stats 'r2' were measured without"):
        old.rederive("r2", ["A"], progress=False)
    assert old.verify().ok


def test_the_eos_changes_the_request(env: dict[str, Path]) -> None:
    """The option is not a no-op: counting the eos position gives other exponents."""
    ledger = _copy(env, "both")
    ledger.retain(env["retain"], stats_id="authors", progress=False)
    ledger.retain(env["retain"], stats_id="eos", label_eos=True, progress=False)
    ledger.forget(env["forget"], request_id="A", config=CONFIG, retain_stats="authors", progress=False)
    ledger.forget(env["forget"], request_id="B", config=CONFIG, retain_stats="eos", progress=False)
    a, b = ledger.request_exponents("A"), ledger.request_exponents("B")
    assert max(float((a[s] - b[s]).abs().max()) for s in a) > 1e-3
    assert ledger.state().requests["A"].body["tokens"] + 2 == ledger.state().requests["B"].body["tokens"]


def test_the_cli_lists_the_statistics_the_library_knows() -> None:
    from kvw_ledger import retain_stat
    from kvw_ledger.cli import writing

    assert writing.STATISTICS == retain_stat.STATISTICS
