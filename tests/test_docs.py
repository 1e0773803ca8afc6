"""The README and the help text cannot drift from the CLI: every verb's help has an
example, and every option of every verb is in the README's Commands table."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvw_ledger import cli, sites
from kvw_ledger.cli import writing

README = Path(__file__).resolve().parents[1] / "README.md"
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
