"""The body of each journal entry as one typed value per operation.

The journal stores bodies as JSON objects, and older entries lack keys that newer
ones carry; :func:`parse` reads one into its class, with those defaults, so the
schema lives here instead of in every reader (replay, ``log``, ``show``,
``history``, certificates). Each class keeps the raw body too (``raw``): the
journal's bytes are what is hashed and never rewritten.

This module imports no torch and no zarr (``log`` reads bodies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvw_ledger.journal import Entry

__all__ = [
    "AuditBody",
    "Body",
    "ForgetBody",
    "GcBody",
    "InitBody",
    "ProbeBody",
    "RederiveBody",
    "RetainBody",
    "RevertBody",
    "parse",
]


@dataclass(frozen=True)
class Body:
    """What every body may hold: the requests active after the entry, and the raw JSON."""

    raw: Mapping[str, Any]
    active: list[str] = field(default_factory=list)  # absent in no entry this code writes

    @property
    def id(self) -> str | None:
        """The request or retain stats the entry is about (``log``'s id column)."""
        return self.raw.get("request") or self.raw.get("stats")

    @property
    def figures(self) -> dict[str, dict[str, float]] | None:
        """The probe figures the entry measured, if it measured any."""
        return self.raw.get("stability", {}).get("probes") or self.raw.get("figures")

    def summary(self) -> str:
        """One line for ``log``."""
        return ""


@dataclass(frozen=True)
class InitBody(Body):
    """``init``: the model the ledger was made for and its bases."""


    def summary(self) -> str:
        return f"{self.raw['model_type']}, {self.raw['sites']} sites"


@dataclass(frozen=True)
class RetainBody(Body):
    """``retain``: retain statistics registered (``stats``), measured at ``measured_at``."""

    stats: str = ""
    label_eos: bool = True  # entries from before the option labelled the eos


    def summary(self) -> str:
        raw = self.raw
        statistic = f", {raw['statistic']}" if raw.get("statistic", "mean") != "mean" else ""
        return f"{self.stats} ({raw['records']} records, measured at {raw['measured_at']}{statistic})"


@dataclass(frozen=True)
class ForgetBody(Body):
    """``forget``: one request applied, its arrays named in ``arrays``."""

    request: str = ""
    arrays: Mapping[str, str] = field(default_factory=dict)
    data_fingerprint: str | None = None
    label_eos: bool = True  # entries from before the option labelled the eos


    def summary(self) -> str:
        params = self.raw["params"]
        rescaled = ", rescaled" if params.get("rescale") else ""
        return f"{self.request} ({self.raw['records']} records, gamma {params['gamma']}{rescaled})"


@dataclass(frozen=True)
class RevertBody(Body):
    """``revert``: one request taken back; with ``--retain-with`` also retain stats
    registered (``retain``, a retain body) and requests re-derived (``rederived``)."""

    request: str = ""
    retain: RetainBody | None = None
    rederived: Mapping[str, Any] = field(default_factory=dict)  # per request: its new arrays


    def summary(self) -> str:
        if "rederived" in self.raw:
            done = self.raw["rederived"]
            return f"{self.request}, retain stats {done['stats']}, re-derived {', '.join(done['requests']) or '-'}"
        return f"{self.request}"


@dataclass(frozen=True)
class RederiveBody(Body):
    """``rederive``: requests recomputed with retain stats ``stats``."""

    stats: str = ""
    requests: Mapping[str, Any] = field(default_factory=dict)  # per request: its new arrays


    def summary(self) -> str:
        return f"{', '.join(self.requests)} with {self.stats}"


@dataclass(frozen=True)
class GcBody(Body):
    """``gc``: the arrays of reverted requests deleted (tombstones kept)."""

    deleted: list[str] = field(default_factory=list)
    deleted_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"deleted {', '.join(self.deleted) or 'nothing'}"


@dataclass(frozen=True)
class ProbeBody(Body):
    """``probe``: probe sets stored and/or ledger-wide stability limits changed."""

    probes: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    limits: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(sorted(self.probes)) or "no"
        return f"{kinds} probes" + (", limits set" if self.limits else "")


@dataclass(frozen=True)
class AuditBody(Body):
    """``audit``: figures of one request at ``version`` against the version ``before``."""

    request: str = ""


    def summary(self) -> str:
        return f"{self.request} at version {self.raw['version']} against {self.raw['before']}"


def parse(entry: Entry) -> Body:
    """``entry``'s body as its operation's class (a plain :class:`Body` for an unknown op)."""
    return _parse(entry.op, entry.body)


def _parse(op: str, raw: Mapping[str, Any]) -> Body:
    active = list(raw.get("active", []))
    if op == "init":
        return InitBody(raw, active)
    if op == "retain":
        return RetainBody(raw, active, stats=raw["stats"], label_eos=bool(raw.get("label_eos", True)))
    if op == "forget":
        return ForgetBody(
            raw, active, request=raw["request"], arrays=raw.get("arrays", {}),
            data_fingerprint=raw.get("data_fingerprint"), label_eos=bool(raw.get("label_eos", True)),
        )
    if op == "revert":
        retained = raw.get("retain")
        return RevertBody(
            raw, active, request=raw["request"],
            retain=None if retained is None else RetainBody(retained, active, stats=retained["stats"],
                                                            label_eos=bool(retained.get("label_eos", True))),
            rederived=raw.get("rederived", {}).get("requests", {}),
        )
    if op == "rederive":
        return RederiveBody(raw, active, stats=raw["stats"], requests=raw["requests"])
    if op == "gc":
        return GcBody(raw, active, deleted=list(raw["deleted"]), deleted_files=list(raw.get("deleted_files", [])))
    if op == "probe":
        return ProbeBody(raw, active, probes=raw.get("probes", {}), limits=raw.get("limits", {}))
    if op == "audit":
        return AuditBody(raw, active, request=raw.get("request", ""))
    return Body(raw, active)
