"""Read-only views of versions, as JSON-ready dicts: one journal entry (``log``), one
version with what its request weakened (``show``), and two versions compared (``diff``).

The CLI prints these; :meth:`Ledger.show` and :meth:`Ledger.diff` return them. This
module imports no torch and no zarr: ``log`` and ``show`` of a non-forget entry read
the journal only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvw_ledger import bodies, refs
from kvw_ledger.errors import TornEntryError
from kvw_ledger.journal import Entry

if TYPE_CHECKING:
    from kvw_ledger.replay import LedgerState
    from kvw_ledger.sites import Site
    from kvw_ledger.store import Store
    from kvw_ledger.weakening import Weakening

__all__ = ["audit_lines", "diff", "entry_json", "request_sites", "show", "written_json"]


def entry_json(entry: Entry) -> dict[str, Any]:
    """One entry as ``log --json`` prints it: version, op, id, hash, parent, time,
    operator (None in entries older than the field), active (the requests active
    after it) and body."""
    return {
        "version": entry.version,
        "op": entry.op,
        "id": bodies.Body(entry.body).id,  # read as every body reads it, whatever its op
        "hash": entry.hash,
        "parent": entry.parent,
        "time": entry.time,
        "operator": entry.operator,
        "active": entry.body.get("active", []),
        "body": entry.body,
    }


def written_json(entry: Entry) -> dict[str, Any]:
    """An entry a verb just committed, as its ``--json`` prints it: :func:`entry_json`
    plus ``stability``, the figures of the checks it passed (None for ops without checks)."""
    return {**entry_json(entry), "stability": entry.body.get("stability")}


def show(
    entries: Sequence[Entry], ref: str | int, store: Callable[[], Store], *, torn: TornEntryError | None = None
) -> dict[str, Any]:
    """Version ``ref`` among ``entries``: its entry (as :func:`entry_json`), the files it
    added, and for a forget, per site what its request weakened (see :func:`request_sites`)
    and the ``audits`` recorded of its request (version, hash, time, operator, audited version).

    ``store`` opens the array store; it is called for a forget only, so showing any
    other entry reads the journal alone.
    """
    entry = entries[refs.resolve(ref, entries, torn) - 1]
    sites = request_sites(store(), entry) if entry.op == "forget" else []
    shown = {**entry_json(entry), "files": entry.files, "sites": sites}
    if entry.op == "forget":  # the audits of this request, however much later they came
        shown["audits"] = [
            {"version": e.version, "hash": e.hash, "time": e.time, "operator": e.operator,
             "at": e.body["version"]}
            for e in entries
            if e.op == "audit" and e.body.get("request") == entry.body["request"]
        ]
    return shown


def request_sites(store: Store, entry: Entry) -> list[dict[str, Any]]:
    """Per site of a forget entry's request: vectors weakened (exponent > 0), the largest
    and mean exponent among them, and its log-scale when made with ``rescale``."""
    out = []
    request_id = entry.body["request"]
    for name in store.list_arrays(store.request_path(request_id, "exponent")):
        w = store.read_array(name)
        hit = w > 0
        site = name.rsplit("/", 1)[1]
        row: dict[str, Any] = {
            "site": site,
            "weakened": int(hit.sum()),
            "max": float(w.max()),
            "mean": float(w[hit].mean()) if bool(hit.any()) else 0.0,
        }
        scale = f"{store.request_path(request_id, 'log_scale')}/{site}"
        if scale in entry.body.get("arrays", {}) and store.has_array(scale):
            row["log_scale"] = float(store.read_array(scale))
        out.append(row)
    return out


def diff(
    sites: Sequence[Site],
    a: LedgerState,
    b: LedgerState,
    read: Callable[[str, LedgerState], Weakening],
    scaled_sites: Callable[[str, LedgerState], set[str]],
    top: int = 5,
) -> dict[str, Any]:
    """How version ``b`` differs from version ``a``.

    Only what differs is read: requests active on both sides with the same arrays
    cancel, so the change is the sum of ``b``'s other requests minus the sum of
    ``a``'s (each in chain order, ``read`` giving one request's arrays at a state),
    whatever the number of requests in common. ``scaled_sites`` names the sites a
    request holds a log-scale for.

    Returns:
        ``from`` and ``to`` (versions), ``added`` and ``removed`` (request ids), and
        ``sites``: per site whose exponent sum or log-scale changed, the number of
        vectors that changed, the largest and mean absolute change among them, the
        ``top`` largest changes (``vector``, ``change``), and ``log_scale_change``
        for sites with a log-scale.
    """
    from kvw_ledger.weakening import Weakening  # torch: `log` and `show` stay without it

    in_a = set(a.active)  # sets: lists made this quadratic in the number of requests

    def same(request_id: str) -> bool:
        return request_id in in_a and all(
            getattr(a, kind).get(request_id) == getattr(b, kind).get(request_id)
            for kind in ("exponents", "log_scales")
        )

    common = [r for r in b.active if same(r)]
    in_common = set(common)
    plus = Weakening.total(sites, (read(r, b) for r in b.active if r not in in_common))
    minus = Weakening.total(sites, (read(r, a) for r in a.active if r not in in_common))
    scaled = set(plus.log_scales) | set(minus.log_scales)
    for request_id in common:
        if request_id in b.log_scales:
            scaled |= scaled_sites(request_id, b)
    rows: list[dict[str, Any]] = []
    for site in sites:
        delta = plus.exponents[site.name] - minus.exponents[site.name]  # (n_vectors,)
        changed = delta != 0
        n = int(changed.sum())
        zero = 0.0
        scale_change = (
            float(plus.log_scales.get(site.name, zero) - minus.log_scales.get(site.name, zero))
            if site.name in scaled
            else 0.0
        )
        if n == 0 and scale_change == 0:
            continue
        order = delta.abs().argsort(descending=True)[:top]
        row: dict[str, Any] = {
            "site": site.name,
            "changed": n,
            "max_abs_change": float(delta.abs().max()),
            "mean_abs_change": float(delta[changed].abs().mean()) if n else 0.0,
            "top": [
                {"vector": int(i), "change": float(delta[i])} for i in order if bool(changed[i])
            ],
        }
        if site.name in scaled:
            row["log_scale_change"] = scale_change
        rows.append(row)
    return {
        "from": a.version,
        "to": b.version,
        "added": [r for r in b.active if r not in a.active],
        "removed": [r for r in a.active if r not in b.active],
        "sites": rows,
    }


def audit_lines(body: dict[str, Any]) -> list[str]:
    """An audit entry's figures as a few lines of text (for the CLI and certificates)."""
    res = body["results"]
    eff = res["efficacy"]

    def acc(figures: dict[str, Any]) -> str:
        parts = [f"{k} {figures[k]:.3f}" for k in ("gen_acc", "mc_acc") if figures.get(k) is not None]
        return ", ".join(parts) or "-"

    lines = [
        f"audit of {body['request']} at version {body['version']} against version {body['before']}",
        f"  forget probe: before {acc(eff['before']['forget'])}; after {acc(eff['after']['forget'])}",
    ]
    if "retain" in eff["after"]:
        lines.append(
            f"  retain probe: before {acc(eff['before']['retain'])}; after {acc(eff['after']['retain'])}"
        )
    quantized = res.get("quantized", {})
    for scheme in (body.get("quantization") or {}).get("schemes", sorted(quantized)):
        row = quantized[scheme]
        shares = ", ".join(
            f"{k} resurfaced {r['resurfaced']:+.3f}"
            + (f" ({r['share']:.0%} of removed)" if r["share"] is not None else "")
            for k, r in row["resurfacing"].items()
        )
        lines.append(f"  {scheme}: forget after {acc(row['after']['forget'])}; {shares}")
    relearned = res.get("relearned")
    if relearned:
        for k, r in relearned.get("recovery", {}).items():
            parts = [
                f"{name} {r[name]:.2f}" if r[name] is not None else f"{name} -"
                for name in ("after", "before", "ratio")
            ]
            lines.append(
                f"  relearned ({body['relearn']['steps']} steps, {body['relearn']['held_out']} held-out "
                f"records) {k}: recovery " + ", ".join(parts)
            )
    return lines
