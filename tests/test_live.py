"""Tests for kvw_ledger.live: LiveModel.apply equals Ledger.materialize bit for bit.

Every version of a history with plain and rescaled requests and reverts, in float32
and bfloat16, in any order of switching; a GPT-2 (value vectors along axis 0); a
model whose dtype differs from the ledger's base; small chunks; models that do not
fit the ledger; unknown REFs. One check also goes back to the original model file
and the stored sums, not through either weight path.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kvw_ledger
from kvw_ledger import live as live_module
from kvw_ledger.errors import ModelMismatchError, RefNotFoundError
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.live import LiveModel
from kvw_ledger.loading import load_model, torch_threads
from kvw_ledger.sites import site_weight

PLAIN = KVWConfig(gamma=0.5)
RESCALED = KVWConfig(gamma=0.5, rescale=True)
NARROW = KVWConfig(gamma=0.5, layers=(2, 2))  # one site changes, the others keep their factor


@dataclass(frozen=True)
class History:
    ledger: Ledger
    head: int  # versions are 1..head
    reference: nn.Module  # a second loaded model that Ledger.materialize writes into


def _history(root: Path, model: nn.Module) -> History:
    """init, retain, then forget A, B (rescale), C (one layer), revert A, forget D (rescale), revert B."""
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    ledger = Ledger.create(root / "led", model_dir, progress=False)
    ledger.retain(retain, progress=False)
    steps = [
        ("A", PLAIN),
        ("B", RESCALED),
        ("C", NARROW),
        ("-A", None),
        ("D", RESCALED),
        ("-B", None),
    ]
    for n, (name, config) in enumerate(steps):
        if config is None:
            ledger.revert(name[1:])
        else:
            forget = tiny.write_jsonl(
                root / f"forget-{name}.jsonl", tiny.qa_records(1 + n % 2, 3 * n)
            )
            ledger.forget(forget, request_id=name, config=config, progress=False)
    return History(ledger, ledger.head().version, load_model(model_dir))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def history(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> History:
    dtype = getattr(torch, request.param)
    return _history(tmp_path_factory.mktemp(f"live-{request.param}"), tiny.llama().to(dtype))


@pytest.fixture(scope="module")
def gpt2_history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return _history(tmp_path_factory.mktemp("live-gpt2"), tiny.gpt2().to(torch.bfloat16))


def _live(history: History) -> LiveModel:
    return LiveModel(history.ledger, load_model(history.ledger.model_info["dir"]))


def _check(history: History, live: LiveModel, at: str | int, **apply: bool) -> None:
    """``live.apply(at)`` writes exactly what ``Ledger.materialize(at)`` writes."""
    version = history.ledger.materialize(history.reference, at)
    assert live.apply(at, **apply) == version == live.version
    for site in history.ledger.sites:
        got = site_weight(live.model, site)
        assert tiny.same_bits(got, site_weight(history.reference, site)), (at, site.name)


def test_every_version_back_and_forth_equals_materialize(history: History) -> None:
    live = _live(history)
    assert live.version is None
    versions = list(range(1, history.head + 1))
    for at in [*versions, *reversed(versions), "HEAD", "HEAD~2", "C", str(history.head)]:
        _check(history, live, at)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_kernel_writes_every_version_bit_for_bit(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    if history.ledger.base(history.ledger.sites[0].name).dtype != torch.bfloat16:
        pytest.skip("a float32 site is one multiply either way; only bfloat16 goes through the kernel")
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool left behind
    live = LiveModel(history.ledger, load_model(history.ledger.model_info["dir"]), compile=True)
    chunks: list[int] = []
    monkeypatch.setattr(live, "_run", lambda device, tasks: chunks.append(len(tasks)))
    versions = list(range(1, history.head + 1))
    for at in [*versions, *reversed(versions), "HEAD"]:
        _check(history, live, at)
    assert sum(chunks) == 0, "the compiled path fell back to chunks"


@settings(max_examples=12, deadline=None)
@given(order=st.lists(st.integers(1, 9), min_size=1, max_size=8), changed_only=st.booleans())
def test_any_order_of_switches_equals_materialize(
    history: History, order: list[int], changed_only: bool
) -> None:
    live = _live(history)
    for at in order:
        _check(history, live, min(at, history.head), changed_only=changed_only)


def test_head_equals_the_formula_from_the_original_file(history: History) -> None:
    ledger = history.ledger
    assert ledger.state().active == ["C", "D"]
    live = _live(history)
    live.apply()
    original = tiny.file_tensors(Path(ledger.model_info["dir"]))
    _, weakening = ledger.sums()
    exponents, scales = weakening.exponents, weakening.log_scales
    assert scales  # D was made with rescale
    changed = 0
    for site in ledger.sites:
        base = original[ledger.locations[site.name].key]
        s = scales.get(site.name, torch.zeros(()))
        factor = torch.exp(s - exponents[site.name]).unsqueeze(0)  # (d_ff,) -> (1, d_ff)
        want = (base.float() * factor).to(base.dtype)
        assert tiny.same_bits(site_weight(live.model, site), want), site.name
        changed += not tiny.same_bits(want, base)
    assert changed >= 2  # C's layer and D's layers are weakened


def test_value_vectors_along_axis_0_in_small_chunks(
    gpt2_history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {s.axis for s in gpt2_history.ledger.sites} == {0}
    monkeypatch.setattr(live_module, "_CHUNK", 40)  # several chunks of rows per site
    live = _live(gpt2_history)
    for at in range(gpt2_history.head, 0, -1):
        _check(gpt2_history, live, at)


@pytest.mark.parametrize("chunk", [1, 40, 1 << 18])
def test_chunk_size_does_not_change_a_bit(
    history: History, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(live_module, "_CHUNK", chunk)
    live = _live(history)
    for at in ("HEAD", 3, 5):
        _check(history, live, at)


@pytest.mark.parametrize("threads", [2, 3])
def test_chunks_shared_among_threads_change_no_bit(
    history: History, gpt2_history: History, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(live_module, "_CHUNK", 100)  # many chunks per site, for every thread
    for hist in (history, gpt2_history):
        directory = hist.ledger.model_info["dir"]
        half = History(hist.ledger, hist.head, load_model(directory).to(torch.float16))
        lives = [_live(hist), LiveModel(hist.ledger, load_model(directory).to(torch.float16))]
        with torch_threads(threads):
            for at in ("HEAD", 3, 1, 5):
                _check(hist, lives[0], at)
                _check(half, lives[1], at)  # the base's dtype, then float16
            assert torch.get_num_threads() == threads  # as the caller set it


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_model_in_another_dtype_than_the_base(history: History, dtype: str) -> None:
    # Ledger.materialize casts the value (in the base's dtype) into whatever the parameter holds.
    to, directory = getattr(torch, dtype), history.ledger.model_info["dir"]
    other = History(history.ledger, history.head, load_model(directory).to(to))
    live = LiveModel(history.ledger, load_model(directory).to(to))
    for at in ("HEAD", 4, 1):
        _check(other, live, at)


def test_bases_are_read_once(history: History, monkeypatch: pytest.MonkeyPatch) -> None:
    live = _live(history)

    def no_base(self: object, site: str) -> None:
        raise AssertionError(f"read the base of {site}")

    monkeypatch.setattr(Ledger, "base", no_base)
    for at in (history.head, 2, 4):
        live.apply(at)
    monkeypatch.undo()
    _check(history, live, 4)


def test_head_is_read_again_only_after_a_commit(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(history.ledger.path, tmp_path / "led")
    ledger = Ledger.open(tmp_path / "led")
    live = LiveModel(ledger, load_model(ledger.model_info["dir"]))
    reads: list[str | int] = []
    sums = Ledger.sums
    monkeypatch.setattr(Ledger, "sums", lambda self, at="HEAD": reads.append(at) or sums(self, at))
    assert live.apply() == live.apply() == history.head
    assert live.apply(history.head) == history.head
    assert reads == ["HEAD", history.head]  # HEAD's factors kept while the newest entry stands
    ledger.revert("C")
    assert live.apply() == history.head + 1
    assert reads == ["HEAD", history.head, "HEAD"]
    _check(History(ledger, history.head + 1, history.reference), live, "HEAD")


def test_changed_only_skips_sites_whose_factor_is_unchanged(history: History) -> None:
    ledger = history.ledger
    live = _live(history)
    c = ledger.resolve("C")  # forget C weakened layer 2 only
    live.apply(c - 1)
    untouched = next(s for s in ledger.sites if s.layer == 0)
    weight = site_weight(live.model, untouched)
    weight.fill_(7.0)  # a write LiveModel does not know of
    live.apply(c, changed_only=True)
    assert bool((weight == 7.0).all())  # skipped: its factor did not change from c - 1 to c
    _check(history, live, c)  # the default writes every site


def test_a_model_that_does_not_fit_the_ledger_is_refused_naming_the_site(history: History) -> None:
    ledger = history.ledger
    with pytest.raises(
        ModelMismatchError, match=r"site 'model\.layers\.2\.mlp\.down_proj'.*pass the model"
    ):
        LiveModel(ledger, tiny.llama(num_hidden_layers=2))
    with pytest.raises(
        ModelMismatchError, match=r"model\.layers\.0\.mlp\.down_proj.*48.*32 value vectors"
    ):
        LiveModel(ledger, tiny.llama(intermediate_size=48))
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*\(24, 32\).*\(16, 32\)"
    ):
        LiveModel(ledger, tiny.llama(hidden_size=24))


def test_a_replaced_parameter_is_written_or_if_reshaped_refused_before_any_write(
    history: History,
) -> None:
    live = _live(history)
    live.apply(1)
    last = history.ledger.sites[-1]
    module = live.model.get_submodule(last.module)
    old = module.weight
    module.weight = nn.Parameter(torch.zeros_like(old))  # e.g. a reload: new memory, same shape
    _check(history, live, "HEAD")
    before = {s.name: site_weight(live.model, s).clone() for s in history.ledger.sites}
    module.weight = nn.Parameter(torch.zeros(16, 8, dtype=old.dtype))
    with pytest.raises(ModelMismatchError, match=last.name):
        live.apply(2)
    assert live.version == history.head
    for site in history.ledger.sites[:-1]:
        assert tiny.same_bits(site_weight(live.model, site), before[site.name]), site.name


@pytest.mark.parametrize("ref", ["nope", 99, "HEAD~99"])
def test_an_unknown_ref_is_refused_and_nothing_written(history: History, ref: str | int) -> None:
    live = _live(history)
    live.apply(2)
    before = {s.name: site_weight(live.model, s).clone() for s in history.ledger.sites}
    with pytest.raises(RefNotFoundError):
        live.apply(ref)
    assert live.version == 2
    for site in history.ledger.sites:
        assert tiny.same_bits(site_weight(live.model, site), before[site.name]), site.name


def test_live_model_is_public() -> None:
    assert "LiveModel" in kvw_ledger.__all__
    assert kvw_ledger.LiveModel is LiveModel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_equals_materialize_on_the_gpu(history: History) -> None:
    reference = load_model(history.ledger.model_info["dir"]).cuda()
    on_gpu = History(history.ledger, history.head, reference)
    live = LiveModel(history.ledger, load_model(history.ledger.model_info["dir"]).cuda())
    for at in range(history.head, 0, -1):
        _check(on_gpu, live, at)
