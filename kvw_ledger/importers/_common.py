"""What every importer shares: finding a config's parquet files, checking columns,
writing images beside the JSONL, and writing the JSONL itself.

A benchmark downloaded from its dataset hub is a folder per config (``forget_5/``,
``forget01+tofu/``...), each holding parquet shards (``train-00000-of-00001.parquet``,
or ``train/0000.parquet`` in the hub's converted layout). A config's rows become our
records (see :mod:`kvw_ledger.data`): ``question``, ``answer``, ``id``, optionally
``image`` (a path relative to the JSONL file) and, for multiple choice, ``options``
with the ``correct`` index, which :mod:`kvw_ledger.evaluate` scores.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvw_ledger._fs import atomic_write, sha256_bytes
from kvw_ledger.errors import BadInputError, DataError, LedgerExistsError

IMAGE_DIR = "images"  # under OUT_DIR; every split's JSONL names its images relative to itself

# Pillow format name -> file suffix for the images written out.
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


@dataclass(frozen=True)
class Schema:
    """The columns one kind of config must have, and how its rows become records.

    Attributes:
        columns: required top-level columns; a file without one is refused by name.
        convert: ``convert(row, ctx)`` -> the row's records (None for an item
            without a question or an answer); see :class:`Row`.
        optional: columns read when present.
    """

    columns: tuple[str, ...]
    convert: Callable[[Mapping[str, Any], Row], list[dict[str, Any] | None]]
    optional: tuple[str, ...] = ()


@dataclass
class SplitReport:
    """What one config's import wrote."""

    name: str  # the config, e.g. forget_5
    file: str  # the JSONL written
    source_files: list[str]
    records: int = 0
    images: int = 0  # image files written (shared images are written once)
    multiple_choice: int = 0  # records with options and a correct index
    skipped: int = 0  # items without a question or an answer, left out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``import --json`` prints per split)."""
        return {
            "name": self.name, "file": self.file, "source_files": self.source_files,
            "records": self.records, "images": self.images,
            "multiple_choice": self.multiple_choice, "skipped": self.skipped,
        }  # fmt: skip


@dataclass
class ImportReport:
    """What one ``import`` wrote, split by split."""

    benchmark: str
    source: str
    out_dir: str
    splits: list[SplitReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``import --json`` prints)."""
        return {
            "benchmark": self.benchmark, "source": self.source, "out_dir": self.out_dir,
            "splits": [s.to_dict() for s in self.splits],
        }  # fmt: skip


@dataclass(frozen=True)
class Row:
    """Where one parquet row came from, and how to write its images."""

    id: str  # "<config>/<file stem>/<row>": the stem of every record id made from it
    where: str  # "FILE: row N", for error messages
    images: ImageWriter

    def image(self, value: Any, column: str) -> str:
        """Writes an image cell; returns its path relative to the JSONL file."""
        return self.images.write(value, f"{self.where}, column {column!r}")

    def field(self, item: Any, key: str, column: str) -> Any:
        """``item[key]`` of a struct in ``column``; a missing field is an error naming it."""
        return field_of(item, key, f"{self.where}, column {column!r}")


class ImageWriter:
    """Writes image bytes under ``OUT_DIR/images/``, named by content, each once.

    Named by sha256 so that the same portrait in forget_5 and Full_Set is one file,
    and a re-import writes the same names.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written = 0
        self._seen: dict[str, str] = {}

    def write(self, value: Any, where: str) -> str:
        """Writes one image struct (``{"bytes": ..., "path": ...}``); returns its relative path.

        Raises:
            DataError: the value is not an image struct with bytes Pillow can read;
                names ``where`` (file, row and column).
        """
        raw = value.get("bytes") if isinstance(value, Mapping) else value  # or a binary column
        if not isinstance(raw, bytes | bytearray) or not raw:
            raise DataError(
                f"{where}: expected an image with bytes (a struct of bytes and path, as the "
                "hub stores images); download the parquet files themselves, not a view of them"
            )
        digest = sha256_bytes(raw)
        if digest in self._seen:
            return self._seen[digest]
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(raw)) as img:
                fmt = img.format or ""
                img.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DataError(f"{where}: the image bytes are not a readable image ({e})") from e
        rel = f"{IMAGE_DIR}/{digest[:32]}{_SUFFIX.get(fmt, '.' + fmt.lower() if fmt else '.img')}"
        path = self.out_dir / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, bytes(raw))
            self.written += 1
        self._seen[digest] = rel
        return rel


def find_parquet(source: Path, config: str) -> list[Path]:
    """The parquet shards of ``config`` under ``source`` (sorted; nested folders too)."""
    folder = source / config
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.parquet") if p.is_file())


