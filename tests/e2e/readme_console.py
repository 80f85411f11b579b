"""Run the ```console blocks of a README section and hold their outputs to what the README shows.

A block is a series of ``$ command`` lines, each followed by the output it prints (stdout and stderr
as a terminal shows them). A command goes on over lines that end in ``\\`` and over a heredoc
(``<<'EOF'`` … ``EOF``); one that ends in ``&`` runs in the background. In a shown output:

- ``…`` on a line of its own stands for any number of lines (state lines that depend on timing);
  inside a line it stands for any text on that line;
- task ids (ULIDs), the 4-hex tags of output file names (``<id>-<tag>-1.png``, random per run)
  and signed file links are the values of the run that was recorded; the checking
  run captures its own values at the same places and puts them into the later commands that use
  the recorded ones, as a person copies an id or a link from one command into the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ELLIPSIS = "…"
ULID = r"[0-9a-hjkmnp-tv-z]{26}"
SIGNED_LINK = r"https?://\S+?[?&]sig=[0-9a-f]+"
TAG = r"[0-9a-f]{4}"
_VARIABLE = re.compile(
    rf"(?P<link>{SIGNED_LINK})|(?P<tag>(?<={ULID}-){TAG}(?=-\d+\.\w+|\.out))|(?P<id>\b{ULID}\b)|(?P<any>{ELLIPSIS})"
)
_KINDS = {"link": SIGNED_LINK, "tag": TAG, "id": ULID}


@dataclass
class Step:
    command: str
    shown: list[str]
    background: bool = False


def section(readme: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def steps(text: str) -> list[Step]:
    """The steps of every ```console block in ``text``, in order."""
    out: list[Step] = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise ValueError(f"output before any command in a console block: {lines[i]!r}")
            command, i = _command(lines, i)
            shown = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            background = command.rstrip().endswith("&")
            out.append(Step(command.rstrip().removesuffix("&").rstrip(), shown, background))
    return out


def _command(lines: list[str], i: int) -> tuple[str, int]:
    parts = [lines[i][2:]]
    heredoc = re.search(r"<<-?'?(\w+)'?", parts[0])
    i += 1
    while parts[-1].endswith("\\") and i < len(lines):
        parts.append(lines[i])
        i += 1
    if heredoc:
        while i < len(lines):
            parts.append(lines[i])
            i += 1
            if parts[-1] == heredoc.group(1):
                break
    return "\n".join(parts), i


@dataclass
class Values:
    """Recorded ids and links → the checking run's own."""

    seen: dict[str, str] = field(default_factory=dict)

    def apply(self, command: str) -> str:
        for recorded in sorted(self.seen, key=len, reverse=True):  # a link holds ids: links first
            command = command.replace(recorded, self.seen[recorded])
        return command

    def match(self, shown: list[str], actual: list[str]) -> bool:
        """Whether ``actual`` is what ``shown`` shows; on success the captured values are kept."""
        found: dict[str, str] = {}
        if not self._match(_trim(shown), _trim(actual), found):
            return False
        self.seen.update(found)
        return True

    def _match(self, shown: list[str], actual: list[str], found: dict[str, str]) -> bool:
        if not shown:
            return not actual
        if shown[0].strip() == ELLIPSIS:
            for k in range(len(actual) + 1):
                trial = dict(found)
                if self._match(shown[1:], actual[k:], trial):
                    found.update(trial)
                    return True
            return False
        if not actual:
            return False
        pattern, names = _pattern(shown[0])
        m = re.fullmatch(pattern, actual[0].rstrip())
        if m is None:
            return False
        trial = dict(found)
        for name, recorded in names.items():
            value = m.group(name)
            if trial.setdefault(recorded, value) != value or self.seen.get(recorded, value) != value:
                return False  # one recorded value stands for one value of this run
        if self._match(shown[1:], actual[1:], trial):
            found.update(trial)
            return True
        return False


def _pattern(line: str) -> tuple[str, dict[str, str]]:
    """A regex for one shown line; its named groups capture the variable values."""
    out, names, pos = [], {}, 0
    for n, m in enumerate(_VARIABLE.finditer(line.rstrip())):
        out.append(re.escape(line[pos : m.start()]))
        if m.group("any"):
            out.append(".*")
        else:
            name = f"v{n}"
            kind = next(k for k in _KINDS if m.group(k))
            out.append(f"(?P<{name}>{_KINDS[kind]})")
            names[name] = m.group(0)
        pos = m.end()
    out.append(re.escape(line.rstrip()[pos:]))
    return "".join(out), names


def _trim(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines
