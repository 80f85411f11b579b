"""requirements/lock.txt matches pyproject.toml: every requirement of the project and of the extras the
Makefile installs is pinned there at a version it accepts; torch stays out of it (requirements/torch.txt)
and nothing CUDA comes in. `make lock-check` has pip-compile itself confirm the same with the registry."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
TORCH = ROOT / "requirements" / "torch.txt"


def _pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _locked_extras() -> list[str]:
    found = re.search(r"--extra (\S+)", (ROOT / "Makefile").read_text())
    assert found is not None, "the Makefile's pip-compile names the extras it locks"
    return found.group(1).split(",")


UNLOCKED = {"upscalers"}
"""spandrel requires torchvision, whose PyPI wheels are CUDA builds: the Makefile installs it pinned,
without dependencies, after the lock (see pyproject.toml)."""


def test_the_lock_covers_every_extra() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    assert sorted(_locked_extras()) == sorted(set(extras) - UNLOCKED)


def test_the_unlocked_extra_is_installed_pinned_without_dependencies() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    makefile = (ROOT / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if "--no-deps" in x and "spandrel" in x)
    pins = dict(re.findall(r"'([a-z-]+)==([0-9.]+)'", line))
    for extra in UNLOCKED:
        for text in extras[extra]:
            req = Requirement(text)
            assert req.specifier.contains(pins[req.name]), (req, pins)


def test_every_requirement_is_pinned_at_a_version_it_accepts() -> None:
    pins, torch = _pins(LOCK), _pins(TORCH)
    project = _project()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict) and isinstance(project["dependencies"], list)
    wanted = [*project["dependencies"], *(r for e in _locked_extras() for r in extras[e])]
    problems = []
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        pinned = torch.get(name) if name == "torch" else pins.get(name)
        if pinned is None:
            problems.append(f"{req} is not in {LOCK.name}: run `make lock`")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req} does not accept the locked {name}=={pinned}: run `make lock`")
    assert not problems, "\n".join(problems)


def test_torch_is_the_cpu_release_outside_the_lock_and_nothing_cuda_is_in_it() -> None:
    pins = _pins(LOCK)
    assert _pins(TORCH) == {"torch": Version("2.13.0")}
    assert "torch" not in pins
    cuda = [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    assert not cuda, f"CUDA packages in the lock: {cuda}"
    assert "pip" in pins and "setuptools" in pins, "the installer and the build backend are pinned too"
