"""Where each kind of array lives in a ledger, spelled once.

:class:`kvw_ledger.store.Store` exposes these as its own (``Store.request_path`` ...)
and is the only writer and reader of the arrays; they live in this module, which
imports nothing, so that journal replay (``replay.py``) names a request's arrays
without importing torch or zarr.
"""

from __future__ import annotations

__all__ = ["base_path", "head_path", "probe_path", "rederived_path", "request_path", "retain_path"]


def base_path(site: str | None = None) -> str:
    """The group of the base value matrices, or ``site``'s base array."""
    return "base" if site is None else f"base/{site}"


def head_path(site: str | None = None) -> str:
    """The head cache's group, or ``site``'s array in it."""
    return "head" if site is None else f"head/{site}"


def retain_path(stats_id: str) -> str:
    """The group of retain stats ``stats_id`` (one array per site)."""
    return f"retain/{stats_id}"


def request_path(request_id: str, kind: str | None = None) -> str:
    """The group of a request's arrays, or of one ``kind`` (exponent, trace, log_scale)."""
    return f"requests/{request_id}" if kind is None else f"requests/{request_id}/{kind}"


def rederived_path(version: int, request_id: str | None = None, kind: str | None = None) -> str:
    """The group a re-derivation committed as ``version`` wrote, or one request's (``kind``) in it."""
    return "/".join(p for p in (f"rederived/v{version}", request_id, kind) if p is not None)


def probe_path(version: int, kind: str) -> str:
    """The folder of the probe set ``kind`` registered at ``version``."""
    return f"probes/v{version}/{kind}"
