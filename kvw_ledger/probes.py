"""Probe sets kept inside a ledger: retain and general data that stability checks measure.

Probe data is not sensitive (unlike forget data, which is never stored), so a copy
of each probe file and its images lives under ``probes/v<version>/<kind>/`` in the
ledger, named with its sha256 in the journal entry that registered it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kvw_ledger._fs import sha256_bytes, sha256_file
from kvw_ledger.data import Record, read_records
from kvw_ledger.errors import BadInputError

PROBE_KINDS = ("retain", "general")


def store_probe(ledger_root: Path, folder: str, kind: str, source: str | Path) -> tuple[str, dict[str, str]]:
    """Copies a probe JSONL file and its images into the ledger, under ``folder``
    (ledger-relative: :meth:`kvw_ledger.store.Store.write_probe` says where).

    Returns:
        The probe file's path relative to the ledger root, and every file written
        (relative path -> sha256) for the journal entry.
    """
    if kind not in PROBE_KINDS:
        raise BadInputError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, not {kind!r}")
    records = read_records(source)
    target = ledger_root / folder
    old = os.umask(0o077)
    try:
        if target.exists():  # left by an interrupted probe of the same version
            shutil.rmtree(target)
        (target / "images").mkdir(parents=True)
        files: dict[str, str] = {}
        lines = []
        for i, record in enumerate(records):
            line: dict[str, str] = {"question": record.question, "answer": record.answer}
            if record.id is not None:
                line["id"] = record.id
            if record.image is not None:
                name = f"images/{i:06d}{record.image.suffix}"
                shutil.copyfile(record.image, target / name)
                files[f"{folder}/{name}"] = sha256_file(target / name)
                line["image"] = name
            lines.append(json.dumps(line, ensure_ascii=False, sort_keys=True))
        data = ("\n".join(lines) + "\n").encode()
        (target / "data.jsonl").write_bytes(data)
        files[f"{folder}/data.jsonl"] = sha256_bytes(data)
    finally:
        os.umask(old)
    return f"{folder}/data.jsonl", files


def read_probe(ledger_root: Path, relative: str) -> list[Record]:
    """The records of a stored probe set."""
    return read_records(ledger_root / relative)
