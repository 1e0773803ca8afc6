"""Models dispatched by accelerate: layers on other devices, offloaded to the CPU or to disk.

accelerate keeps an offloaded layer's parameters on ``meta`` and loads them from its
weights map before each forward. The coefficients, the early stop and the weakening
must read and write the real weights there, and give what the plain model gives.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny
import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes

from kvw_ledger.coefficients import collect
from kvw_ledger.data import Encoder, Record, encode_all, iter_batches
from kvw_ledger.errors import BadInputError
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.offload import parameter_data
from kvw_ledger.sites import discover_sites, site_weight

CONFIG = KVWConfig(gamma=0.5, batch_size=2)
# Layers 0-1 stay on the CPU, 2-3 (and everything after) go to disk.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


def _model() -> torch.nn.Module:
    return tiny.llama(seed=3, hidden_size=32, intermediate_size=64)


def _examples(n: int = 6) -> list:
    encoder = Encoder(tiny.char_tokenizer(), 256)
    records = [Record(r["question"], r["answer"], None, None, f"m{i}") for i, r in enumerate(tiny.qa_records(n))]
    return encode_all(encoder, records)


def _dispatched(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The model dispatched the way accelerate's big-model loading does: what fits in a
    small CPU budget stays there, the rest is offloaded to disk."""
    budget = compute_module_sizes(model)[""] // 2
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": budget}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    return dispatch_model(model, device_map, offload_dir=str(folder))


def test_coefficients_of_a_dispatched_model_equal_the_plain_models(tmp_path: Path) -> None:
    model = _model()
    sites = discover_sites(model)
    examples = _examples()
    plain = collect(model, sites, iter_batches(examples, 2, 0), progress=False).means()
    dispatched = _dispatched(copy.deepcopy(model), tmp_path)
    offloaded = [s for s in sites if dispatched.get_parameter(s.param).device.type == "meta"]
    assert offloaded, "the test needs some site offloaded to disk"
    got = collect(dispatched, sites, iter_batches(examples, 2, 0), progress=False).means()
    diff = max(float((plain[k] - got[k]).abs().max()) for k in plain)
    print(f"device_map coefficients: max abs difference {diff:.3g} over {len(plain)} sites")
    assert diff <= 1e-6
    # The early stop left no offloaded weight loaded: they are all back on meta.
    assert all(dispatched.get_parameter(s.param).device.type == "meta" for s in offloaded)


def test_a_write_to_an_offloaded_weight_reaches_the_next_forward(tmp_path: Path) -> None:
    model = _model()
    dispatched = _dispatched(copy.deepcopy(model), tmp_path)
    site = next(s for s in discover_sites(dispatched) if dispatched.get_parameter(s.param).device.type == "meta")
    real = site_weight(dispatched, site)
    assert real.device.type == "cpu" and torch.equal(real, site_weight(model, site))
    real.mul_(0.5)
    assert site_weight(dispatched, site) is real  # the same tensor each time: writes stay
    # The weight is on meta again once the layer's forward ends, so the output tells.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module = dispatched.get_submodule(site.module)
    handle = module.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    try:
        with torch.no_grad():
            dispatched(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
    finally:
        handle.remove()
    x, out = seen[0]
    expected = torch.nn.functional.linear(x, site_weight(model, site) * 0.5)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, torch.nn.functional.linear(x, site_weight(model, site)), atol=1e-6)


def test_a_meta_parameter_without_an_offload_hook_is_refused_by_name() -> None:
    with torch.device("meta"):
        model = _model()
    with pytest.raises(BadInputError, match=r"model\.layers\.0\.mlp\.down_proj\.weight is on the meta device"):
        parameter_data(model, "model.layers.0.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("offload")
    model_dir = root / "model"
    _model().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(6, offset=20))
    tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(4))
    tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(4, offset=4))
    ledger = Ledger.create(root / "ledger", model_dir, progress=False)
    ledger.retain(root / "retain.jsonl", progress=False)
    return root, model_dir, root / "ledger"


def test_forget_through_device_map_gives_the_plain_exponents(ledgers: tuple[Path, Path, Path]) -> None:
    """Two requests: the second starts from HEAD materialised into offloaded layers."""
    root, _, ledger_dir = ledgers
    results = {}
    for name, device_map in (("plain", None), ("dispatched", DEVICE_MAP)):
        copy_dir = root / f"ledger-{name}"
        import shutil

        shutil.copytree(ledger_dir, copy_dir)
        ledger = Ledger.open(copy_dir)
        ledger.device_map = device_map
        ledger.offload_folder = str(root / f"offload-{name}") if device_map else None
        for request in ("a", "b"):
            ledger.forget(root / f"{request}.jsonl", request_id=request, config=CONFIG, progress=False)
        results[name] = {r: ledger.request_exponents(r) for r in ("a", "b")}
        assert ledger.verify().ok
    diff = max(
        float((results["plain"][r][k] - results["dispatched"][r][k]).abs().max())
        for r in ("a", "b")
        for k in results["plain"][r]
    )
    print(f"device_map forget: max abs exponent difference {diff:.3g}")
    assert diff <= 1e-6
    assert any(bool(w.any()) for w in results["dispatched"]["b"].values())


def test_load_through_device_map_materialises_into_offloaded_layers(ledgers: tuple[Path, Path, Path]) -> None:
    root, _, ledger_dir = ledgers
    ledger = Ledger.open(ledger_dir)
    ledger.forget(root / "a.jsonl", request_id="load-a", config=CONFIG, progress=False)
    plain, _ = ledger.load(progress=False)
    ledger.device_map = DEVICE_MAP
    dispatched, _ = ledger.load(progress=False)
    offloaded = [s for s in ledger.sites if dispatched.get_parameter(s.param).device.type == "meta"]
    assert offloaded
    for site in ledger.sites:
        assert tiny.same_bits(site_weight(dispatched, site), site_weight(plain, site)), site.name


def test_cli_forget_with_device_map_equals_the_plain_forget(ledgers: tuple[Path, Path, Path]) -> None:
    import shutil

    from click.testing import CliRunner

    from kvw_ledger.cli import main

    root, _, ledger_dir = ledgers
    exponents = {}
    for name, extra in (("cli-plain", []), ("cli-mapped", ["--device-map", "sequential", "--offload-folder", str(root / "off")])):
        target = root / name
        shutil.copytree(ledger_dir, target)
        result = CliRunner().invoke(
            main, ["forget", str(target), str(root / "a.jsonl"), "--id", "c", "--batch-size", "2", "--gamma", "0.5", "-q", *extra]
        )
        assert result.exit_code == 0, result.output
        exponents[name] = Ledger.open(target).request_exponents("c")
    for site, w in exponents["cli-plain"].items():
        assert torch.equal(w, exponents["cli-mapped"][site]), site
