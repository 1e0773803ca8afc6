"""--device and --dtype: checked names, clean refusals, and what a dtype other than the
checkpoint's means (the base and exports stay in the checkpoint's dtype, bit-exact;
the loaded model holds base * exp(-w) computed in float32 and cast once into its dtype).

Everything runs on the CPU; the CUDA refusals are tested where torch sees no GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors import safe_open

from kvw_ledger import weights
from kvw_ledger.cli import main
from kvw_ledger.devices import Placement
from kvw_ledger.errors import BadInputError
from kvw_ledger.ledger import Ledger
from kvw_ledger.sites import site_weight

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")


def test_auto_is_the_first_gpu_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Placement.resolve() == Placement(torch.device("cpu"), None)
    assert Placement.resolve("auto", "auto").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Placement.resolve().device == torch.device("cuda", 0)
    assert Placement.resolve("CUDA:1").device == torch.device("cuda", 1)
    assert Placement.resolve("cuda").device == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cuda:-1", "cuda:1:2", "", "mps"])
def test_an_unknown_device_names_the_option(name: str) -> None:
    with pytest.raises(BadInputError, match=r"--device .* is not one of auto\|cpu\|cuda\[:N\]"):
        Placement.resolve(name)


@no_gpu
def test_cuda_without_a_gpu_says_what_to_do() -> None:
    with pytest.raises(BadInputError, match=r"--device cuda: torch sees no CUDA GPU.*pass --device cpu"):
        Placement.resolve("cuda")


def test_a_gpu_index_torch_does_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BadInputError, match=r"--device cuda:7: torch sees 1 GPU\(s\), cuda:0\.\.cuda:0"):
        Placement.resolve("cuda:7")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("auto", None), (None, None), ("bfloat16", torch.bfloat16), ("Float16", torch.float16),
     ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_dtype_names(name: str | torch.dtype | None, dtype: torch.dtype | None) -> None:
    assert Placement.resolve("cpu", name).dtype == dtype


@pytest.mark.parametrize("name", ["bf16", "float64", "int8", "half", torch.float64])
def test_an_unknown_dtype_names_the_option(name: str | torch.dtype) -> None:
    with pytest.raises(BadInputError, match=r"--dtype .* is not one of auto, bfloat16, float16, float32"):
        Placement.resolve("cpu", name)


# --- through the CLI and the ledger -------------------------------------------------------


def _cli(*args: str | Path, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bfloat16 checkpoint with a ledger: init, retain, and forget A run in float32."""
    root = tmp_path_factory.mktemp("bf16")
    model_dir = root / "model"
    tiny.llama().to(torch.bfloat16).save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    paths = {
        "root": root,
        "model": model_dir,
        "ledger": root / "led",
        "retain": tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40)),
        "forget": tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(3, 0)),
    }
    _cli("init", paths["ledger"], "--model", model_dir, "-q")
    _cli("retain", paths["ledger"], paths["retain"], "--device", "cpu", "--dtype", "float32", "-q")
    _cli("forget", paths["ledger"], paths["forget"], "--id", "A", "--gamma", "2.0", "--layers", "0:3",
         "--device", "cpu", "--dtype", "float32", "--on-fail", "warn", "-q")  # fmt: skip
    return paths


@no_gpu
@pytest.mark.parametrize("verb", ["retain", "forget", "probe", "tune", "rederive", "revert"])
def test_every_model_verb_refuses_cuda_without_a_gpu_with_exit_2(bf16: dict[str, Path], verb: str) -> None:
    led, data = bf16["ledger"], bf16["retain"]
    args = {
        "retain": [led, data],
        "forget": [led, data, "--id", "nope"],
        "probe": [led, "--retain", data],
        "tune": [led, data, data],
        "rederive": [led, "--retain-stats", "retain-2"],
        "revert": [led, "A"],
    }[verb]
    before = sorted((led / "journal").iterdir())
    out = _cli(verb, *args, "--device", "cuda", code=2)
    assert "--device cuda: torch sees no CUDA GPU" in out
    assert "--dtype bf16 is not one of" not in out
    out = _cli(verb, *args, "--device", "cpu", "--dtype", "bf16", code=2)
    assert "Error: --dtype 'bf16' is not one of auto, bfloat16, float16, float32" in out
    assert sorted((led / "journal").iterdir()) == before  # nothing written


