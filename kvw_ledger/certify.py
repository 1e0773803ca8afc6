"""Erasure certificates: a self-checking, optionally signed JSON account of one request.

A certificate says what was erased (request id, reason, the forget data's
fingerprint and record count, never the data), who acted and when (the operator
and time of every entry touching the request), where it stands in the ledger
(entry and chain-head hashes, the request's array hashes, the versions where it
was active, reverted or garbage-collected), what the model is (its fingerprint
before, and the sha256 of every weight tensor an export of the certified version
holds) and how it was checked (the request's stability figures and its latest
audit). Its first line states whether the erasure is in effect.

Everything but the statement, the issue time and the issuer is derived from the
ledger by one function, :func:`_facts`; :func:`check_certificate` derives it again
from the ledger it is given and names the first field that differs. ``digest`` is
the sha256 of the canonical JSON of the rest, so any change shows without a
signature; an Ed25519 signature (``cryptography``) over the same bytes plus the
digest says who issued it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvw_ledger._fs import sha256_bytes
from kvw_ledger.audit import latest_audit
from kvw_ledger.errors import BadInputError, IntegrityError, RequestStateError
from kvw_ledger.journal import Entry, canonical_json, default_operator, format_time, utc_now
from kvw_ledger.ledger import Ledger

__all__ = ["CertificateCheck", "certify", "check_certificate", "markdown", "write_certificate"]

KIND = "kvw-ledger erasure certificate"
FORMAT = 1
_DERIVED = ("entries", "ledger", "request", "status", "model", "checks")  # compared in this order
_UNSIGNED = ("digest", "signature")


def certify(
    ledger: Ledger,
    request_id: str,
    *,
    sign_key: str | Path | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The certificate of ``request_id`` at HEAD, signed with ``sign_key`` when given.

    Raises:
        RequestStateError: no such request.
        BadInputError: the key file is missing or not an Ed25519 private key.
        ModelMismatchError: the model directory is not the ledger's model.
    """
    private = _private_key(sign_key) if sign_key is not None else None
    entries = ledger.entries()
    facts = _facts(ledger, request_id, entries, entries[-1].version)
    facts["model"]["after"]["tensors"] = ledger.tensor_hashes(
        entries[-1].version, model_dir=model_dir, progress=progress
    )
    cert: dict[str, Any] = {
        "statement": _statement(request_id, facts),
        "certificate": KIND,
        "format": FORMAT,
        "issued": format_time(utc_now()),
        "issued_by": ledger.operator or default_operator(),
        **facts,
    }
    cert["digest"] = _digest(cert)
    if private is not None:
        from cryptography.hazmat.primitives import serialization

        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        cert["signature"] = {
            "algorithm": "ed25519",
            "public_key": base64.b64encode(public).decode(),
            "value": base64.b64encode(private.sign(_signed_bytes(cert))).decode(),
        }
    return cert


def write_certificate(cert: dict[str, Any], path: str | Path) -> Path:
    """Writes ``cert`` as indented JSON whose first line is its statement."""
    rest = {k: v for k, v in cert.items() if k != "statement"}
    body = json.dumps(rest, indent=2, ensure_ascii=False, allow_nan=False)
    text = "{" + f'"statement": {json.dumps(cert["statement"], ensure_ascii=False)},\n' + body[2:] + "\n"
    out = Path(path)
    out.write_text(text, encoding="utf-8")
    return out


