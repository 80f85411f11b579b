"""SD WebUI's saved prompt styles (a task's ``styles``: names of rows of ``styles.csv``), as SD
WebUI 1.10 applies them (``modules/styles.py``): each style's prompt merged into the task's
prompt in turn, its negative prompt into the negative prompt, and a hires fix's own prompts the
same way. A style's text with ``{prompt}`` takes the prompt in that place; one without is put
after it, joined by ``, `` (both stripped of spaces, an empty one left out). Torch-free.

The file is the models folder's ``styles.csv`` (SD WebUI's data folder's), with SD WebUI's
columns: ``name``, ``prompt`` (or an older file's ``text``) and ``negative_prompt``; a row whose
name starts with ``#`` is a comment. It is read again when it changes. Where SD WebUI takes an
unknown name as an empty style (it strips the prompt of spaces and goes on), this refuses the
task naming it: a style a product relies on that is missing would otherwise go unseen.
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfleet.errors import Reject
from sdfleet.tasks import TaskParams

log = logging.getLogger(__name__)

FILE = "styles.csv"
_HIRES_PROMPTS = ("hr_prompt", "hr_negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


class Styles:
    """The styles of a models folder's ``styles.csv`` (none without one)."""

    def __init__(self, models_dir: Path) -> None:
        self.path = models_dir / FILE
        self._lock = threading.Lock()
        self._seen: tuple[float, dict[str, Style]] | None = None

    def all(self) -> dict[str, Style]:
        """By name, in the file's order (a later row of a name wins, as in SD WebUI)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return {}
        with self._lock:
            if self._seen is None or self._seen[0] != mtime:
                try:
                    styles = read(self.path)
                except (OSError, UnicodeError, csv.Error) as e:  # as SD WebUI: said, then none
                    log.warning("prompt styles %s not read: %s", self.path, e)
                    styles = {}
                self._seen = (mtime, styles)
            return self._seen[1]


def read(path: Path) -> dict[str, Style]:
    """SD WebUI's ``load_from_csv``."""
    styles: dict[str, Style] = {}
    with path.open(encoding="utf-8-sig", newline="") as file:
        for row in csv.DictReader(file, skipinitialspace=True):
            name = row.get("name")
            if not row or not name or name.startswith("#"):
                continue
            prompt = row["prompt"] if "prompt" in row else row.get("text")
            styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return styles


def merge(style: str, prompt: str) -> str:
    """SD WebUI's ``merge_prompts``."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def names(params: TaskParams) -> list[str]:
    """The task's ``styles``; ``Reject`` (``invalid_params``) for anything but a list of names."""
    value = params.extra.get("styles")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise Reject(f"styles must be a list of style names, not {value!r}"[:300], code="invalid_params")
    return value


def apply(params: TaskParams, styles: Mapping[str, Style]) -> TaskParams:
    """``params`` with its styles merged into its prompts (``params`` itself without styles; its
    ``styles`` stay, for the info). ``Reject`` (``invalid_params``) for a name ``styles`` lacks."""
    wanted = names(params)
    if not wanted:
        return params
    missing = [name for name in wanted if name not in styles]
    if missing:
        known = ", ".join(sorted(styles)[:20]) or "none"
        raise Reject(
            f"no prompt style named {', '.join(map(repr, missing))} in the models folder's {FILE} "
            f"(styles there: {known})",
            code="invalid_params",
        )
    chosen = [styles[name] for name in wanted]

    def styled(text: str, negative: bool) -> str:
        for style in chosen:
            text = merge(style.negative_prompt if negative else style.prompt, text)
        return text

    extra: dict[str, Any] = dict(params.extra)
    for key, negative in zip(_HIRES_PROMPTS, (False, True), strict=True):
        if isinstance(extra.get(key), str) and extra[key]:  # empty: the (styled) first pass's
            extra[key] = styled(extra[key], negative)
    return params.model_copy(
        update={
            "prompt": styled(params.prompt, False),
            "negative_prompt": styled(params.negative_prompt, True),
            "extra": extra,
        }
    )
