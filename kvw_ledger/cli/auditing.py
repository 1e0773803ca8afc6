"""Whether a forgetting holds, and the proof of it: ``audit``, ``certify`` and
``check-certificate``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _dump, _errors, _open, _writes
from kvw_ledger.cli._options import JSON, LEDGER, MODEL, OPERATOR, QUIET
from kvw_ledger.journal import Entry


@main.command()
@LEDGER
@click.argument("request_id")
@click.option(
    "--forget-probe",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL of the forgotten facts to probe (only its fingerprint is kept).",
)
@click.option(
    "--retain-probe", type=click.Path(dir_okay=False), help="JSONL of facts the model must keep."
)
@click.option(
    "--quantize",
    default="8,4",
    show_default=True,
    help="Bit widths (8: int8; 4: int4 and nf4), scheme names int8,int4,nf4, or none.",
)
@click.option(
    "--group-size", type=int, default=64, show_default=True, help="Weights per quantization group."
)
@click.option(
    "--relearn-data",
    type=click.Path(dir_okay=False),
    help="JSONL to fine-tune on, e.g. the facts of a third of the forgotten people.",
)
@click.option(
    "--relearn-steps", type=int, default=20, show_default=True, help="AdamW steps of relearning."
)
@click.option(
    "--relearn-lr", type=float, default=1e-5, show_default=True, help="Relearning learning rate."
)
@click.option(
    "--relearn-batch-size", type=int, default=4, show_default=True, help="Records per relearning step."
)
@click.option(
    "--at", default="HEAD", show_default=True, help="REF of a version where the request is active."
)
@MODEL
@QUIET
@OPERATOR
@_writes
def audit(
    ledger: str,
    request_id: str,
    forget_probe: str,
    retain_probe: str | None,
    quantize: str,
    group_size: int,
    relearn_data: str | None,
    relearn_steps: int,
    relearn_lr: float,
    relearn_batch_size: int,
    at: str,
    model_dir: str | None,
    quiet: bool,
) -> Entry:
    """Check that a request's forgetting holds: efficacy, after 8/4-bit quantization, after relearning.

    Measures the version where REQUEST_ID is active against the version just before
    it, and records the figures (and the probes' fingerprints, never their records)
    as an audit journal entry. No weight changes.

    \b
    Example:
      kvw-ledger audit ledger/ alice --forget-probe alice_probe.jsonl \\
        --retain-probe retain_probe.jsonl --quantize 8,4 \\
        --relearn-data alice_third.jsonl --relearn-steps 20
    """
    from kvw_ledger.audit import audit as run_audit
    from kvw_ledger.audit import summary_lines
    from kvw_ledger.quantize import parse_schemes

    entry = run_audit(
        _open(ledger),
        request_id,
        forget_probe,
        retain_probe=retain_probe,
        quantize=parse_schemes(quantize),
        group_size=group_size,
        relearn_data=relearn_data,
        relearn_steps=relearn_steps,
        relearn_lr=relearn_lr,
        relearn_batch_size=relearn_batch_size,
        at=at,
        model_dir=model_dir,
        progress=not quiet,
    )
    for line in summary_lines(entry.body):
        click.echo(line)
    click.echo(f"version {entry.version}: audit of {request_id} recorded")
    return entry


@main.command()
@LEDGER
@click.argument("request_id")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Where to write the certificate (JSON)."
)
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write it as Markdown.")
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Ed25519 private key (PEM) to sign with, e.g. from `openssl genpkey -algorithm ed25519`.",
)
@MODEL
@QUIET
@JSON
@OPERATOR
@_errors
def certify(
    ledger: str,
    request_id: str,
    out: str,
    markdown: str | None,
    sign_key: str | None,
    model_dir: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write an erasure certificate for one request: what, who, when, hashes, checks.

    It never holds forget data. Its first line says whether the erasure is in effect
    or was reverted. The model's weight hashes are those an export of HEAD holds.

    \b
    Example:
      kvw-ledger certify ledger/ alice --out alice.cert.json --markdown alice.cert.md \\
        --sign-key issuer.pem
    """
    from kvw_ledger.certify import certify as make_certificate
    from kvw_ledger.certify import markdown as render
    from kvw_ledger.certify import write_certificate

    cert = make_certificate(
        _open(ledger), request_id, sign_key=sign_key, model_dir=model_dir, progress=not quiet
    )
    write_certificate(cert, out)
    if markdown:
        Path(markdown).write_text(render(cert), encoding="utf-8")
    if as_json:
        _dump({"out": out, "markdown": markdown, "statement": cert["statement"],
               "status": cert["status"], "digest": cert["digest"], "signed": "signature" in cert})
        return
    click.echo(cert["statement"])
    click.echo(f"wrote {out}" + (f" and {markdown}" if markdown else "")
               + (" (signed)" if "signature" in cert else " (not signed)"))


@main.command("check-certificate")
@click.argument("certificate", type=click.Path(dir_okay=False))
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False),
    help="The issuer's Ed25519 public key (PEM); the signature must be by it.",
)
@click.option(
    "--ledger",
    "ledger_path",
    type=click.Path(file_okay=False),
    help="Check every hash against this ledger (and its model's weights).",
)
@MODEL
@click.option("--no-model", is_flag=True, help="Do not recompute the weight tensors' hashes.")
@JSON
@_errors
def check_certificate(
    certificate: str,
    public_key: str | None,
    ledger_path: str | None,
    model_dir: str | None,
    no_model: bool,
    as_json: bool,
) -> None:
    """Check a certificate's digest and signature, and with --ledger every hash in it; exit 1 on a mismatch.

    \b
    Example:
      kvw-ledger check-certificate alice.cert.json --public-key issuer.pub --ledger ledger/
    """
    from kvw_ledger.certify import check_certificate as run_check

    result = run_check(
        certificate,
        public_key=public_key,
        ledger=_open(ledger_path) if ledger_path else None,
        model_dir=model_dir,
        check_model=not no_model,
    )
    if as_json:
        _dump(result.to_json())
    else:
        for note in result.notes:
            click.echo(f"note: {note}")
        for failure in result.failures:  # one line, as every verb reports what it refuses
            click.echo(f"Error: certificate check FAILED: {failure}", err=True)
        if result.ok:
            checked = ["digest"] + (["signature"] if result.signed else [])
            if result.ledger_checked:
                checked.append("ledger hashes")
            if result.model_checked:
                checked.append("weight tensors")
            click.echo(f"ok: {certificate} ({', '.join(checked)} checked)")
    if not result.ok:
        sys.exit(1)
