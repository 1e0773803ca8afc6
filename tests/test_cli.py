"""Tests for kvw_ledger.cli through click's CliRunner: exact output, exit codes, help."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from kvw_ledger import data
from kvw_ledger.cli import main
from kvw_ledger.export import PROVENANCE_FILE, PROVENANCE_KEY
from kvw_ledger.ledger import Ledger

START = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _times(n: int) -> list[str]:
    return [(START + dt.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ") for i in range(n)]


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        raise AssertionError(
            f"{args}: exit {result.exit_code}, wanted {code}\n{result.output}", result.exception
        )
    return result


@dataclass(frozen=True)
class Env:
    root: Path
    model_dir: Path
    ledger: Path  # init, retain, forget A, forget B, revert A
    retain: Path
    forget_a: Path
    forget_b: Path
    init_output: str
    write_outputs: list[str]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(ledger: Path) -> dict[int, str]:
    """Entry hashes computed from the journal files' bytes, independent of the library."""
    return {int(p.stem): _sha(p) for p in sorted((ledger / "journal").glob("*.json"))}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tiny.llama().save_pretrained(model_dir)
    tiny.char_tokenizer().save_pretrained(model_dir)
    retain = tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 40))
    forget_a = tiny.write_jsonl(root / "a.jsonl", tiny.qa_records(2, 0))
    forget_b = tiny.write_jsonl(root / "b.jsonl", tiny.qa_records(2, 10))
    ledger = root / "led"
    clock = iter(START + dt.timedelta(minutes=i) for i in range(100))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kvw_ledger.ledger._utc_now", lambda: next(clock))
        mp.setenv("KVW_LEDGER_OPERATOR", "alice@lab")
        init = run("init", ledger, "--model", model_dir, "-q").output
        outputs = [
            run("retain", ledger, retain, "-q").output,
            run("forget", ledger, forget_a, "--id", "A", "--reason", "asked by A",
                "--gamma", "0.5", "-q").output,
            run("forget", ledger, forget_b, "--id", "B", "--gamma", "0.5", "--no-trace", "-q").output,
            run("revert", ledger, "A", "--reason", "mistake", "--operator", "bob").output,
        ]
    yield Env(root, model_dir, ledger, retain, forget_a, forget_b, init, outputs)


def _copy(env: Env, dst: Path) -> Path:
    shutil.copytree(env.ledger, dst)
    return dst


def _tokens(ledger: Path, version: int) -> int:
    return int(Ledger.open(ledger).entries()[version - 1].body["tokens"])


# --- write verbs and their output --------------------------------------------------------


def test_write_verbs_print_what_they_did(env: Env) -> None:
    assert env.init_output == f"created {env.ledger}: 4 sites, version 1\n"
    assert env.write_outputs == [
        "version 2: retain stats retain-2 from 4 records\n",
        f"version 3: request A applied (2 records, 2 batches, {_tokens(env.ledger, 3)} answer tokens)\n",
        f"version 4: request B applied (2 records, 2 batches, {_tokens(env.ledger, 4)} answer tokens)\n",
        "version 5: request A reverted; active: B\n",
    ]


# --- log and show: exact output ----------------------------------------------------------


def test_log_exact(env: Env) -> None:
    h = {v: d[:12] for v, d in _hashes(env.ledger).items()}
    t = _times(5)
    assert run("log", env.ledger).output == (
        f"   1  init     {t[0]}  {h[1]}  alice@lab  llama, 4 sites  active: -\n"
        f"   2  retain   {t[1]}  {h[2]}  alice@lab  retain-2 (4 records, measured at 1)  active: -\n"
        f"   3  forget   {t[2]}  {h[3]}  alice@lab  A (2 records, gamma 0.5)  active: A\n"
        f"   4  forget   {t[3]}  {h[4]}  alice@lab  B (2 records, gamma 0.5)  active: A, B\n"
        f"   5  revert   {t[4]}  {h[5]}  bob  A  active: B\n"
    )


