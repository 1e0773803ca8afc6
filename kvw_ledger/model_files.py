"""What lives in a model directory: weight shards, their fingerprints, the files an export copies.

This module knows Hugging Face model directories, not ledgers. It reads only
safetensors and JSON: pickle-based weights (``pytorch_model.bin`` and friends) are
never opened, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from kvw_ledger.errors import BadInputError, ModelMismatchError
from kvw_ledger.fingerprint_cache import FingerprintCache, StatKey, stat_key

__all__ = [
    "INDEX_NAME",
    "TensorLocation",
    "check_fingerprint",
    "copyable_files",
    "fingerprint",
    "locate_tensors",
    "weight_files",
]

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Suffixes of weight files in formats other than safetensors. They are never read,
# and never copied into an export: they hold the unweakened weights.
_FOREIGN_WEIGHT_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf",
     ".onnx", ".npz", ".npy", ".pdparams", ".joblib"}
)
# Of those, the pickle-based ones people can convert with `save_pretrained`.
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})

_BLOCK = 1 << 20  # hash in 1 MiB blocks: constant memory whatever the shard size
_PROGRESS_MIN_BYTES = 100 * (1 << 20)  # below this, hashing is quick and a bar is noise

# torch dtype -> safetensors dtype name, for the dtypes this torch build has.
_ST_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attr): name
    for attr, name in [
        ("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("int16", "I16"),
        ("uint16", "U16"), ("int32", "I32"), ("uint32", "U32"), ("int64", "I64"),
        ("uint64", "U64"), ("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32"),
        ("float64", "F64"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
        ("float8_e8m0fnu", "F8_E8M0"), ("complex64", "C64"),
    ]
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class TensorLocation:
    """Where a live tensor is stored: a shard file name and the key inside it."""

    file: str  # file name in the model directory: "model-00001-of-00002.safetensors"
    key: str  # tensor name in that file: "language_model.model.layers.0.mlp.down_proj.weight"


def _model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise BadInputError(
            f"{path}: not a directory; pass a model directory (config.json + *.safetensors)"
        )
    return path


def weight_files(model_dir: str | Path) -> list[Path]:
    """Return the model's safetensors weight files, sorted by name.

    When ``model.safetensors.index.json`` exists, its ``weight_map`` decides the set
    (so stray files such as Mistral's ``consolidated.safetensors`` are left out);
    otherwise every top-level ``*.safetensors`` file is a weight file.

    Raises:
        BadInputError: no safetensors weights (with advice when only pickle-based
            weights such as ``pytorch_model.bin`` exist), or a malformed index.
    """
    path = _model_dir(model_dir)
    index = path / INDEX_NAME
    if index.is_file():
        names = _index_shards(index)
        for name in names:
            if not (path / name).is_file():
                raise BadInputError(
                    f"{index} names shard {name}, which is missing from {path}; "
                    "download the complete model or remove the stale index"
                )
        return [path / name for name in names]
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise BadInputError(
            f"{path} holds weights only as {pickled[0]}, a pickle-based format that kvw_ledger "
            "never loads (unpickling can run arbitrary code); convert it to safetensors in a "
            "trusted environment first, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise BadInputError(
        f"{path}: no *.safetensors weight files; pass a Hugging Face model directory"
    )


def _index_shards(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{index}: cannot read the shard index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(
            f"{index}: no 'weight_map' object; re-save the model with save_pretrained"
        )
    names = set(weight_map.values())
    for name in names:
        # A shard name is a bare file name; anything else could point outside the model.
        bare = isinstance(name, str) and Path(name).name == name
        if not (bare and name.endswith(".safetensors")):
            raise BadInputError(
                f"{index}: weight_map names {name!r}, not a *.safetensors file name"
            )
    return sorted(names)


def _hash_files(
    paths: Iterable[Path], desc: str, progress: bool = True, cache: FingerprintCache | None = None
) -> dict[str, str]:
    """sha256 of each file. With a ``cache``, a file whose stat key it trusts is not read
    again (see :mod:`kvw_ledger.fingerprint_cache`): a service applying request after
    request to a 14 GB model would otherwise re-read it for every one."""
    if cache is not None:
        cache.begin()  # the cache's timestamp comes from before the first stat
    try:
        digests: dict[str, str] = {}
        todo: list[tuple[Path, StatKey]] = []
        for p in paths:
            key = stat_key(p)
            known = cache.get(key) if cache is not None else None
            if known is not None:
                digests[p.name] = known
            else:
                todo.append((p, key))
        total = sum(key[3] for _, key in todo)
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            file=sys.stderr, disable=not progress or total <= _PROGRESS_MIN_BYTES, leave=False,
        ) as bar:
            for p, key in todo:
                h = hashlib.sha256()
                with p.open("rb") as f:
                    while n := f.readinto(buf):
                        h.update(view[:n])
                        bar.update(n)
                digests[p.name] = h.hexdigest()
                if cache is not None and stat_key(p) == key:  # not written while it was read
                    cache.put(key, digests[p.name])
        return digests
    finally:
        if cache is not None:
            cache.save()


def fingerprint(
    model_dir: str | Path, progress: bool = True, cache: FingerprintCache | None = None
) -> dict[str, Any]:
    """Return the sha256 of every weight file and of ``config.json``.

    A progress bar shows on stderr for big models, unless ``progress`` is false.
    Files that ``cache`` trusts are not read (see :mod:`kvw_ledger.fingerprint_cache`).

    Returns:
        ``{"files": {file name: sha256 hex}, "config": sha256 hex of config.json}``.

    Raises:
        BadInputError: no weights (see :func:`weight_files`) or no ``config.json``.
    """
    path = _model_dir(model_dir)
    files = weight_files(path)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise BadInputError(f"{path}: no {CONFIG_NAME}; pass a Hugging Face model directory")
    digests = _hash_files([*files, config], desc=f"hash {path.name}", progress=progress, cache=cache)
    config_digest = digests.pop(CONFIG_NAME)
    return {"files": digests, "config": config_digest}


def check_fingerprint(
    model_dir: str | Path,
    recorded: Mapping[str, Any],
    progress: bool = True,
    cache: FingerprintCache | None = None,
    *,
    init_dir: str | Path | None = None,
) -> None:
    """Check that ``model_dir`` is the model whose fingerprint was recorded.

    Files that ``cache`` trusts are not read again; without one, every file is hashed.
    ``init_dir`` is the directory the fingerprint was taken from: when ``model_dir``
    is that directory, a differing file was changed in place, and the message says so.

    Raises:
        ModelMismatchError: naming the first file (in name order) that differs,
            is missing, or is extra.
    """
    path = _model_dir(model_dir)
    rec_files = recorded.get("files")
    if not isinstance(rec_files, Mapping):
        raise BadInputError(f"recorded model fingerprint has no 'files' mapping: {recorded!r}")
    in_place = init_dir is not None and Path(init_dir).resolve() == path.resolve()
    advice = (
        "This is the directory init read, modified in place since: restore its files, or create "
        "a new ledger for the new weights."
        if in_place
        else "The ledger was created from another model: pass the model directory given to `init`, "
        "or create a new ledger."
    )
    # Compare the cheap file lists before hashing gigabytes.
    current_names = {p.name for p in weight_files(path)}
    for name in sorted(current_names | set(rec_files)):
        if name not in current_names:
            raise ModelMismatchError(f"{path}: weight file {name} is missing. {advice}")
        if name not in rec_files:
            raise ModelMismatchError(f"{path}: weight file {name} is extra. {advice}")
    current = fingerprint(path, progress, cache)
    pairs = {**{n: (d, rec_files[n]) for n, d in current["files"].items()},
             CONFIG_NAME: (current["config"], recorded.get("config"))}
    for name in sorted(pairs):
        now, then = pairs[name]
        if now != then and in_place:
            raise ModelMismatchError(
                f"{path}: {name} changed since init (sha256 {now[:12]}..., recorded "
                f"{str(then)[:12]}...). {advice}"
            )
        if now != then:
            raise ModelMismatchError(
                f"{path}: {name} differs (sha256 {now[:12]}..., recorded {str(then)[:12]}...). "
                f"{advice}"
            )


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, flat (uint8): compared or hashed bitwise, NaN == NaN and -0.0 != 0.0."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _edge_digest(first: torch.Tensor, last: torch.Tensor) -> bytes:
    # A cheap signature (first and last row) so only likely matches are loaded whole.
    h = hashlib.blake2b(digest_size=16)
    for t in (first, last):
        h.update(raw_bits(t.to("cpu")).numpy().tobytes())
    return h.digest()


def _edges(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.dim() == 0 or t.shape[0] == 0:
        return t, t
    return t[0:1], t[t.shape[0] - 1 :]


def _suffix_score(a: str, b: str) -> int:
    """Number of trailing dotted name parts two names share."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
        n += 1
    return n


def locate_tensors(
    model_dir: str | Path, wanted: Mapping[str, torch.Tensor]
) -> dict[str, TensorLocation]:
    """Find, for each wanted live tensor, the checkpoint tensor with the same content.

    Live transformers models rename checkpoint keys (LLaVA's
    ``model.language_model.layers.0...`` is ``language_model.model.layers.0...`` on
    disk) or fuse them (Mixtral's ``experts.down_proj[e]`` is
    ``block_sparse_moe.experts.{e}.w2.weight``), so names cannot be trusted: a
    match is a file tensor with the same shape, dtype and bytes. File tensors are
    read one at a time, and only those whose shape and dtype some wanted tensor has.
    When several file tensors match (identical bytes), the one whose key shares the
    longest suffix of dotted parts with the wanted name wins.

    Args:
        model_dir: the model directory.
        wanted: name -> tensor (a weight or a slice of one), on any device.

    Returns:
        name -> :class:`TensorLocation`, in the order of ``wanted``.

    Raises:
        BadInputError: a wanted tensor has no match, or several equally good ones.
    """
    path = _model_dir(model_dir)
    # (shape, dtype name) -> edge digest -> wanted names
    by_sig: dict[tuple[tuple[int, ...], str], dict[bytes, list[str]]] = {}
    for name, t in wanted.items():
        if t.device.type == "meta":
            raise BadInputError(
                f"wanted tensor {name} is on the meta device and has no data to match"
            )
        dtype = _ST_DTYPES.get(t.dtype)
        if dtype is None:
            raise BadInputError(
                f"wanted tensor {name} has dtype {t.dtype}, which safetensors cannot store"
            )
        digest = _edge_digest(*_edges(t))
        by_sig.setdefault((tuple(t.shape), dtype), {}).setdefault(digest, []).append(name)

    found: dict[str, list[TensorLocation]] = {name: [] for name in wanted}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(key)
                    groups = by_sig.get((tuple(sl.get_shape()), sl.get_dtype()))
                    if groups is None:
                        continue
                    shape = sl.get_shape()
                    if not shape or shape[0] == 0:
                        first = last = f.get_tensor(key)
                    else:
                        first, last = sl[0:1], sl[shape[0] - 1 : shape[0]]
                    names = groups.get(_edge_digest(first, last))
                    if not names:
                        continue
                    stored = f.get_tensor(key)
                    on_device: dict[torch.device, torch.Tensor] = {}
                    for name in names:
                        w = wanted[name]
                        if w.device not in on_device:
                            on_device[w.device] = raw_bits(stored.to(w.device))
                        if torch.equal(on_device[w.device], raw_bits(w)):
                            found[name].append(TensorLocation(file.name, key))
                    del stored, on_device  # one file tensor in memory at a time
        except SafetensorError as e:
            raise BadInputError(f"{file}: not a readable safetensors file: {e}") from e

    result: dict[str, TensorLocation] = {}
    for name, locs in found.items():
        if not locs:
            raise BadInputError(
                f"no tensor in {path} has the shape, dtype and bytes of {name}; "
                "was the model loaded from this directory, and not modified since?"
            )
        best = max(_suffix_score(name, loc.key) for loc in locs)
        top = [loc for loc in locs if _suffix_score(name, loc.key) == best]
        if len(top) > 1:
            keys = ", ".join(f"{loc.file}:{loc.key}" for loc in top)
            raise BadInputError(
                f"{name} matches several identical tensors in {path} ({keys}) and their names "
                "do not say which one it is"
            )
        result[name] = top[0]
    return result


def _is_ledger_like(name: str) -> bool:
    return name == "zarr.json" or ".zarr" in name


def copyable_files(model_dir: str | Path) -> list[Path]:
    """Return the files an export copies verbatim, sorted by name.

    The rule: every regular file (symlinks followed, as in the Hugging Face cache)
    at the top level of ``model_dir``, except

    - weights: ``*.safetensors`` (the export rewrites the weight files itself, and a
      stray one such as ``consolidated.safetensors`` would hold unweakened weights)
      and weights in any other format (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``,
      ``*.pkl``, ``*.h5``, ``*.msgpack``, ``*.gguf``, ``*.onnx``, ...), together with
      their shard indexes such as ``pytorch_model.bin.index.json``;
    - hidden files (``.gitattributes``, lock files);
    - anything named like a Zarr ledger (``zarr.json``, ``*.zarr*``);
    - ``kvw_provenance.json`` (each export writes its own).

    Sub-directories are never copied. So config, generation config, tokenizer,
    processor, chat-template and sentencepiece files, ``model.safetensors.index.json``,
    README and LICENSE all travel with the export.
    """
    path = _model_dir(model_dir)
    out = []
    for p in sorted(path.iterdir()):
        name = p.name
        if not p.is_file() or name.startswith(".") or _is_ledger_like(name):
            continue
        if p.suffix == ".safetensors" or p.suffix in _FOREIGN_WEIGHT_SUFFIXES:
            continue
        if name.endswith(".index.json") and Path(name[: -len(".index.json")]).suffix in (
            _FOREIGN_WEIGHT_SUFFIXES
        ):
            continue  # an index of weights we do not export would point at missing files
        if name == "kvw_provenance.json":
            continue
        out.append(p)
    return out
