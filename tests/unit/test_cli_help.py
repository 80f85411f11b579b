"""Every command's help reads well in the command lists of ``sdfleet -h`` and its groups, and every
command and option is in the README (options may be in the docs it links)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from sdfleet.cli import app


def _commands(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    if isinstance(cmd, TyperGroup):  # typer's own click, not the click package
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app), ()))


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) or "sdfleet" for p, _ in COMMANDS])
def test_a_commands_summary_is_one_line_of_plain_text(path: tuple[str, ...], cmd: Any) -> None:
    # typer's rich help keeps a summary's line breaks in the command list, where they break rows
    summary = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
    assert summary, f"{path} has no help"
    assert "\n" not in summary, f"{path}: a summary of one line, the rest in a paragraph below"
    assert "``" not in (cmd.help or ""), f"{path}: the help is shown as written, not as reST"


GROUPS = [p for p, c in COMMANDS if isinstance(c, TyperGroup)]


@pytest.mark.parametrize("group", GROUPS, ids=[" ".join(p) or "sdfleet" for p in GROUPS])
def test_each_command_is_one_row_of_its_groups_list(group: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*group, "-h"], terminal_width=250, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    panel = result.output.split("Commands")[1]
    rows = [line.strip("│ ").strip() for line in panel.splitlines()[1:] if line.startswith("│")]
    subcommands = {p[-1] for p, _ in COMMANDS if p[:-1] == group and p}
    assert {row.split()[0] for row in rows} == subcommands, rows  # no row holds a summary's second line


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) or "sdfleet" for p, _ in COMMANDS])
def test_every_option_says_what_it_does(path: tuple[str, ...], cmd: Any) -> None:
    silent = [p.opts for p in cmd.params if p.param_type_name == "option" and not p.help]
    assert not silent, f"{path}: options without help"


ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
DOCS += (ROOT / "bench" / "README.md").read_text()
LEAVES = [(p, c) for p, c in COMMANDS if p and not isinstance(c, TyperGroup)]


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_and_option_is_documented(path: tuple[str, ...], cmd: Any) -> None:
    name = " ".join(path)
    # a row of the README's command table names a command in full, or after "·" its last word
    assert f"sdfleet {name}" in README or f"`{path[-1]} " in README, f"{name}: not in the README"
    options = [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
    missing = [p.opts for p in options if not any(o in DOCS for o in (*p.opts, *p.secondary_opts))]
    assert not missing, f"{name}: options in neither the README nor docs/"