def _file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def test_float32_on_a_bfloat16_checkpoint_keeps_base_and_export_in_bfloat16(bf16: dict[str, Path]) -> None:
    ledger = Ledger.open(bf16["ledger"])
    original = _file_tensors(bf16["model"])
    exponents = ledger.exponents()
    assert any(bool((w > 0).any()) for w in exponents.values()), "nothing was weakened"
    for site in ledger.sites:
        base = ledger.base(site.name)
        assert tiny.same_bits(base, original[ledger.locations[site.name].key])  # bfloat16, as in the files

    model32, _ = ledger.load(device="cpu", dtype="float32")
    model16, _ = ledger.load(device="cpu")  # auto: the checkpoint's own dtype
    rounded_apart = 0
    for site in ledger.sites:
        base, w = ledger.base(site.name), exponents[site.name]
        exact = base.float() * torch.exp(-w).unsqueeze(0)  # (d_model, d_ff) in float32
        assert tiny.same_bits(site_weight(model32, site), exact), site.name  # never rounded via bf16
        assert tiny.same_bits(site_weight(model16, site), exact.to(torch.bfloat16)), site.name
        rounded_apart += int((exact.to(torch.bfloat16).float() != exact).sum())
    assert rounded_apart > 0  # so the float32 model really is not the bfloat16 one widened

    out = bf16["root"] / "export"
    ledger.export(out, progress=False)
    exported = _file_tensors(out)
    sites = {ledger.locations[s.name].key: s for s in ledger.sites}
    for key, tensor in original.items():
        got = exported[key]
        assert got.dtype == torch.bfloat16
        if key in sites:
            want = (tensor.float() * torch.exp(-exponents[sites[key].name]).unsqueeze(0)).to(torch.bfloat16)
            assert tiny.same_bits(got, want), key
        else:
            assert tiny.same_bits(got, tensor), key
    assert ledger.verify().ok


def test_bfloat16_on_a_float32_checkpoint_rounds_once_from_the_float32_base(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny.llama().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    led = tmp_path / "led"
    _cli("init", led, "--model", model_dir, "-q")
    _cli("retain", led, tiny.write_jsonl(tmp_path / "r.jsonl", tiny.qa_records(4, 40)), "--dtype", "bfloat16",
         "--device", "cpu", "-q")  # fmt: skip
    _cli("forget", led, tiny.write_jsonl(tmp_path / "f.jsonl", tiny.qa_records(2, 0)), "--id", "A",
         "--gamma", "2.0", "--layers", "0:3", "--dtype", "bfloat16", "--device", "cpu", "--on-fail", "warn", "-q")  # fmt: skip
    ledger = Ledger.open(led)
    model, _ = ledger.load(device="cpu", dtype=torch.bfloat16)
    for site in ledger.sites:
        base = ledger.base(site.name)
        assert base.dtype == torch.float32
        want = (base * torch.exp(-ledger.exponents()[site.name]).unsqueeze(0)).to(torch.bfloat16)
        assert tiny.same_bits(site_weight(model, site), want), site.name
    # The first request took its bases from the store, not from the bfloat16 weights.
    assert not weights.holds_base_dtype(ledger, model)
    assert weights.holds_base_dtype(ledger, ledger.load(device="cpu")[0])


def test_help_of_every_model_verb_shows_device_and_dtype() -> None:
    for verb in ("retain", "forget", "probe", "tune", "rederive", "revert"):
        out = _cli(verb, "--help")
        assert "--device auto|cpu|cuda[:N]" in out and "--dtype auto|bfloat16|float16|float32" in out, verb
