"""Benchmark scenarios of a checkout's ``bench/`` folder, for ``sdfleet bench list|run``.

A scenario is a module ``bench/<name>.py`` (names starting with ``_`` are helpers) with
``main(argv) -> int``; a coroutine ``main`` is run to completion, and a result that is not an int
counts as success. Scenarios stay plain scripts too (``python bench/<name>.py``).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sdfleet.errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    summary: str


def find_bench_dir(explicit: Path | None = None, start: Path | None = None) -> Path:
    """``explicit``, else ``bench/`` in ``start`` (default: the working directory) or one of its parents.

    Raises ``ConfigError`` when there is none: the scenarios ship with a checkout, not the package.
    """
    if explicit is not None:
        if not explicit.is_dir():
            raise ConfigError(f"--bench-dir {explicit} is not a directory")
        return explicit
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "bench"
        if candidate.is_dir() and any(candidate.glob("*.py")):
            return candidate
    raise ConfigError(
        f"no bench/ folder in {here} or above: run this in an sdfleet checkout, or give --bench-dir"
    )


def list_scenarios(bench_dir: Path) -> list[Scenario]:
    """The scenarios in ``bench_dir``, by name, each with its docstring's first line (not imported)."""
    out = []
    for path in sorted(bench_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except SyntaxError:
            doc = "(does not parse)"
        out.append(Scenario(path.stem, path, doc.strip().splitlines()[0] if doc.strip() else ""))
    return out


def load_scenario(bench_dir: Path, name: str) -> ModuleType:
    """Import ``bench_dir/<name>.py`` by path (the folder need not be a package)."""
    names = [s.name for s in list_scenarios(bench_dir)]
    if name not in names:
        raise ConfigError(f"no scenario {name!r} in {bench_dir}; there are: {', '.join(names) or 'none'}")
    path = bench_dir / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sdfleet_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_scenario(bench_dir: Path, name: str, argv: list[str]) -> int:
    """Run scenario ``name``'s ``main(argv)``; its exit status (0 when it returns something else)."""
    module = load_scenario(bench_dir, name)
    main = getattr(module, "main", None)
    if not callable(main):
        raise ConfigError(f"{bench_dir / name}.py has no main(argv)")
    result = main(argv)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


async def _await(awaitable: object) -> object:
    assert inspect.isawaitable(awaitable)
    return await awaitable