def markdown(cert: dict[str, Any]) -> str:
    """A human-readable rendering; its first line is the statement too."""
    req, led, model = cert["request"], cert["ledger"], cert["model"]
    lines = [
        f"**{cert['statement']}**",
        "",
        f"# Erasure certificate: request `{req['id']}`",
        "",
        f"Issued {cert['issued']} by {cert['issued_by']}; status **{cert['status']}**.",
        "",
        "## What",
        "",
        f"- reason: {req['reason'] or '-'}",
        f"- forget data: {req['records']} records, fingerprint `{req['data_fingerprint']}` (the data itself is not kept)",
        "",
        "## Who and when",
        "",
        "| version | op | time | operator | entry sha256 |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e['version']} | {e['op']} | {e['time']} | {e['operator'] or '-'} | `{e['hash']}` |"
        for e in cert["entries"]
    ]
    versions = led["versions"]
    lines += [
        "",
        "## The ledger",
        "",
        f"- request entry: version {led['entry_version']}, sha256 `{led['entry_hash']}`",
        f"- chain head: version {led['head_version']}, sha256 `{led['head_hash']}`",
        f"- active at versions: {_ranges(versions['active'])}",
        f"- reverted at version: {versions['reverted'] or '-'}; garbage-collected at version: "
        f"{versions['garbage_collected'] or '-'}",
        f"- {len(led['arrays'])} request arrays (exponents, traces), each with its sha256 in the JSON certificate",
        "",
        "## The model",
        "",
        f"- before ({model['model_type']}): "
        + "; ".join(f"{name} sha256 `{digest}`" for name, digest in _fingerprint_items(model["fingerprint_before"])),
        f"- after: version {model['after']['version']}, {len(model['after']['tensors'])} weight tensors hashed",
        "",
        "## Checks",
        "",
    ]
    stability = cert["checks"]["stability"]
    if stability:
        failed = ", ".join(c["name"] for c in stability.get("failed", [])) or "none"
        lines.append(
            f"- stability: {'passed' if stability['passed'] else 'FAILED'}; max attenuation "
            f"{stability['max_attenuation']:.4f}; failed checks: {failed}"
        )
    audit = cert["checks"]["audit"]
    if audit:
        from kvw_ledger.audit import summary_lines

        lines.append(f"- latest audit (version {audit['entry_version']}):")
        lines += [f"  - {line.strip()}" for line in summary_lines(audit)]
    else:
        lines.append("- no audit recorded (`kvw-ledger audit`)")
    signature = cert.get("signature")
    lines += [
        "",
        f"Digest `{cert['digest']}`; "
        + (f"signed (Ed25519, public key `{signature['public_key']}`)." if signature else "not signed."),
        "",
    ]
    return "\n".join(lines)


def _fingerprint_items(fingerprint: Any) -> list[tuple[str, str]]:
    """A model fingerprint (weight files and config) as (name, sha256) pairs."""
    if not isinstance(fingerprint, dict):
        return [("model", str(fingerprint))]
    items = sorted((fingerprint.get("files") or {}).items())
    if "config" in fingerprint:
        items.append(("config.json", str(fingerprint["config"])))
    return items