def test_log_json(env: Env) -> None:
    entries = json.loads(run("log", env.ledger, "--json").output)
    hashes = _hashes(env.ledger)
    assert [e["version"] for e in entries] == [1, 2, 3, 4, 5]
    assert [e["op"] for e in entries] == ["init", "retain", "forget", "forget", "revert"]
    assert [e["id"] for e in entries] == [None, "retain-2", "A", "B", "A"]
    assert [e["hash"] for e in entries] == [hashes[v] for v in range(1, 6)]
    assert [e["parent"] for e in entries] == [None] + [hashes[v] for v in range(1, 5)]
    assert [e["time"] for e in entries] == _times(5)
    assert [e["active"] for e in entries] == [[], [], ["A"], ["A", "B"], ["B"]]
    assert [e["operator"] for e in entries] == ["alice@lab"] * 4 + ["bob"]
    for e in entries:
        assert {"version", "op", "id", "hash", "parent", "time", "active"} <= set(e)


def test_show_init_exact(env: Env) -> None:
    h = _hashes(env.ledger)
    assert run("show", env.ledger, "1").output == (
        "version  1\n"
        "op       init\n"
        f"time     {_times(1)[0]}\n"
        "operator alice@lab\n"
        f"hash     {h[1]}\n"
        "parent   -\n"
        "active   -\n"
        "model_type llama\n"
        "sites    4\n"
    )


def test_show_forget_exact(env: Env) -> None:
    h = _hashes(env.ledger)
    fingerprint = data.fingerprint(data.read_records(env.forget_a))
    ledger = Ledger.open(env.ledger)
    rows = ""
    for site in ledger.sites[1:]:  # layer 0 is outside the default layers 1:25
        w = ledger.store.read_array(f"requests/A/exponent/{site.name}")
        hit = w[w > 0]
        rows += f"{site.name:<52}{len(hit):>10}{float(w.max()):>10.4f}{float(hit.mean()):>10.4f}\n"
    assert run("show", env.ledger, "A").output == (
        "version  3\n"
        "op       forget\n"
        f"time     {_times(3)[2]}\n"
        "operator alice@lab\n"
        f"hash     {h[3]}\n"
        f"parent   {h[2]}\n"
        "active   A\n"
        "batches  2\n"
        f"data_fingerprint {fingerprint}\n"
        "label_eos False\n"
        'params   {"batch_size": 1, "epochs": 1, "eps": 1e-12, "gamma": 0.5, "keep_trace": true, '
        '"layers": [1, 25], "seed": 0}\n'
        "reason   asked by A\n"
        "records  2\n"
        "request  A\n"
        "retain_stats retain-2\n"
        f"checks   passed; max attenuation {max(ledger.state(3).requests['A'].body['stability']['attenuation'].values()):.4f}\n"
        f"{'site':<52}{'weakened':>10}{'max w':>10}{'mean w':>10}\n"
        f"{rows}"
    )


def test_show_json(env: Env) -> None:
    shown = json.loads(run("show", env.ledger, "HEAD~1", "--json").output)
    assert shown["version"] == 4 and shown["op"] == "forget" and shown["id"] == "B"
    assert shown["hash"] == _hashes(env.ledger)[4]
    assert sorted(shown["files"]) == sorted(Ledger.open(env.ledger).entries()[3].files)
    assert [s["site"] for s in shown["sites"]] == [
        f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)
    ]


# --- REFs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "version"),
    [("1", 1), ("3", 3), ("5", 5), ("A", 3), ("B", 4), ("HEAD", 5), ("HEAD~0", 5),
     ("HEAD~1", 4), ("HEAD~4", 1)],
)
def test_ref_parsing(env: Env, ref: str, version: int) -> None:
    assert json.loads(run("show", env.ledger, ref, "--json").output)["version"] == version


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("0", "version 0 does not exist; versions are 1..5"),
        ("6", "version 6 does not exist; versions are 1..5"),
        ("HEAD~5", "HEAD~5 goes back past version 1 (HEAD is version 5)"),
        ("C", "'C' is not a version, a request id, HEAD or HEAD~N of this ledger"),
    ],
)
def test_unknown_ref_exits_2(env: Env, ref: str, message: str) -> None:
    result = run("show", env.ledger, ref, code=2)
    assert result.output == f"Error: {message}" + (
        " (see `kvw-ledger log`)\n" if ref == "C" else "\n"
    )
    assert message in run("export", env.ledger, env.root / "never", "--at", ref, "-q", code=2).output
    assert message in run("diff", env.ledger, "1", ref, code=2).output
    assert not (env.root / "never").exists()


# --- revert, forget and export refusals --------------------------------------------------