def read_rows(path: Path, schema: Schema) -> Iterator[dict[str, Any]]:
    """Rows of one parquet file as dicts, after checking that the schema's columns exist.

    Only the columns the schema reads are loaded, one row group at a time.

    Raises:
        DataError: the file is not parquet, or lacks a required column (named, with
            the columns the file has).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = list(pf.schema_arrow.names)
    missing = [c for c in schema.columns if c not in names]
    if missing:
        raise DataError(
            f"{path}: missing column {missing[0]!r} (this config needs "
            f"{', '.join(schema.columns)}; the file has {', '.join(names) or 'no columns'}); "
            "is this the right config's folder?"
        )
    wanted = [c for c in (*schema.columns, *schema.optional) if c in names]
    try:
        for group in range(pf.num_row_groups):
            yield from pf.read_row_group(group, columns=wanted).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read row group {group} ({e})") from e


def field_of(item: Any, key: str, where: str) -> Any:
    """``item[key]`` of a nested struct, or a DataError naming the missing field."""
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected a struct with {key!r}, found {type(item).__name__}")
    if key not in item:
        raise DataError(
            f"{where}: missing field {key!r} (the struct has {', '.join(map(str, item)) or 'no fields'})"
        )
    return item[key]


def text(value: Any) -> str:
    """A cell as stripped text ('' for null)."""
    return "" if value is None else str(value).strip()


def insert_at(distractors: Sequence[Any], answer: str, key: str) -> tuple[list[str], int]:
    """Options with ``answer`` among ``distractors`` at a place fixed by ``key``.

    The benchmarks store wrong options only (CLEAR's ``perturbed_names``,
    ``options``); the reference evaluation inserts the answer at a random place.
    We derive the place from the record's id, so every import agrees.
    """
    options = [text(d) for d in distractors if text(d) and text(d) != answer]
    place = int(sha256_bytes(key.encode()), 16) % (len(options) + 1)
    options.insert(place, answer)
    return options, place


def record(
    question: Any, answer: Any, record_id: str, image: str | None = None, **extra: Any
) -> dict[str, Any] | None:
    """One JSONL record, or None when the question or the answer is empty."""
    q, a = text(question), text(answer)
    if not q or not a:
        return None
    out: dict[str, Any] = {"id": record_id, "question": q, "answer": a}
    if image is not None:
        out["image"] = image
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def import_config(
    source: Path, out_dir: Path, config: str, schema: Schema, images: ImageWriter
) -> SplitReport:
    """Converts one config's parquet files into ``OUT_DIR/<config>.jsonl``.

    Raises:
        BadInputError: no parquet file for the config.
        LedgerExistsError: the JSONL exists already (imports never overwrite).
        DataError: a file lacks a column, or a cell is malformed; names file and row.
    """
    files = find_parquet(source, config)
    if not files:
        raise BadInputError(
            f"{source / config}: no parquet files for config {config!r}; lay the download out "
            "as on the hub (SOURCE/<config>/*.parquet)"
        )
    target = out_dir / f"{config}.jsonl"
    if target.exists():
        raise LedgerExistsError(f"{target} already exists; import never overwrites, choose a new OUT_DIR")
    report = SplitReport(config, str(target), [str(f) for f in files])
    before = images.written
    lines: list[str] = []
    for path in files:
        for number, row in enumerate(read_rows(path, schema)):
            ctx = Row(f"{config}/{path.stem}/{number}", f"{path}: row {number}", images)
            items = schema.convert(row, ctx)
            for item in items:
                if item is None:
                    report.skipped += 1
                    continue
                report.records += 1
                report.multiple_choice += "options" in item
                lines.append(json.dumps(item, ensure_ascii=False, sort_keys=True))
    if not lines:
        raise DataError(f"{source / config}: no question with an answer in {len(files)} file(s)")
    _write_atomic(target, ("\n".join(lines) + "\n").encode("utf-8"))
    report.images = images.written - before
    return report


def run_import(
    benchmark: str,
    source: str | Path,
    out_dir: str | Path,
    configs: Mapping[str, Schema],
    splits: Iterable[str] = (),
) -> ImportReport:
    """Imports the named configs (default: every known one present in ``source``)."""
    src, out = Path(source), Path(out_dir)
    if not src.is_dir():
        raise BadInputError(f"{src}: no such directory; SOURCE is the benchmark's local copy")
    wanted = list(dict.fromkeys(splits))
    unknown = [s for s in wanted if s not in configs]
    if unknown:
        raise BadInputError(
            f"--split {unknown[0]!r} is not a {benchmark} config; known: {', '.join(configs)}"
        )
    if not wanted:
        wanted = [c for c in configs if find_parquet(src, c)]
        if not wanted:
            raise BadInputError(
                f"{src}: no {benchmark} config folder with parquet files (looked for "
                f"{', '.join(configs)}); lay the download out as on the hub"
            )
    out.mkdir(parents=True, exist_ok=True)
    images = ImageWriter(out)
    report = ImportReport(benchmark, str(src), str(out))
    for config in wanted:
        report.splits.append(import_config(src, out, config, configs[config], images))
    return report


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash never leaves a half-written JSONL or image under its final name. Not fsynced:
    # an import is re-run from its parquet files, so losing one to a power cut costs a re-run.
    atomic_write(path, data, durable=False)