@dataclass
class CertificateCheck:
    """The outcome of :func:`check_certificate`; ``ok`` when nothing failed."""

    request: str | None
    signed: bool = False
    key_given: bool = False
    ledger_checked: bool = False
    model_checked: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for ``check-certificate --json``."""
        return {
            "ok": self.ok,
            "request": self.request,
            "signed": self.signed,
            "key_given": self.key_given,
            "ledger_checked": self.ledger_checked,
            "model_checked": self.model_checked,
            "failures": self.failures,
            "notes": self.notes,
        }


def check_certificate(
    path: str | Path,
    *,
    public_key: str | Path | None = None,
    ledger: Ledger | None = None,
    model_dir: str | Path | None = None,
    check_model: bool = True,
) -> CertificateCheck:
    """Checks a certificate's digest and signature and, given its ledger, every hash in it.

    Stops at the first failure, which ``failures`` names.

    Raises:
        BadInputError: the certificate or key file cannot be read, or the key is not Ed25519.
    """
    cert = _read(path)
    result = CertificateCheck(request=(cert.get("request") or {}).get("id"))
    key = _public_key(public_key) if public_key is not None else None
    result.key_given = key is not None
    missing = [k for k in ("statement", "certificate", "digest", *_DERIVED) if k not in cert]
    if cert.get("certificate") != KIND or missing:
        result.failures.append(f"{path}: not a {KIND} (missing {', '.join(missing) or 'its kind'})")
        return result
    if _digest(cert) != cert["digest"]:
        result.failures.append(f"{path}: the digest does not match the content; the certificate was altered")
        return result
    why = _check_signature(cert, key, result)
    if why is not None:
        result.failures.append(f"{path}: {why}")
        return result
    if ledger is not None:
        result.ledger_checked = True
        why = _check_against(cert, ledger, model_dir, check_model, result)
        if why is not None:
            result.failures.append(why)
    return result


def _check_signature(cert: dict[str, Any], key: Any, result: CertificateCheck) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    signature = cert.get("signature")
    if signature is None:
        if key is not None:
            return "the certificate is not signed, but --public-key expects a signature"
        result.notes.append("not signed: the digest shows it is unaltered, not who issued it")
        return None
    result.signed = True
    try:
        carried = base64.b64decode(signature["public_key"], validate=True)
        value = base64.b64decode(signature["value"], validate=True)
        if signature.get("algorithm") != "ed25519":
            return f"signature algorithm {signature.get('algorithm')!r} is not ed25519"
        embedded = Ed25519PublicKey.from_public_bytes(carried)
    except (KeyError, TypeError, ValueError) as e:
        return f"the signature block is malformed ({e}); the certificate was altered"
    if key is not None and key.public_bytes(Encoding.Raw, PublicFormat.Raw) != carried:
        return "it was signed with another key than --public-key"
    try:
        embedded.verify(value, _signed_bytes(cert))
    except InvalidSignature:
        return "the Ed25519 signature does not verify; the certificate was altered"
    if key is None:
        result.notes.append(
            "signature checked with the key the certificate carries; pass --public-key to check who signed"
        )
    return None


def _check_against(
    cert: dict[str, Any],
    ledger: Ledger,
    model_dir: str | Path | None,
    check_model: bool,
    result: CertificateCheck,
) -> str | None:
    """The first field where the certificate and the ledger differ, or None."""
    request_id = cert["request"]["id"]
    head_version = cert["ledger"]["head_version"]
    entries = ledger.entries()  # an entry that no longer parses raises IntegrityError, naming it
    if not isinstance(head_version, int) or not 1 <= head_version <= len(entries):
        return f"ledger.head_version: the certificate names version {head_version}, the ledger has 1..{len(entries)}"
    try:
        facts = _facts(ledger, request_id, entries, head_version)
    except RequestStateError as e:
        return f"request.id: {e}"
    tensors = cert["model"].get("after", {}).get("tensors")
    if check_model and ledger.model_dir(model_dir).is_dir():
        facts["model"]["after"]["tensors"] = ledger.tensor_hashes(
            head_version, model_dir=model_dir, progress=False
        )
        result.model_checked = True
    else:
        facts["model"]["after"]["tensors"] = tensors
        result.notes.append("the weight tensors' hashes were not recomputed (no model directory)")
    for key in _DERIVED:
        where = _first_difference(cert[key], facts[key], key)
        if where is not None:
            return where
    return None


def _first_difference(claimed: Any, actual: Any, where: str) -> str | None:
    if isinstance(claimed, dict) and isinstance(actual, dict):
        for key in [*actual, *(k for k in claimed if k not in actual)]:
            found = _first_difference(claimed.get(key), actual.get(key), f"{where}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(claimed, list) and isinstance(actual, list) and len(claimed) == len(actual):
        for i, (a, b) in enumerate(zip(claimed, actual, strict=True)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if json.dumps(claimed, sort_keys=True) == json.dumps(actual, sort_keys=True):
        return None
    return f"{where}: the certificate has {_short(claimed)}, the ledger has {_short(actual)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _facts(ledger: Ledger, request_id: str, entries: Sequence[Entry], upto: int) -> dict[str, Any]:
    """Everything a certificate states that follows from the ledger's first ``upto`` entries."""
    entries = list(entries)[:upto]
    forget = next(
        (e for e in entries if e.op == "forget" and e.body.get("request") == request_id), None
    )
    if forget is None:
        raise RequestStateError(f"no request {request_id!r} in this ledger (see `kvw-ledger log`)")
    touching, active_at = [], []
    arrays = dict(forget.body.get("arrays", {}))
    reverted = deleted = None
    for entry in entries:
        body = entry.body
        if request_id in body.get("active", []):
            active_at.append(entry.version)
        touches = body.get("request") == request_id and entry.op in ("forget", "revert", "audit")
        if entry.op == "revert" and body.get("request") == request_id:
            reverted = entry.version
        if entry.op == "rederive" and request_id in body.get("requests", {}):
            touches = True
            change = body["requests"][request_id]
            arrays.update(change.get("new", {}))
            arrays.update(change.get("new_log_scale", {}))
            prefix = change.get("trace")
            arrays.update({k: v for k, v in body.get("arrays", {}).items() if prefix and k.startswith(prefix + "/")})
        if entry.op == "gc" and request_id in body.get("deleted", []):
            touches, deleted = True, entry.version
        if touches:
            touching.append(
                {"version": entry.version, "op": entry.op, "time": entry.time,
                 "operator": entry.operator, "hash": entry.hash}
            )
    head = entries[-1]
    status = "active" if request_id in head.body.get("active", []) else "reverted"
    if deleted is not None:
        status = "garbage-collected"
    audit = latest_audit(ledger, request_id, entries)
    return {
        "request": {
            "id": request_id,
            "reason": forget.body.get("reason", ""),
            "data_fingerprint": forget.body["data_fingerprint"],
            "records": forget.body["records"],
        },
        "status": status,
        "entries": touching,
        "ledger": {
            "entry_version": forget.version,
            "entry_hash": forget.hash,
            "head_version": head.version,
            "head_hash": head.hash,
            "arrays": dict(sorted(arrays.items())),
            "versions": {
                "active": _to_ranges(active_at),
                "reverted": reverted,
                "garbage_collected": deleted,
            },
        },
        "model": {
            "fingerprint_before": ledger.model_info["fingerprint"],
            "model_type": ledger.model_info.get("model_type"),
            "after": {"version": head.version, "tensors": {}},
        },
        "checks": {
            "stability": forget.body.get("stability"),
            "audit": None if audit is None else {**audit.body, "entry_version": audit.version, "entry_hash": audit.hash},
        },
    }


