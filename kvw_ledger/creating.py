"""``init``: a ledger made for a model directory (its sites found, the base value
matrices copied bit-exact, version 1 committed), locally or at a URL."""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvw_ledger import model_files, sums
from kvw_ledger._fs import sha256_file
from kvw_ledger.errors import KVWLedgerError, LedgerExistsError, StorageError
from kvw_ledger.journal import Journal, check_operator
from kvw_ledger.loading import DeviceMap, load_model
from kvw_ledger.lock import WriterLock
from kvw_ledger.remote import Remote, is_url, local_path, mirror_dir
from kvw_ledger.sites import discover_sites, site_weight
from kvw_ledger.store import Store

if TYPE_CHECKING:
    from kvw_ledger.ledger import Ledger


def create(
    cls: type[Ledger],
    path: str | Path,
    model_dir: str | Path,
    *,
    towers: str = "language",
    site_glob: str | None = None,
    progress: bool = True,
    clock: Callable[[], _dt.datetime] | None = None,
    device_map: DeviceMap | None = None,
    operator: str | None = None,
) -> Ledger:
    """``Ledger.create``: the model read, its sites found, the base copied and init committed."""
    if is_url(path):
        return create_remote(
            cls, str(path), model_dir, towers=towers, site_glob=site_glob, progress=progress, clock=clock,
            device_map=device_map, operator=operator,
        )
    from kvw_ledger import ledger as ledger_module  # its clock, looked up here: tests patch it

    path = local_path(path)
    if operator is not None:
        check_operator(operator)  # before the model is read
    model_dir = Path(model_dir).resolve()
    model_files.weight_files(model_dir)  # refuses pickle-only weights, saying how to convert
    model = load_model(model_dir, progress=progress, device_map=device_map)
    sites = discover_sites(model, towers, site_glob)
    wanted = {s.name: site_weight(model, s) for s in sites}
    locations = model_files.locate_tensors(model_dir, wanted)
    fingerprint = model_files.fingerprint(model_dir, progress)
    attrs: dict[str, Any] = {
        "model": {
            "dir": str(model_dir),
            "fingerprint": fingerprint,
            "model_type": str(getattr(model.config, "model_type", "")),
            "class": type(model).__name__,
        },
        "towers": towers,
        "site_glob": site_glob,
        "sites": [s.to_dict() for s in sites],
        "locations": {n: {"file": loc.file, "key": loc.key} for n, loc in locations.items()},
    }
    store = Store.create(Path(path), attrs)
    ledger = cls(store, Journal(store.path, clock=clock or ledger_module._utc_now))
    ledger.operator = operator
    try:
        with WriterLock(store.path, operation="init"):
            files = {"zarr.json": sha256_file(store.path / "zarr.json")}
            written, hashes = store.write_sites(
                Store.base_path(), {s.name: wanted[s.name].detach().cpu() for s in sites}
            )
            files.update(written)
            files.update(store.group_files(Store.base_path()))
            body = {
                "model_type": attrs["model"]["model_type"],
                "model_fingerprint": fingerprint,
                "sites": len(sites),
                "arrays": hashes,
                "active": [],
            }
            entry = ledger.journal.append("init", body, files, parent=None, operator=operator)
            sums.write_head(ledger, entry)
    except BaseException as e:
        # The directory is ours (create refuses existing ones): leave nothing half made.
        shutil.rmtree(store.path, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, KVWLedgerError):
            raise StorageError(f"could not write the ledger at {store.path} ({e.strerror or e})") from e
        raise
    del model
    return ledger


def create_remote(cls: type[Ledger], url: str, model_dir: str | Path, **options: Any) -> Ledger:
    """``create`` at a URL: made in a fresh mirror, then published under the URL's lock."""
    remote = Remote(url)
    if remote.exists():
        raise LedgerExistsError(f"{remote.url} already holds a ledger; choose a new URL for the ledger")
    mirror = mirror_dir(remote.url)
    shutil.rmtree(mirror, ignore_errors=True)  # a mirror of a ledger no longer at the URL
    ledger = create(cls, mirror, model_dir, **options)
    try:
        with remote.lock("init"):
            if remote.versions():
                raise LedgerExistsError(f"another writer created a ledger at {remote.url} first")
            remote.push(mirror, options.get("progress", True))
    except BaseException:
        shutil.rmtree(mirror, ignore_errors=True)
        raise
    ledger.remote = remote
    return ledger
