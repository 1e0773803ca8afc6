"""The ledger root's ``zarr.json`` read as plain JSON: its format version and attributes.

Opening a ledger only to read its journal (``log``, ``show``) needs these two
checks and nothing of zarr-python, so they live here, apart from the array store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvw_ledger.errors import FormatVersionError, IntegrityError, LedgerNotFoundError

__all__ = ["FORMAT_VERSION", "parse_zarr_meta", "read_root_attrs", "read_zarr_meta"]

FORMAT_VERSION = 1


def read_zarr_meta(path: Path | str) -> dict[str, Any]:
    """One Zarr v3 ``zarr.json`` as a dict.

    Raises:
        IntegrityError: the file is unreadable, not JSON, or not Zarr v3 metadata.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise IntegrityError(f"{path} is unreadable ({e}); the ledger is damaged") from e
    return parse_zarr_meta(raw, path)


def parse_zarr_meta(raw: bytes, path: Path | str) -> dict[str, Any]:
    """:func:`read_zarr_meta` of a ``zarr.json`` already read (its bytes were also hashed).

    Raises:
        IntegrityError: naming ``path``, when ``raw`` is not JSON or not Zarr v3 metadata.
    """
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}); the ledger is damaged") from e
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise IntegrityError(f"{path} is not Zarr v3 metadata; the ledger is damaged")
    return meta


def read_root_attrs(path: Path) -> dict[str, Any]:
    """The root group's attributes of the ledger at ``path``, its format version checked.

    Raises:
        LedgerNotFoundError: there is no ``zarr.json`` at ``path``.
        IntegrityError: ``zarr.json`` is unreadable or not a Zarr v3 group.
        FormatVersionError: the format version is newer than this code or not an int.
    """
    meta_path = Path(path) / "zarr.json"
    if not meta_path.is_file():
        raise LedgerNotFoundError(f"no ledger at {path}; create one with `kvw-ledger init`")
    meta = read_zarr_meta(meta_path)
    attrs = meta.get("attributes", {})
    if meta.get("node_type") != "group" or not isinstance(attrs, dict):
        raise IntegrityError(f"{meta_path} is not a Zarr v3 group; the ledger is damaged")
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatVersionError(
            f"{meta_path}: format_version {version!r} is not a positive integer; "
            "this is not a kvw-ledger ledger, or it is damaged"
        )
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} was written by a newer kvw-ledger (format {version}, this one reads "
            f"up to {FORMAT_VERSION}; format_version in zarr.json); upgrade kvw-ledger"
        )
    return attrs