def _statement(request_id: str, facts: dict[str, Any]) -> str:
    head = facts["ledger"]["head_version"]
    since = facts["ledger"]["entry_version"]
    versions = facts["ledger"]["versions"]
    if facts["status"] == "active":
        return (
            f"ERASURE IN EFFECT: request {request_id} has been applied since version {since} and is "
            f"active in the model at version {head} (the ledger's HEAD when issued)."
        )
    gone = (
        f" and its arrays were deleted at version {versions['garbage_collected']}"
        if versions["garbage_collected"]
        else ""
    )
    return (
        f"REVERTED: request {request_id} was applied at version {since} but reverted at version "
        f"{versions['reverted']}{gone}; the model at version {head} is not weakened for it."
    )


def _to_ranges(versions: list[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for v in versions:
        if ranges and ranges[-1][1] == v - 1:
            ranges[-1][1] = v
        else:
            ranges.append([v, v])
    return ranges


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "-"


def _digest(cert: dict[str, Any]) -> str:
    content = {k: v for k, v in cert.items() if k not in _UNSIGNED}
    try:
        return sha256_bytes(canonical_json(content))
    except (TypeError, ValueError) as e:
        raise IntegrityError(f"the certificate holds a value JSON cannot hash canonically ({e})") from e


def _signed_bytes(cert: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical content and its digest."""
    return canonical_json({k: v for k, v in cert.items() if k != "signature"})


def _read(path: str | Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise BadInputError(f"{path}: no such certificate file") from e
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the certificate ({e.strerror or e})") from e
    try:
        cert = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(
            f"{path}: not valid UTF-8 JSON ({e}); the certificate was altered or is not one"
        ) from e
    if not isinstance(cert, dict):
        raise IntegrityError(f"{path}: not a JSON object; the certificate was altered or is not one")
    return cert


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a certificate")


def _private_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = _key_bytes(path, "--sign-key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        raise BadInputError(
            f"--sign-key {path}: not an unencrypted PEM private key ({e}); make one with "
            "`openssl genpkey -algorithm ed25519 -out KEY.pem`"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"--sign-key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def _public_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = _key_bytes(path, "--public-key")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as e:
        raise BadInputError(
            f"--public-key {path}: not a PEM public key ({e}); derive one with "
            "`openssl pkey -in KEY.pem -pubout -out KEY.pub`"
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"--public-key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def _key_bytes(path: str | Path, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise BadInputError(
            f"{option} {path}: no such key file; make one with "
            "`openssl genpkey -algorithm ed25519 -out KEY.pem`"
        ) from e
    except OSError as e:
        raise BadInputError(f"{option} {path}: cannot read the key ({e.strerror or e})") from e
