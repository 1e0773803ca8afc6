"""The verbs that read a ledger: ``log``, ``show``, ``diff``, ``history`` and ``verify``.

``log`` and ``show`` of a non-forget entry read JSON files only (:class:`LedgerReader`):
they import neither torch, transformers nor zarr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kvw_ledger import bodies, views
from kvw_ledger.cli._app import main
from kvw_ledger.cli._common import _dump, _errors, _open
from kvw_ledger.cli._options import JSON, LEDGER, MODEL
from kvw_ledger.journal import Entry
from kvw_ledger.reader import LedgerReader


def _summary(entry: Entry) -> str:
    return bodies.parse(entry).summary()


@main.command()
@LEDGER
@JSON
@_errors
def log(ledger: str, as_json: bool) -> None:
    """List the journal, one line per version (reads the journal only).

    \b
    Example:
      kvw-ledger log ledger/
      kvw-ledger log ledger/ --json | jq '.[-1].hash'
    """
    opened = LedgerReader.open(ledger)
    entries = opened.entries()
    if as_json and opened.torn is not None:
        raise opened.torn  # one JSON document: the error (`show N --json` reads what is readable)
    if as_json:
        _dump([views.entry_json(e) for e in entries])
    else:
        for e in entries:
            active = _active_list(e.body.get("active", []))
            click.echo(
                f"{e.version:>4}  {e.op:<8} {e.time}  {e.hash[:12]}  {e.operator or '-'}  "
                f"{_summary(e)}  active: {active}"
            )
    if opened.torn is not None:
        raise opened.torn  # the versions before it are listed; the torn one is named


def _active_list(active: list[str], shown: int = 8) -> str:
    """The active requests for a one-line view: all of a few, else a count and the newest.

    With hundreds of requests a full list per line would make `log` grow with the
    square of the ledger; `log --json` and `show` keep the full list.
    """
    if not active:
        return "-"
    if len(active) <= shown:
        return ", ".join(active)
    return f"{len(active)} requests (newest: {', '.join(active[-3:])})"


REF_HELP = """REF is a version number (1 is init), a request id, HEAD or HEAD~N (N
    versions before HEAD); put -- before a REF that starts with '-'."""


@main.command(
    help=f"""Show one version: its entry, and per site what its request weakened.

    {REF_HELP}

    \b
    Example:
      kvw-ledger show ledger/ alice
      kvw-ledger show ledger/ HEAD~1 --json
    """
)
@LEDGER
@click.argument("ref")
@JSON
@_errors
def show(ledger: str, ref: str, as_json: bool) -> None:
    reader = LedgerReader.open(ledger)

    def store() -> Any:  # a forget's per-site figures need the arrays, so zarr and torch
        return _open(ledger).store

    shown = views.show(reader.entries(), ref, store, torn=reader.torn)
    if as_json:
        _dump(shown)
        return
    body, sites = shown["body"], shown["sites"]
    click.echo(f"version  {shown['version']}")
    click.echo(f"op       {shown['op']}")
    click.echo(f"time     {shown['time']}")
    click.echo(f"operator {shown['operator'] or '- (not recorded)'}")
    click.echo(f"hash     {shown['hash']}")
    click.echo(f"parent   {shown['parent'] or '-'}")
    click.echo(f"active   {', '.join(shown['active']) or '-'}")
    hidden = ("active", "arrays", "tokens", "model_fingerprint", "stability", "figures", "results")
    for key in sorted(k for k in body if k not in hidden):
        value = body[key]
        click.echo(
            f"{key:<8} {json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value}"
        )
    if "stability" in body:
        click.echo(f"checks   {_checks_line(body['stability'])}")
    if shown["op"] == "audit":
        for line in views.audit_lines(body):
            click.echo(line)
    if shown.get("audits"):
        click.echo("audits   " + ", ".join(f"version {a['version']} (of {a['at']})" for a in shown["audits"]))
    if sites:
        scaled = any("log_scale" in s for s in sites)
        click.echo(
            f"{'site':<52}{'weakened':>10}{'max w':>10}{'mean w':>10}"
            + (f"{'log-scale':>10}" if scaled else "")
        )
        for s in sites:
            scale = _column(s["log_scale"]) if "log_scale" in s else ""
            click.echo(
                f"{s['site']:<52}{s['weakened']:>10}{_column(s['max'])}{_column(s['mean'])}{scale}"
            )


def _column(value: float, width: int = 10) -> str:
    """A number right-aligned in ``width`` characters with at least one space before it:
    4 decimals while they fit, else 4 significant digits (2.929e+08)."""
    text = f"{value:.4f}"
    if len(text) >= width:
        text = f"{value:.4g}"
    return f"{text:>{width}}"


def _checks_line(stability: dict[str, Any]) -> str:
    verdict = (
        "passed" if stability["passed"] else f"FAILED ({stability['on_fail']}: committed anyway)"
    )
    parts = [verdict, f"max attenuation {stability['max_attenuation']:.4f}"]
    for name, figures in sorted(stability.get("probes", {}).items()):
        parts.append(f"{name} acc {figures['acc']:.3f} nll {figures['nll']:.3f}")
    parts += [
        f"failed {c['name']}: {c['value']:.4g} > {c['limit']:.4g}"
        for c in stability.get("failed", [])
    ]
    return "; ".join(parts)


@main.command(
    help=f"""Compare two versions: requests added and removed, and per site the exponents that changed.

    Sites with a log-scale (forget --rescale) also show its change. {REF_HELP}

    \b
    Example:
      kvw-ledger diff ledger/ alice HEAD
      kvw-ledger diff ledger/ 2 5 --top 10 --json
    """
)
@LEDGER
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--top", type=int, default=5, show_default=True, help="Vectors listed per site.")
@JSON
@_errors
def diff(ledger: str, ref_a: str, ref_b: str, top: int, as_json: bool) -> None:
    result = _open(ledger).diff(ref_a, ref_b, top=top)
    sites = result["sites"]
    if as_json:
        _dump(result)
        return
    click.echo(f"version {result['from']} -> {result['to']}")
    click.echo(f"added    {', '.join(result['added']) or '-'}")
    click.echo(f"removed  {', '.join(result['removed']) or '-'}")
    for s in sites:
        tops = ", ".join(f"{t['vector']}:{t['change']:+.4f}" for t in s["top"])
        scale = f"; log-scale {s['log_scale_change']:+.4f}" if "log_scale_change" in s else ""
        click.echo(
            f"{s['site']}: {s['changed']} vectors, max |change| {s['max_abs_change']:.4f}, "
            f"mean {s['mean_abs_change']:.4f}; top {tops}{scale}"
        )


@main.command()
@LEDGER
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the history as a PNG.")
@JSON
@_errors
def history(ledger: str, plot: str | None, as_json: bool) -> None:
    """Per version: active requests, per-layer attenuation, probe figures, and warnings.

    \b
    Example:
      kvw-ledger history ledger/ --plot history.png
    """
    from kvw_ledger.history import build_history, plot_history

    rows = build_history(_open(ledger))
    if plot:
        plot_history(rows, plot)
    if as_json:
        _dump([r.to_json() for r in rows])
        return
    for r in rows:
        worst = "-" if r.attenuation is None else f"{max(r.attenuation.values(), default=0.0):.3f}"
        probes = " ".join(f"{k}={v['acc']:.2f}" for k, v in sorted(r.probes.items())) or "-"
        click.echo(
            f"{r.version:>4}  {r.op:<8} {r.id or '-':<14} max attenuation {worst:<6} probes {probes}  "
            f"active: {', '.join(r.active) or '-'}"
        )
        for warning in r.warnings:
            click.echo(f"      warning: {warning}")
    if plot:
        click.echo(f"wrote {plot}")


@main.command()
@LEDGER
@MODEL
@click.option("--no-model", is_flag=True, help="Skip checking the base against the model files.")
@JSON
@_errors
def verify(ledger: str, model_dir: str | None, no_model: bool, as_json: bool) -> None:
    """Re-hash the journal chain, every file and array, the head cache and the base; exit 1 on damage.

    \b
    Example:
      kvw-ledger verify ledger/
      kvw-ledger verify ledger/ --no-model --json
    """
    report = _open(ledger, check_root=False).verify(model_dir=model_dir, check_model=not no_model)
    if as_json:
        _dump(report.to_json())
    else:
        for p in report.problems:
            # One form with every other message: "Error: ..." / "Warning: ...", the path
            # once (a message that already names its file is not prefixed with it again).
            text = p.message if p.path in p.message else f"{p.path}: {p.message}"
            click.echo(f"{p.severity.capitalize()}: {text}", err=p.severity == "error")
        verdict = "ok" if report.ok else "FAILED"
        click.echo(
            f"{verdict}: {report.checked_entries} entries, {report.checked_arrays} arrays checked"
        )
    if not report.ok:
        sys.exit(1)
