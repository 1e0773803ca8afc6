"""The main job: a ledger's whole life on the bundled fictitious-profiles benchmark.

Builds (or reuses) the benchmark data and a small LLaVA-architecture model that
knows it, then creates a ledger, registers retain statistics, forgets three
disjoint groups of people one after another, reverts the second, exports HEAD and
verifies. After every version it evaluates each group and the retain set on both
modalities and writes ``report.json``, ``report.md`` and ``history.png``. Last, it
audits group 1's request (8- and 4-bit quantization, and relearning on a third of
its people) and writes its signed certificate, ``certificate.json`` and ``.md``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvw_ledger.bench.instill import InstillConfig, build_model
from kvw_ledger.bench.profiles import BenchConfig, generate
from kvw_ledger.cpu import CoreMeter
from kvw_ledger.data import Record, combine_jsonl, read_records
from kvw_ledger.errors import BadInputError
from kvw_ledger.evaluate import evaluate_records
from kvw_ledger.kvw import KVWConfig
from kvw_ledger.ledger import Ledger
from kvw_ledger.loading import load_model, load_processor, torch_threads

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    n_people: int = 200  # fictitious people in the benchmark (count)
    seed: int = 0  # data seed (the model's seed is instill.seed)
    instill: InstillConfig = field(default_factory=InstillConfig)  # the model and its training
    # The paper's accessor with each request's group as one batch: of the settings swept
    # on the recipe-4 model (docs/demo-model.md, "Three requests in a row") it met the
    # most targets. q90 could not bring group 1's image questions below 0.33 at any gamma.
    statistic: str = "mean"  # retain statistic C_f is compared with (kvw_ledger.retain_stat)
    gamma: float = 5.0  # KVW strength per batch
    layers: tuple[int, int] = (0, 3)  # inclusive layer range weakened
    batch_size: int = 240  # forget records per batch: a demo group is 240 records
    epochs: int = 1  # passes over each forget group
    retain_records: int = 400  # retain records for C_r (a seeded sample; count)
    eval_records: int = 160  # retain records evaluated per version (count)
    # torch CPU threads. 1: the same bits whatever the load (float sums depend on the
    # thread count), so a second run's evaluations are cache hits; 0: the cores other
    # processes leave free, re-read per step.
    threads: int = 1
    # The audit's relearning attack: stronger than the verb's default (1e-5), because
    # this model was trained at 5e-4 and a weaker attack would show nothing either way.
    relearn_steps: int = 30  # AdamW steps on a third of group 1's people
    relearn_lr: float = 1e-4  # relearning learning rate
    quantize: tuple[str, ...] = ("int8", "int4", "nf4")  # the audit's quantization schemes
    audit: bool = True  # audit and certify group-1 at the end


def run_demo(
    workdir: Path, echo: Echo | None = print, config: DemoConfig | None = None
) -> dict[str, Any]:
    """Runs the demo in ``workdir`` and returns the report (also written as report.json)."""
    config = config or DemoConfig()
    with torch_threads(config.threads or CoreMeter().threads()):
        return _run(workdir, echo or (lambda _: None), config)


def _run(workdir: Path, say: Echo, config: DemoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)

    say(f"[1/7] benchmark data: {config.n_people} fictitious people in {workdir / 'data'}")
    paths = generate(
        workdir / "data", config=BenchConfig(n_people=config.n_people, seed=config.seed)
    )
    if paths.retain_demo is None or len(paths.groups) < 3:
        raise BadInputError("the benchmark has no demo groups; regenerate it with 3 demo groups")
    say("[2/7] the model that knows them (trained once, then cached)")
    model_dir = build_model(workdir / "models", paths, config.instill)

    say("[3/7] a fresh ledger and retain statistics")
    ledger_dir = workdir / "ledger"
    if ledger_dir.exists():
        shutil.rmtree(ledger_dir)
    ledger = Ledger.create(ledger_dir, model_dir, progress=False)
    retain_sample = _sample(
        paths.retain_demo,
        paths.retain_demo.parent / "retain_sample.jsonl",
        config.retain_records,  # beside its images
    )
    ledger.retain(
        retain_sample, stats_id="retain", batch_size=config.batch_size, statistic=config.statistic,
        progress=False,
    )

    model: Any = load_model(model_dir)
    processor = load_processor(model_dir)
    groups = {f"group-{i + 1}": path for i, path in enumerate(paths.groups)}
    splits = {**groups, "retain": paths.retain_demo}
    limits = {**{g: None for g in groups}, "retain": config.eval_records}

    meter = CoreMeter() if config.threads == 0 else None
    cache = _EvalCache(workdir / "eval-cache", model_dir)

    def pace() -> None:
        # Each step is seconds long: re-read the free cores before it, not once per run.
        if meter is not None:
            torch.set_num_threads(meter.threads())

    def evaluate(label: str) -> dict[str, Any]:
        pace()
        version = ledger.materialize(model)
        figures = {
            name: _cached_evaluation(cache, model, processor, path, limits[name])
            for name, path in splits.items()
        }
        row = {
            "version": version,
            "step": label,
            "active": _active(ledger, version),
            "metrics": figures,
        }
        say(_table_row(row))
        return row

    kvw = KVWConfig(
        gamma=config.gamma, layers=config.layers, batch_size=config.batch_size, epochs=config.epochs
    )
    say("[4/7] three deletion requests, one after another, then revert the second")
    say(_table_header(list(splits)))
    rows = [evaluate("before")]
    for name, path in groups.items():
        pace()
        entry = ledger.forget(
            path,
            request_id=name,
            reason=f"demo: forget {name}",
            config=kvw,
            limits=ledger.limits(on_fail="warn"),  # record a failed check and go on: the report shows it
            progress=False,
        )
        for failed in entry.body["stability"]["failed"]:
            say(
                f"      warning: committed although {failed['name']} failed "
                f"({failed['value']:.3f} > {failed['limit']})"
            )
        rows.append(evaluate(f"forget {name}"))
    # The withdrawn group's data is retain data again: the revert registers retain stats
    # that include it and re-derives groups 1 and 3 with them, in the same entry.
    reverted = ledger.revert(
        "group-2",
        reason="demo: request withdrawn",
        retain_with=combine_jsonl(
            [retain_sample, groups["group-2"]], workdir / "data" / "retain_with_group-2.jsonl"
        ),
        retain_id="retain-with-group-2",
        limits=ledger.limits(on_fail="warn"),
        progress=False,
    )
    say(f"      re-derived with the withdrawn data as retain data: {', '.join(reverted.body['rederived']['requests'])}")
    rows.append(evaluate("revert group-2"))

    say("[5/7] export HEAD and verify")
    export_dir = workdir / "export"
    if export_dir.exists():
        shutil.rmtree(export_dir)
    ledger.export(export_dir, progress=False)
    verified = ledger.verify()

    audited: dict[str, Any] | None = None
    certificate: dict[str, Any] | None = None
    if config.audit:
        say(f"[6/7] audit group-1's request ({', '.join(config.quantize)}; relearning on a third of its people)")
        audited = _audit_group(ledger, paths, config, workdir, cache)
        for line in audited["lines"]:
            say(line)
        certificate = _certify_group(ledger, workdir)
        say(certificate["statement"])

    say("[7/7] report")
    report: dict[str, Any] = {
        "config": {**asdict(config), "layers": list(config.layers)},
        "model": str(model_dir),
        "rows": rows,
        "layers": _layer_history(ledger),
        "targets": _targets(rows),
        "verify": verified.to_json(),
        "audit": audited,
        "certificate": None
        if certificate is None
        else {k: certificate[k] for k in ("statement", "status", "digest")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (workdir / "report.md").write_text(_markdown(report))
    _plot(report, workdir / "history.png")
    for line in _targets_lines(report["targets"]):
        say(line)
    say(
        f"verify: {'ok' if verified.ok else 'FAILED'}; wrote {workdir / 'report.md'}, report.json, "
        f"history.png{', certificate.json and certificate.md' if certificate else ''} in {report['seconds']} s"
    )
    return report


class _EvalCache:
    """Evaluation figures by what they are a function of: the weights, the records, the code.

    A second run replays the same seeded ledger steps on the same thread count, so it
    materialises bit-identical weights and every evaluation is a hit; any change of a
    weight, a record, an image, the tokenizer or ``evaluate.py`` is a miss, measured
    afresh. Called like :func:`kvw_ledger.evaluate.evaluate_records`.
    """

    def __init__(self, root: Path, model_dir: Path) -> None:
        from kvw_ledger import evaluate

        self.root = root
        self._base = hashlib.sha256()
        self._base.update(Path(evaluate.__file__).read_bytes())  # how figures are computed
        for name in sorted(p.name for p in model_dir.iterdir() if p.suffix != ".safetensors"):
            self._base.update(name.encode() + (model_dir / name).read_bytes())  # tokenizer, configs
        self._images: dict[Path, str] = {}

    def _key(self, model: Any, records: Sequence[Record], options: Any) -> str:
        h = self._base.copy()
        h.update(repr(options).encode())
        for r in records:
            fields = [r.question, r.answer, r.id, dict(r.extra)]  # options and answers included
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
            if r.image is not None:  # the image's bytes, not its path
                if r.image not in self._images:
                    self._images[r.image] = hashlib.sha256(r.image.read_bytes()).hexdigest()
                h.update(self._images[r.image].encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def __call__(
        self, model: Any, processor: Any, records: Sequence[Record], *args: Any, **kwargs: Any
    ) -> dict[str, dict[str, float]]:
        key = self._key(model, records, (args, sorted(kwargs.items())))
        path = self.root / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        figures = evaluate_records(model, processor, records, *args, **kwargs)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(path)  # never a half-written hit
        return figures


def _cached_evaluation(
    cache: _EvalCache, model: Any, processor: Any, path: Path, max_records: int | None
) -> dict[str, Any]:
    """``evaluate_split(model, processor, path, max_records=...)``, through the cache."""
    records = read_records(path)
    if max_records is not None and len(records) > max_records:
        keep = sorted(random.Random(0).sample(range(len(records)), max_records))  # as evaluate_split
        records = [records[i] for i in keep]
    return cache(model, processor, records)


def _audit_group(
    ledger: Ledger, paths: Any, config: DemoConfig, workdir: Path, cache: _EvalCache
) -> dict[str, Any]:
    """Audits group-1 at HEAD against the version before its request."""
    from kvw_ledger.audit import audit, summary_lines

    taught = _third_of_people(paths.groups[0], paths.groups[0].parent / "g1_relearn.jsonl")
    entry = audit(
        ledger,
        "group-1",
        paths.groups_heldout[0],
        retain_probe=_sample(
            paths.retain_demo_heldout,
            paths.retain_demo_heldout.parent / "retain_probe.jsonl",
            config.eval_records,
        ),
        quantize=config.quantize,
        relearn_data=taught,
        relearn_steps=config.relearn_steps,
        relearn_lr=config.relearn_lr,
        progress=False,
        evaluator=cache,
    )
    lines = summary_lines(entry.body)
    if taught is None:
        lines.append("  relearning skipped: group-1 has fewer than two people")
    return {"version": entry.version, "body": entry.body, "lines": lines}


def _third_of_people(source: Path, dest: Path) -> Path | None:
    """The records of the first third of the people in ``source`` (None under two people)."""
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    people = sorted({r["person"] for r in records})
    if len(people) < 2:
        return None
    chosen = set(people[: max(1, len(people) // 3)])
    dest.write_text("".join(json.dumps(r) + "\n" for r in records if r["person"] in chosen))
    return dest


def _certify_group(ledger: Ledger, workdir: Path) -> dict[str, Any]:
    """group-1's certificate beside report.md, signed with a key made for the demo."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kvw_ledger.certify import certify, markdown, write_certificate

    key = Ed25519PrivateKey.generate()  # a real issuer keeps one key and publishes its .pub
    pem = workdir / "demo-issuer.pem"
    pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    pem.chmod(0o600)
    (workdir / "demo-issuer.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    cert = certify(ledger, "group-1", sign_key=pem, progress=False)
    write_certificate(cert, workdir / "certificate.json")
    (workdir / "certificate.md").write_text(markdown(cert), encoding="utf-8")
    return cert


def _sample(source: Path, dest: Path, n: int) -> Path:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    if len(lines) > n:
        step = len(lines) / n
        lines = [lines[int(i * step)] for i in range(n)]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def _gen(row: dict[str, Any], split: str, modality: str) -> float:
    return float(row["metrics"][split].get(modality, {}).get("gen_acc", float("nan")))


def _table_header(splits: list[str]) -> str:
    cells = "".join(f"{s + ' img/txt':>20}" for s in splits)
    return f"{'ver':>4}  {'step':<18}{cells}"


def _active(ledger: Ledger, version: int) -> list[str]:
    """The requests active at ``version``: its entry records them (``verify`` checks that
    they are the replay's), so no step replays the journal again."""
    body = ledger.journal.get(version).body
    return list(body["active"]) if "active" in body else ledger.state(version).active


def _table_row(row: dict[str, Any]) -> str:
    cells = "".join(
        f"{_gen(row, s, 'image'):>12.2f}/{_gen(row, s, 'text'):.2f}" for s in row["metrics"]
    )
    return f"{row['version']:>4}  {row['step']:<18}{cells}"


def _layer_history(ledger: Ledger) -> list[dict[str, Any]]:
    """Per version: the mean cumulative exponent of each layer's value vectors."""
    history = []
    for entry in ledger.entries():
        exponents = ledger.exponents(entry.version)
        per_layer: dict[int, list[float]] = {}
        for site in ledger.sites:
            per_layer.setdefault(site.layer, []).append(float(exponents[site.name].mean()))
        history.append(
            {
                "version": entry.version,
                "op": entry.op,
                "mean_exponent": {str(k): sum(v) / len(v) for k, v in sorted(per_layer.items())},
            }
        )
    return history


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    before = rows[0]
    after = {row["step"]: row for row in rows}
    checks: dict[str, Any] = {}
    for i in (1, 2, 3):
        row = after[f"forget group-{i}"]
        for modality in ("image", "text"):
            checks[f"group-{i} {modality} forgotten (<= 0.30)"] = _gen(row, f"group-{i}", modality)
            retained = _gen(row, "retain", modality) / max(_gen(before, "retain", modality), 1e-9)
            checks[f"retain {modality} after group-{i} (>= 0.90 of before)"] = retained
            if i < 3:  # issue 15: the groups not yet requested are spared (the worst of them)
                checks[f"groups not yet requested, {modality}, after group-{i} (>= 0.95 of before)"] = min(
                    _gen(row, f"group-{j}", modality) / max(_gen(before, f"group-{j}", modality), 1e-9)
                    for j in range(i + 1, 4)
                )
    last = rows[-1]
    for modality in ("image", "text"):
        checks[f"group-1 {modality} still forgotten at the end (<= 0.30)"] = _gen(
            last, "group-1", modality
        )
        # "Before it was forgotten" is the version right before group-2's request:
        # group-1's request had already touched group-2 there.
        prior = after["forget group-1"]
        back = abs(_gen(last, "group-2", modality) - _gen(prior, "group-2", modality))
        checks[f"group-2 {modality} back after revert (|diff| <= 0.05)"] = back
    return checks


def _passes(name: str, value: float) -> bool:
    if "<= 0.30" in name:
        return value <= 0.30
    if ">= 0.90" in name:
        return value >= 0.90
    if ">= 0.95" in name:
        return value >= 0.95
    return value <= 0.05


def _targets_lines(targets: dict[str, Any]) -> list[str]:
    return [f"  {'met ' if _passes(k, v) else 'MISS'}  {k}: {v:.2f}" for k, v in targets.items()]


def _markdown(report: dict[str, Any]) -> str:
    splits = list(report["rows"][0]["metrics"])
    lines = [
        "# kvw-ledger demo report",
        "",
        f"KVW: retain statistic {report['config']['statistic']}, "
        f"gamma {report['config']['gamma']}, layers {report['config']['layers']}, "
        f"batch size {report['config']['batch_size']}, epochs {report['config']['epochs']}. "
        f"Total time {report['seconds']} s.",
        "",
        "Generation accuracy (image / text questions) per version:",
        "",
        "| version | step | active | " + " | ".join(splits) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in splits) + " |",
    ]
    for row in report["rows"]:
        cells = " | ".join(
            f"{_gen(row, s, 'image'):.2f} / {_gen(row, s, 'text'):.2f}" for s in splits
        )
        lines.append(
            f"| {row['version']} | {row['step']} | {', '.join(row['active']) or '-'} | {cells} |"
        )
    lines += ["", "Multiple-choice accuracy and ROUGE-L are in report.json.", "", "## Targets", ""]
    lines += [line.strip() for line in _targets_lines(report["targets"])]
    lines += ["", f"verify: {'ok' if report['verify']['ok'] else 'FAILED'}", ""]
    if report.get("audit"):
        lines += ["## Audit of group-1", "", "```", *report["audit"]["lines"], "```", ""]
        lines += [f"Certificate: certificate.json (and .md): {report['certificate']['statement']}", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    history = report["layers"]
    for layer in history[0]["mean_exponent"]:
        left.plot(
            [h["version"] for h in history],
            [h["mean_exponent"][layer] for h in history],
            marker="o",
            label=f"layer {layer}",
        )
    left.set(title="mean cumulative exponent per layer", xlabel="version", ylabel="mean w")
    left.legend(fontsize=8)
    rows = report["rows"]
    for split in rows[0]["metrics"]:
        for modality, style in (("image", "-"), ("text", "--")):
            right.plot(
                [r["version"] for r in rows],
                [_gen(r, split, modality) for r in rows],
                style,
                marker="o",
                label=f"{split} {modality}",
            )
    right.set(title="generation accuracy", xlabel="version", ylim=(-0.05, 1.05))
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
