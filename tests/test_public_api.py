"""The package's public names (kvw_ledger/__init__.py), its type hints, and typed limits."""

from __future__ import annotations

import importlib.resources
import inspect
import tomllib
from pathlib import Path

import pytest
import tiny

import kvw_ledger
from kvw_ledger import errors
from kvw_ledger.ledger import Ledger
from kvw_ledger.stability import StabilityLimits

ROOT = Path(__file__).resolve().parents[1]


def test_every_name_in_all_resolves_to_the_object_its_module_defines() -> None:
    for name in kvw_ledger.__all__:
        value = getattr(kvw_ledger, name)
        if name != "__version__":
            assert value.__name__ == name, name
    assert kvw_ledger.StabilityLimits is StabilityLimits and kvw_ledger.Ledger is Ledger
    assert set(kvw_ledger.__all__) <= set(dir(kvw_ledger))


def test_the_issue_names_and_every_error_class_are_exported() -> None:
    wanted = {"StabilityLimits", "Entry", "VerifyReport", "LedgerState"}
    wanted |= {
        name for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.KVWLedgerError)
    }
    assert wanted <= set(kvw_ledger.__all__)
    assert kvw_ledger.StabilityCheckError is errors.StabilityCheckError


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = kvw_ledger.Nope  # type: ignore[attr-defined]


def test_py_typed_ships_with_the_package() -> None:
    assert importlib.resources.files("kvw_ledger").joinpath("py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["kvw_ledger"]


# --- typed stability limits --------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    root = tmp_path_factory.mktemp("api")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    made = Ledger.create(root / "led", root / "model", progress=False)
    made.retain(tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(3, 40)), progress=False)
    tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(1))
    return made


def test_limits_are_the_defaults_then_the_ledgers_then_the_ones_given(ledger: Ledger) -> None:
    assert ledger.limits() == StabilityLimits()
    entry = ledger.probe(limits=ledger.limits(max_attenuation=0.2), progress=False)
    assert entry.body["limits"] == {"max_attenuation": 0.2}  # only what changed is recorded
    assert ledger.limits() == StabilityLimits(max_attenuation=0.2)
    assert ledger.limits(on_fail="warn") == StabilityLimits(max_attenuation=0.2, on_fail="warn")
    with pytest.raises(errors.BadInputError, match="--max-attenuation must be in"):
        ledger.limits(max_attenuation=2.0)


def test_a_mapping_is_refused_before_anything_is_read(ledger: Ledger) -> None:
    data = ledger.path.parent / "a.jsonl"
    before = [e.hash for e in ledger.entries()]
    for call in (
        lambda: ledger.forget(data, limits={"on_fail": "warn"}, progress=False),  # type: ignore[arg-type]
        lambda: ledger.probe(limits={"max_attenuation": 0.3}, progress=False),  # type: ignore[arg-type]
        lambda: ledger.revert("nobody", limits={"on_fail": "warn"}, progress=False),  # type: ignore[arg-type]
    ):
        with pytest.raises(errors.BadInputError, match="limits must be a StabilityLimits, not dict"):
            call()
    assert [e.hash for e in ledger.entries()] == before


def test_given_limits_are_the_whole_set_checked(ledger: Ledger) -> None:
    data = ledger.path.parent / "a.jsonl"
    with pytest.raises(errors.StabilityCheckError, match=r"\(limit 0.0001\) FAILED"):
        ledger.forget(data, request_id="x", limits=StabilityLimits(max_attenuation=0.0001), progress=False)
    entry = ledger.forget(
        data, request_id="y", limits=StabilityLimits(max_attenuation=0.0001, on_fail="warn"), progress=False
    )
    assert entry.body["stability"]["on_fail"] == "warn" and not entry.body["stability"]["passed"]
