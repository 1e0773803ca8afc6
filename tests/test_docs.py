"""The docs cannot drift from the code: every verb's help has an example, every option
of every verb is in the README's Commands table, and docs/architecture.md's module
table lists every module in the order the imports run."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvw_ledger import cli, sites
from kvw_ledger.cli import writing

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VERBS = sorted(cli.main.commands)


def _commands_table() -> dict[str, str]:
    """verb -> its row of the README's Commands table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1]
    table = section[section.index("| command | options |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `([a-z-]+)[ `]", line)
        if match:
            rows[match.group(1)] = line
    return rows


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_has_an_example(verb: str) -> None:
    out = CliRunner().invoke(cli.main, [verb, "--help"]).output
    example = out.split("Example:", 1)
    assert len(example) == 2, f"`kvw-ledger {verb} --help` has no Example: section"
    assert f"kvw-ledger {verb} " in example[1].split("Options:")[0]


def test_every_option_of_every_verb_is_in_the_commands_table() -> None:
    rows = _commands_table()
    assert sorted(rows) == VERBS, "the Commands table lists exactly the CLI's verbs"
    missing = []
    for verb in VERBS:
        for param in cli.main.commands[verb].params:
            if isinstance(param, click.Option) and param.name != "help":
                names = [o for o in param.opts if o.startswith("--")]
                if not any(re.search(rf"`?{re.escape(n)}\b", rows[verb]) for n in names):
                    missing.append(f"{verb} {names[0]}")
    assert missing == []


def test_help_says_what_the_data_refs_and_layers_are() -> None:
    def help_of(verb: str) -> str:
        return CliRunner().invoke(cli.main, [verb, "--help"]).output

    for verb in ("forget", "retain"):
        assert '{"question": ..., "answer": ...}' in help_of(verb)
    for verb in ("show", "diff"):
        text = " ".join(help_of(verb).split())
        assert "REF is a version number" in text and "put -- before a REF that starts with '-'" in text
    assert "0-based and inclusive, clipped" in " ".join(help_of("forget").split())


def test_the_tower_choices_are_those_sites_knows() -> None:
    assert writing.TOWER_CHOICES == sites.TOWER_CHOICES


def _table_rows() -> list[list[str]]:
    """docs/architecture.md's module table: each row's module files, in table order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            rows.append(re.findall(r"`([^`]+)`", first))
    return rows


def _module_level_imports(path: Path) -> set[str]:
    """The kvw_ledger modules ``path`` imports when it is imported (not inside a
    function, not under ``if TYPE_CHECKING``)."""
    import ast

    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                if isinstance(node, ast.If | ast.Try | ast.With) and hasattr(node, field):
                    visit(getattr(node, field))

    visit(tree.body)
    return {name for name in found if name.startswith("kvw_ledger.")}


def test_the_architecture_table_lists_every_module_in_import_order() -> None:
    """Nothing imports a module listed below it (imports inside functions, which run
    later, and type hints aside), and every module has its row."""
    rows = _table_rows()
    row_of: dict[str, int] = {}
    for i, names in enumerate(rows):
        for name in names:
            target = ROOT / "kvw_ledger" / name
            files = sorted(target.rglob("*.py")) if name.endswith("/") else [target]
            for f in files:
                row_of[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = i
    modules = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
        for f in (ROOT / "kvw_ledger").rglob("*.py")
    }
    del modules["kvw_ledger"]  # the package's lazy exports (PEP 562) import on first use
    assert sorted(set(modules) - set(row_of)) == []
    upward = []
    for name, path in sorted(modules.items()):
        for imported in _module_level_imports(path):
            if imported in row_of and row_of[imported] > row_of[name]:
                upward.append(f"{name} imports {imported}")
    assert upward == []
