"""The head cache's record: the summed weakening at the newest version, sealed.

The head is named by no journal entry, so its group ``zarr.json`` seals itself:
canonical JSON whose ``seal`` hashes the rest, listing every head file's sha256.
:class:`~kvw_ledger.store.Store` writes and reads the arrays; this module owns the
value it reads back, what a head may hold, the seal's format and the check of the
head's files against it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvw_ledger._tree import check_site
from kvw_ledger.errors import BadInputError, IntegrityError
from kvw_ledger.weakening import Weakening

__all__ = [
    "HeadCache",
    "check_files",
    "check_meta",
    "checked_scales",
    "log_scale_attr",
    "sealed_meta",
    "sealed_sites",
]


@dataclass(frozen=True)
class HeadCache:
    """What :meth:`Store.read_head_cache` read."""

    weakening: Weakening  # the summed exponents and log-scales at ``version``
    version: int
    digest: str


def checked_scales(weakening: Weakening, version: int, digest: str) -> dict[str, float]:
    """The log-scales a head at ``version`` (entry hash ``digest``) keeps, site -> float,
    once every site, scale, ``version`` and ``digest`` is one a head can hold.

    Raises:
        BadInputError: naming the value at fault.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BadInputError(f"head version must be an int >= 0, got {version!r}")
    if not isinstance(digest, str):
        raise BadInputError(f"head digest must be a str, got {type(digest).__name__}")
    tensors = weakening.exponents
    for site in tensors:
        check_site(site)
    scales = {site: float(value) for site, value in weakening.log_scales.items()}
    for site, value in scales.items():
        if site not in tensors or not math.isfinite(value):
            raise BadInputError(f"head log-scale of {site!r} must be finite and name a site")
    return scales


def _canonical(obj: Any) -> bytes:
    """Sorted keys, no spaces, a newline: one byte form per content (as the journal's)."""
    return (
        json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        + b"\n"
    )


def _seal(meta: Mapping[str, Any]) -> str:
    unsealed = {**meta, "attributes": {k: v for k, v in meta["attributes"].items() if k != "seal"}}
    return hashlib.sha256(_canonical(unsealed)).hexdigest()


def sealed_meta(attrs: Mapping[str, Any]) -> bytes:
    """The head group's zarr.json: canonical JSON whose ``seal`` hashes the rest."""
    meta: dict[str, Any] = {"attributes": dict(attrs), "node_type": "group", "zarr_format": 3}
    meta["attributes"]["seal"] = _seal(meta)
    return _canonical(meta)


def check_meta(raw: bytes) -> dict[str, Any]:
    """The attributes of a sealed head zarr.json; IntegrityError naming it otherwise."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(
            f"head/zarr.json {why}; the head cache was altered (the next write rebuilds it)"
        )

    try:
        meta = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        canonical = _canonical(meta)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
        raise bad(f"is not valid JSON ({e})") from e
    if canonical != raw:
        raise bad("is not a sealed head record in canonical form")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if set(meta) != {"attributes", "node_type", "zarr_format"} or not isinstance(attrs, dict):
        raise bad("does not have the keys of a head record")
    if set(attrs) != {"version", "digest", "files", "seal"} or attrs.get("seal") != _seal(
        meta
    ):
        raise bad("does not match its seal")
    version, files = attrs["version"], attrs["files"]
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 0):
        raise bad(f"names version {version!r}")
    if not (isinstance(attrs["digest"], str) and isinstance(files, dict)):
        raise bad("has a malformed digest or file list")
    for rel, digest in files.items():
        parts = rel.split("/")
        if (
            parts[0] != "head"
            or len(parts) < 3
            or any(p in ("", ".", "..") for p in parts)
            or not isinstance(digest, str)
        ):
            raise bad(f"lists a bad file {rel!r}")
    return attrs


def sealed_sites(attrs: Mapping[str, Any]) -> list[str]:
    """The sites whose arrays a sealed head record (:func:`check_meta`'s attributes) lists."""
    return sorted(
        rel.split("/")[1]
        for rel in attrs["files"]
        if re.fullmatch(r"head/[^/]+/zarr\.json", rel)
    )


def check_files(
    raw: bytes | None, on_disk: set[str], sha256: Callable[[str], str]
) -> list[tuple[str, str]]:
    """Every head file against the seal in ``raw`` (``head/zarr.json``'s bytes, None when
    absent): ``on_disk`` the ledger-relative files under ``head/``, ``sha256`` the digest of one.

    Returns:
        (ledger-relative path, what is wrong) per damaged, missing or extra file;
        empty when the head is whole, or absent (a crash between the two renames).
    """
    if raw is None:
        return [
            (f, "is in head/, which has no zarr.json; the head cache was altered")
            for f in sorted(on_disk)
        ]
    try:
        listed = check_meta(raw)["files"]
    except IntegrityError as e:
        return [("head/zarr.json", str(e))]
    problems = []
    for rel in sorted((on_disk - {"head/zarr.json"}) | set(listed)):
        if rel not in on_disk:
            problems.append((rel, "is missing; head/zarr.json lists it"))
        elif rel not in listed:
            problems.append(
                (rel, "is not listed in head/zarr.json; it was added to the head cache")
            )
        else:
            actual = sha256(rel)
            if actual != listed[rel]:
                problems.append(
                    (
                        rel,
                        f"has sha256 {actual} but head/zarr.json recorded {listed[rel]}; it was altered",
                    )
                )
    return problems


def log_scale_attr(attrs: Mapping[str, Any], site: str) -> torch.Tensor | None:
    """Attr ``log_scale`` of a head array as a float32 scalar (None when absent)."""
    value = attrs.get("log_scale")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IntegrityError(f"head/{site}/zarr.json has a malformed log_scale {value!r}")
    return torch.tensor(value, dtype=torch.float32)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out
