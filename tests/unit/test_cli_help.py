"""Every command's help reads well in the command lists of ``sdfleet -h`` and its groups."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
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