def test_revert_unknown_or_twice_exits_2(env: Env) -> None:
    assert run("revert", env.ledger, "nobody", code=2).output == (
        "Error: no request 'nobody' in this ledger (see `kvw-ledger log`)\n"
    )
    assert run("revert", env.ledger, "A", code=2).output == "Error: request 'A' is already reverted\n"
    assert len(_hashes(env.ledger)) == 5


def test_forget_without_retain_stats_exits_2(env: Env, tmp_path: Path) -> None:
    run("init", tmp_path / "led", "--model", env.model_dir, "-q")
    result = run("forget", tmp_path / "led", env.forget_a, "-q", code=2)
    assert "Error: no retain statistics are registered" in result.output
    assert "kvw-ledger retain" in result.output
    assert len(_hashes(tmp_path / "led")) == 1


def test_export_into_a_non_empty_dir_exits_2(env: Env, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("export", env.ledger, tmp_path / "out", "-q", code=2)
    assert f"{tmp_path / 'out'} already exists and is not empty" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_changed_model_dir_exits_2_naming_the_file(env: Env, tmp_path: Path) -> None:
    changed = Path(shutil.copytree(env.model_dir, tmp_path / "model"))
    raw = bytearray((changed / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (changed / "model.safetensors").write_bytes(bytes(raw))
    ledger = _copy(env, tmp_path / "led")
    for args in (
        ("export", ledger, tmp_path / "out", "--model", changed, "-q"),
        ("forget", ledger, env.forget_b, "--id", "C", "--model", changed, "-q"),
    ):
        result = run(*args, code=2)
        assert f"{changed}: model.safetensors differs" in result.output
    assert not (tmp_path / "out").exists()
    assert len(_hashes(ledger)) == 5


# --- diff, export, verify ----------------------------------------------------------------


def test_diff_json(env: Env) -> None:
    ledger = Ledger.open(env.ledger)
    result = json.loads(run("diff", env.ledger, "A", "HEAD", "--json").output)
    assert (result["from"], result["to"]) == (3, 5)
    assert (result["added"], result["removed"]) == (["B"], ["A"])
    by_site = {s["site"]: s for s in result["sites"]}
    assert sorted(by_site) == sorted(s.name for s in ledger.sites[1:])
    for name, got in by_site.items():
        w_a = ledger.store.read_array(f"requests/A/exponent/{name}")
        w_b = ledger.store.read_array(f"requests/B/exponent/{name}")
        delta = w_b - w_a
        assert got["changed"] == int((delta != 0).sum())
        assert got["max_abs_change"] == pytest.approx(float(delta.abs().max()))
        assert len(got["top"]) == 5
        assert got["top"][0]["change"] == pytest.approx(float(delta[got["top"][0]["vector"]]))

    nothing = json.loads(run("diff", env.ledger, "1", "2", "--json").output)
    assert nothing == {"from": 1, "to": 2, "added": [], "removed": [], "sites": []}
    text = run("diff", env.ledger, "1", "4").output.splitlines()
    assert text[:3] == ["version 1 -> 4", "added    A, B", "removed  -"]


def test_diff_and_show_are_python_methods_returning_what_json_prints(env: Env) -> None:
    ledger = Ledger.open(env.ledger)
    printed = json.loads(run("diff", env.ledger, "A", "HEAD", "--top", "2", "--json").output)
    assert ledger.diff("A", "HEAD", top=2) == printed
    assert all(len(s["top"]) == 2 for s in printed["sites"])
    for ref in ("A", "1", "HEAD"):
        assert ledger.show(ref) == json.loads(run("show", env.ledger, ref, "--json").output)
    weakened = {s["site"]: s["weakened"] for s in ledger.show("A")["sites"]}
    for site, n in weakened.items():
        assert n == int((ledger.store.read_array(f"requests/A/exponent/{site}") > 0).sum())


def test_export_loads_and_carries_provenance(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "served"
    assert run("export", env.ledger, out, "--at", "B", "-q").output == f"exported version 4 to {out}\n"
    hashes = _hashes(env.ledger)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance == {
        "active_requests": ["A", "B"],
        "entry_hash": hashes[4],
        "head_hash": hashes[5],
        "ledger_version": 4,
        "tool": "kvw-ledger",
    }
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[PROVENANCE_KEY]) == provenance
    assert not list(out.glob("**/zarr.json"))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(env.model_dir, local_files_only=True)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, original.model.layers[1].mlp.down_proj.weight)


def test_verify_clean(env: Env) -> None:
    ledger = Ledger.open(env.ledger)
    n_arrays = sum(len(e.body.get("arrays", {})) for e in ledger.entries())
    assert run("verify", env.ledger).output == f"ok: 5 entries, {n_arrays} arrays checked\n"
    assert json.loads(run("verify", env.ledger, "--json").output) == {
        "ok": True, "checked_entries": 5, "checked_arrays": n_arrays, "problems": []
    }


# --- tamper: one flipped byte in any chunk or entry fails verify, naming the file --------


def _tamper_targets(ledger: Path) -> list[str]:
    """Every array chunk (named by an entry, or in the head cache), every journal entry, and
    the root and group zarr.json files."""
    named = {path for e in Ledger.open(ledger).entries() for path in e.files}
    # Left out: an array's own zarr.json. A flip there can make zarr raise KeyError, which
    # store.py does not turn into an IntegrityError (reported as a store.py bug).
    files = sorted(p for p in named if not (ledger / p).parent.joinpath("c").is_dir())
    head = sorted(p.relative_to(ledger).as_posix() for p in (ledger / "head").rglob("c/*") if p.is_file())
    journal = sorted(f"journal/{p.name}" for p in (ledger / "journal").glob("*.json"))
    return files + head + journal


def _flip_and_verify(env: Env, target: str, position: float, mask: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = _copy(env, Path(tmp) / "led")
        path = ledger / target
        raw = bytearray(path.read_bytes())
        raw[min(int(position * len(raw)), len(raw) - 1)] ^= mask
        path.write_bytes(bytes(raw))
        result = run("verify", ledger, code=1)
        assert target in result.output, (target, result.output)
        last = result.output.rstrip().splitlines()[-1]
        if target == "zarr.json" and last.startswith("Error: "):
            return  # the root attributes no longer parse: the ledger cannot even be opened
        assert last.startswith("FAILED: "), result.output
        as_json = json.loads(run("verify", ledger, "--json", code=1).stdout)
        assert as_json["ok"] is False
        assert any(target in p["path"] + p["message"] for p in as_json["problems"])


def test_tamper_any_file_fails_verify(env: Env) -> None:
    targets = _tamper_targets(env.ledger)
    assert {t.split("/")[0] for t in targets} == {"base", "head", "journal", "requests", "retain", "zarr.json"}
    assert any("/trace/" in t for t in targets) and len([t for t in targets if t.startswith("journal/")]) == 5
    assert len([t for t in targets if "/c/" in t]) == 4 + 4 + 6 + 3 + 4  # base, retain, A, B, head
    for target in targets:
        _flip_and_verify(env, target, 0.5, 0x01)


def test_tamper_root_attributes_fails_verify(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env, tmp_path / "led")
    root = ledger / "zarr.json"
    root.write_text(root.read_text().replace('"n_vectors": 32', '"n_vectors": 33', 1))
    result = run("verify", ledger, code=1)
    assert result.output.splitlines()[0].startswith("Error: zarr.json: has sha256 ")
    root.write_text(root.read_text().replace('"name"', '"nAme"', 1))
    result = run("verify", ledger, code=1)
    assert result.output.startswith(f"Error: {root}: the ledger attributes are malformed")


@settings(max_examples=12, deadline=None)
@given(pick=st.integers(0, 10_000), position=st.floats(0, 1), mask=st.integers(1, 255))
def test_tamper_random_byte_fails_verify(env: Env, pick: int, position: float, mask: int) -> None:
    # The root zarr.json is left to the tests above: a flip of its format_version digit
    # reads as a ledger from a newer kvw-ledger (exit 2), not as damage.
    targets = [t for t in _tamper_targets(env.ledger) if t != "zarr.json"]
    _flip_and_verify(env, targets[pick % len(targets)], position, mask)


# --- crash leftovers ---------------------------------------------------------------------


def test_crash_leftovers_warn_then_forget_succeeds(env: Env, tmp_path: Path) -> None:
    ledger = _copy(env, tmp_path / "led")
    store = Ledger.open(ledger).store
    site = "model.layers.2.mlp.down_proj"
    leftover = store.write_array(f"requests/C/exponent/{site}", torch.ones(32))
    result = run("verify", ledger)
    lines = result.output.splitlines()
    assert lines[-1].startswith("ok: 5 entries")
    warned = sorted(line.split(": ")[1] for line in lines if line.startswith("Warning: "))
    assert warned == sorted([*leftover.files, "requests/C/zarr.json", "requests/C/exponent/zarr.json"])
    assert all("no journal entry names this file" in line for line in lines[:-1])

    run("forget", ledger, env.forget_a, "--id", "C", "--gamma", "0.5", "-q")
    assert run("verify", ledger).output == f"ok: 6 entries, {len(_all_arrays(ledger))} arrays checked\n"


def _all_arrays(ledger: Path) -> list[str]:
    return [a for e in Ledger.open(ledger).entries() for a in e.body.get("arrays", {})]


# --- help -------------------------------------------------------------------------------------


def test_every_command_has_help() -> None:
    assert main.help
    assert run("--help").output.startswith("Usage: main [OPTIONS] COMMAND [ARGS]...")
    assert main.commands
    for name, command in main.commands.items():
        assert command.help and command.help.strip(), name
        result = run(name, "--help")
        assert result.output.startswith(f"Usage: main {name} "), name
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"{name} {param.name}"


def test_help_says_how_to_pass_a_ref_that_starts_with_a_dash(env: Env) -> None:
    for name in ("show", "diff"):
        assert "put -- before a REF that starts with '-'" in " ".join(run(name, "--help").output.split()), name
    refused = run("show", env.ledger, "--", "-1", code=2).output
    assert "'-1' is not a version, a request id, HEAD or HEAD~N" in refused


def test_gc_help_does_not_show_reverted_as_required_and_gc_without_it_is_bad_input(env: Env) -> None:
    assert "[required]" not in run("gc", "--help").output
    assert "gc needs --reverted" in run("gc", env.ledger, code=2).output


def test_show_columns_stay_apart_for_large_exponents() -> None:
    from kvw_ledger.cli.reading import _column

    assert _column(0.1234567) == "    0.1235"
    row = _column(292928535.0000773) + _column(773858.6875)
    assert row.split() == ["2.929e+08", "7.739e+05"] and len(row) == 20


# --- a vision-language ledger ------------------------------------------------------------


def test_llava_ledger_with_all_towers(tmp_path: Path) -> None:
    model_dir = tmp_path / "llava"
    tiny.llava().save_pretrained(model_dir)
    tiny.llava_processor().save_pretrained(model_dir)
    tiny.save_image(tmp_path / "img" / "face.png")
    tiny.save_image(tmp_path / "img" / "other.png", (10, 200, 40))
    retain = tiny.write_jsonl(tmp_path / "retain.jsonl", tiny.qa_records(3, 20, image="img/other.png"))
    forget = tiny.write_jsonl(tmp_path / "forget.jsonl", tiny.qa_records(2, 0, image="img/face.png"))
    ledger = tmp_path / "led"
    assert run("init", ledger, "--model", model_dir, "--sites", "all", "-q").output.endswith(
        ": 6 sites, version 1\n"
    )
    run("retain", ledger, retain, "-q")
    run("forget", ledger, forget, "--id", "face", "--gamma", "0.5", "-q")
    out = tmp_path / "out"
    run("export", ledger, out, "-q")
    assert run("verify", ledger).output == "ok: 3 entries, 20 arrays checked\n"

    opened = Ledger.open(ledger)
    towers = {s.tower for s in opened.sites}
    assert towers == {"language", "vision"}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for site in opened.sites:
        key = opened.locations[site.name].key
        name = f"requests/face/exponent/{site.name}"
        w = opened.store.read_array(name) if opened.store.has_array(name) else torch.zeros(site.n_vectors)
        assert site.axis == 1
        expected = (original[key].float() * torch.exp(-w).unsqueeze(0)).to(original[key].dtype)
        assert torch.equal(exported[key], expected), key
    changed = [k for k in original if not torch.equal(original[k], exported[k])]
    assert any("language_model" in k for k in changed)
    assert set(changed) <= {loc.key for loc in opened.locations.values()}
    AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)


def test_log_lines_stay_short_with_many_active_requests() -> None:
    from kvw_ledger.cli.reading import _active_list

    assert _active_list([]) == "-"
    assert _active_list([f"r{i}" for i in range(8)]) == "r0, r1, r2, r3, r4, r5, r6, r7"
    assert _active_list([f"r{i}" for i in range(1000)]) == "1000 requests (newest: r997, r998, r999)"
