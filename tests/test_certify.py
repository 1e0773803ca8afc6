"""Erasure certificates: content, signatures, checks against the ledger, no forget data."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import tiny
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open

from kvw_ledger import data
from kvw_ledger.audit import audit
from kvw_ledger.certify import check_certificate
from kvw_ledger.cli import main
from kvw_ledger.errors import IntegrityError
from kvw_ledger.journal import canonical_json
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def keypair(root: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = root / f"{name}.pem"
    public = root / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cert")
    tiny.llama().save_pretrained(root / "model")
    tiny.char_tokenizer().save_pretrained(root / "model")
    forget = tiny.qa_records(4)
    for i, r in enumerate(forget):
        r["person"] = f"p{i % 2}"
    paths: dict[str, Any] = {
        "root": root,
        "forget": tiny.write_jsonl(root / "forget.jsonl", forget),
        "relearn": tiny.write_jsonl(root / "relearn.jsonl", forget[:1]),
        "other": tiny.write_jsonl(root / "other.jsonl", tiny.qa_records(2, 20)),
        "ledger": root / "led",
    }
    tiny.write_jsonl(root / "retain.jsonl", tiny.qa_records(4, 30))
    ledger = Ledger.create(paths["ledger"], root / "model", progress=False, operator="alice")
    ledger.operator = "alice"
    ledger.retain(root / "retain.jsonl", progress=False)
    config = KVWConfig(gamma=0.5, layers=(0, 3))
    ledger.forget(paths["forget"], request_id="a", reason="GDPR art. 17, ticket 9", config=config,
                  limits=ledger.limits(on_fail="warn"), progress=False)
    ledger.forget(paths["other"], request_id="b", config=config, limits=ledger.limits(on_fail="warn"), progress=False)
    ledger.operator = "auditor"
    audit(ledger, "a", paths["forget"], quantize=("int4",), relearn_data=paths["relearn"],
          relearn_steps=2, progress=False)
    ledger.operator = "bob"
    ledger.revert("b", reason="withdrawn", progress=False)
    paths["private"], paths["public"] = keypair(root, "issuer")
    paths["cert"] = root / "a.json"
    run("certify", paths["ledger"], "a", "--out", paths["cert"], "--markdown", root / "a.md",
        "--sign-key", paths["private"], "--operator", "issuer", "-q")
    return paths


def test_certificate_states_what_who_when_and_the_hashes(env: dict[str, Any]) -> None:
    cert = json.loads(env["cert"].read_text())
    ledger = Ledger.open(env["ledger"])
    entries = ledger.entries()
    assert env["cert"].read_text().splitlines()[0].startswith('{"statement": "ERASURE IN EFFECT: request a')
    assert cert["status"] == "active" and cert["issued_by"] == "issuer"
    assert cert["request"] == {
        "id": "a", "reason": "GDPR art. 17, ticket 9",
        "data_fingerprint": data.fingerprint(data.read_records(env["forget"])), "records": 4,
    }
    assert [(e["version"], e["op"], e["operator"]) for e in cert["entries"]] == [(3, "forget", "alice"), (5, "audit", "auditor")]
    assert [e["hash"] for e in cert["entries"]] == [entries[2].hash, entries[4].hash]
    assert [e["time"] for e in cert["entries"]] == [entries[2].time, entries[4].time]
    led = cert["ledger"]
    assert led["entry_hash"] == entries[2].hash and led["head_hash"] == entries[-1].hash
    assert led["head_version"] == 6
    assert led["arrays"] == entries[2].body["arrays"] and any("/exponent/" in a for a in led["arrays"])
    assert led["versions"] == {"active": [[3, 6]], "reverted": None, "garbage_collected": None}
    assert cert["model"]["fingerprint_before"] == ledger.model_info["fingerprint"]
    assert cert["checks"]["stability"] == entries[2].body["stability"]
    assert cert["checks"]["audit"]["entry_version"] == 5
    assert cert["checks"]["audit"]["results"]["quantized"]["int4"]["resurfacing"]
    assert cert["signature"]["algorithm"] == "ed25519"
    assert (env["root"] / "a.md").read_text().startswith("**ERASURE IN EFFECT: request a")


def test_weight_hashes_are_those_of_an_export(env: dict[str, Any], tmp_path: Path) -> None:
    cert = json.loads(env["cert"].read_text())
    out = tmp_path / "export"
    assert Ledger.open(env["ledger"]).export(out, at=6, progress=False) == 6
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        exported = {k: hashlib.sha256(tiny.bits(fh.get_tensor(k)).numpy().tobytes()).hexdigest()
                    for k in fh.keys()}  # noqa: SIM118
    assert cert["model"]["after"]["tensors"] == exported
    base = tiny.file_tensors(env["root"] / "model")
    site = "model.layers.1.mlp.down_proj.weight"
    assert exported[site] != hashlib.sha256(tiny.bits(base[site]).numpy().tobytes()).hexdigest()


def test_certificate_never_contains_forget_data(env: dict[str, Any]) -> None:
    texts = [env["cert"].read_text(), (env["root"] / "a.md").read_text()]
    records = [json.loads(line) for line in env["forget"].read_text().splitlines()]
    assert len(records) == 4
    for text in texts:
        for r in records:
            assert r["question"] not in text and r["answer"] not in text
            assert r["question"].split()[-2] not in text  # the name, e.g. "Ada0"


def test_signed_certificate_checks_against_its_key_and_ledger(env: dict[str, Any]) -> None:
    out = run("check-certificate", env["cert"], "--public-key", env["public"], "--ledger", env["ledger"]).output
    assert out.strip() == f"ok: {env['cert']} (digest, signature, ledger hashes, weight tensors checked)"
    checked = json.loads(run("check-certificate", env["cert"], "--json").output)
    assert checked["ok"] and checked["signed"] and not checked["ledger_checked"]
    assert any("pass --public-key" in n for n in checked["notes"])
    _, other = keypair(env["root"], "other")
    result = run("check-certificate", env["cert"], "--public-key", other, code=1)
    assert "signed with another key than --public-key" in result.output


def test_a_flipped_byte_of_a_signed_certificate_fails_the_check(env: dict[str, Any], tmp_path: Path) -> None:
    raw = env["cert"].read_bytes()
    copy = tmp_path / "c.json"
    # The first byte of each kind (digits, letters, quotes, braces, spaces, newlines...)
    # and a seeded sample of the rest: every byte takes ~40 s on this machine.
    positions = {raw.index(bytes([b])) for b in set(raw)} | set(random.Random(0).sample(range(len(raw)), 300))
    for position in sorted(positions):
        flipped = bytearray(raw)
        flipped[position] ^= 0x01
        copy.write_bytes(bytes(flipped))
        try:
            result = check_certificate(copy)
        except IntegrityError:
            continue  # no longer JSON: exit 1 as well
        assert not result.ok, f"byte {position} ({chr(raw[position])!r}) flipped, still ok"
    flipped = bytearray(raw)
    at = raw.index(b'"records": 4')
    flipped[at + len('"records": ')] = ord("5")
    copy.write_bytes(bytes(flipped))
    assert "the digest does not match the content" in run("check-certificate", copy, code=1).output
    flipped[0] = ord("[")
    copy.write_bytes(bytes(flipped))
    assert "not valid UTF-8 JSON" in run("check-certificate", copy, code=1).output


def test_a_resigned_forgery_fails_with_the_issuers_key(env: dict[str, Any], tmp_path: Path) -> None:
    cert = json.loads(env["cert"].read_text())
    cert["request"]["reason"] = "forged"
    content = {k: v for k, v in cert.items() if k not in ("digest", "signature")}
    cert["digest"] = hashlib.sha256(canonical_json(content)).hexdigest()
    key = Ed25519PrivateKey.generate()
    import base64

    cert["signature"] = {
        "algorithm": "ed25519",
        "public_key": base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode(),
        "value": base64.b64encode(key.sign(canonical_json({k: v for k, v in cert.items() if k != "signature"}))).decode(),
    }
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(cert))
    assert check_certificate(forged).ok  # self-consistent...
    result = run("check-certificate", forged, "--public-key", env["public"], code=1)
    assert "another key" in result.output  # ...but not by the issuer
    result = run("check-certificate", forged, "--ledger", env["ledger"], "--no-model", code=1)
    assert "request.reason: the certificate has \"forged\", the ledger has \"GDPR art. 17, ticket 9\"" in result.output


def _rewrite_entry(led: Path, version: int, change: Any) -> None:
    path = led / "journal" / f"{version:08d}.json"
    content = json.loads(path.read_bytes())
    content.pop("digest")
    change(content)
    content["digest"] = hashlib.sha256(canonical_json(content)).hexdigest()
    path.write_bytes(canonical_json(content))


def test_a_ledger_whose_entry_was_altered_fails_the_check(env: dict[str, Any], tmp_path: Path) -> None:
    led = shutil.copytree(env["ledger"], tmp_path / "led")
    _rewrite_entry(led, 3, lambda c: c.__setitem__("operator", "mallory"))  # parses, digest redone
    result = run("check-certificate", env["cert"], "--ledger", led, "--no-model", code=1)
    assert "entries[0].operator: the certificate has \"alice\", the ledger has \"mallory\"" in result.output
    led2 = shutil.copytree(env["ledger"], tmp_path / "led2")
    _rewrite_entry(led2, 5, lambda c: c["body"]["results"]["efficacy"]["after"]["forget"].__setitem__("gen_acc", 0.5))
    result = run("check-certificate", env["cert"], "--ledger", led2, "--no-model", code=1)
    assert "entries[1].hash: the certificate has" in result.output
    led3 = shutil.copytree(env["ledger"], tmp_path / "led3")
    entry = led3 / "journal" / "00000003.json"
    raw = bytearray(entry.read_bytes())
    raw[raw.index(b"GDPR")] ^= 0x01
    entry.write_bytes(bytes(raw))
    result = run("check-certificate", env["cert"], "--ledger", led3, code=1)
    assert "00000003.json" in result.output


def test_reverted_and_collected_requests_say_so_on_the_first_line(env: dict[str, Any], tmp_path: Path) -> None:
    led = shutil.copytree(env["ledger"], tmp_path / "led")
    cert = tmp_path / "b.json"
    run("certify", led, "b", "--out", cert, "-q")
    first = cert.read_text().splitlines()[0]
    assert first.startswith('{"statement": "REVERTED: request b was applied at version 4 but reverted at version 6;')
    assert json.loads(cert.read_text())["ledger"]["versions"]["active"] == [[4, 5]]
    run("gc", led, "--reverted")
    run("certify", led, "b", "--out", cert, "--markdown", tmp_path / "b.md", "-q")
    parsed = json.loads(cert.read_text())
    assert parsed["status"] == "garbage-collected"
    assert "and its arrays were deleted at version 7" in cert.read_text().splitlines()[0]
    assert (tmp_path / "b.md").read_text().startswith("**REVERTED: request b")
    assert [e["op"] for e in parsed["entries"]] == ["forget", "revert", "gc"]
    assert run("check-certificate", cert, "--ledger", led).exit_code == 0
    # After more entries the certificate still checks: it is pinned to its head version.
    run("revert", led, "a")
    assert run("check-certificate", cert, "--ledger", led).exit_code == 0


def test_certify_refusals(env: dict[str, Any], tmp_path: Path) -> None:
    led = env["ledger"]
    out = tmp_path / "c.json"
    assert "no request 'zed'" in run("certify", led, "zed", "--out", out, code=2).output
    assert "no such key file" in run("certify", led, "a", "--out", out, "--sign-key", tmp_path / "k.pem", code=2).output
    (tmp_path / "bad.pem").write_text("not a key")
    assert "not an unencrypted PEM private key" in run(
        "certify", led, "a", "--out", out, "--sign-key", tmp_path / "bad.pem", code=2).output
    assert not out.exists()
    assert "no such certificate file" in run("check-certificate", tmp_path / "none.json", code=2).output
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert "not a kvw-ledger erasure certificate" in run("check-certificate", tmp_path / "x.json", code=1).output
    unsigned = tmp_path / "u.json"
    run("certify", led, "a", "--out", unsigned, "-q")
    assert "not signed, but --public-key expects" in run(
        "check-certificate", unsigned, "--public-key", env["public"], code=1).output
