"""The Dockerfiles, read as text (no Docker here): their pip steps are CI's (the Makefile's install
recipe), so a dependency set CI does not test cannot reach an image; multi-stage, non-root, pinned."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("api", "worker", "agent")
# Options that change where or how quietly pip installs, not what.
_FLAGS = {"-q", "--quiet", "-e", "--editable", "--no-cache-dir", "--upgrade", "-U"}
_FLAGS_WITH_ARG = {"--index-url", "--extra-index-url", "-c", "--constraint"}


def _pip_installs(text: str) -> list[list[str]]:
    """The requirement lists of every ``pip install`` in a Makefile recipe or Dockerfile RUN."""
    joined = text.replace("\\\n", " ")
    installs = []
    for m in re.finditer(r"pip install ([^\n&;]*)", joined):
        words = shlex.split(re.sub(r"\$\{[^}]*\}", "", m.group(1)))
        reqs, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w in _FLAGS_WITH_ARG:
                skip = True
            elif not w.startswith("-"):
                reqs.append(w)
        if reqs != ["pip"]:
            installs.append(reqs)
    return installs


def _extras(req: str) -> set[str]:
    m = re.fullmatch(r"\.\[([a-z,]+)\]", req)
    assert m, f"the package is installed from the source tree with extras, got {req!r}"
    return set(m.group(1).split(","))


def _dockerfile(name: str) -> str:
    return (DOCKER / f"{name}.Dockerfile").read_text()


def _ci_installs() -> tuple[str, set[str]]:
    """(torch pin, extras) of the Makefile's install recipe, which CI runs (`.ci/run` → make test)."""
    installs = _pip_installs((ROOT / "Makefile").read_text())
    torch = next(r for reqs in installs for r in reqs if r.startswith("torch=="))
    package = next(r for reqs in installs for r in reqs if r.startswith(".["))
    order = [r for reqs in installs for r in reqs]
    assert order.index(torch) < order.index(package)
    return torch, _extras(package)


def test_ci_recipe_is_parsed() -> None:
    torch, extras = _ci_installs()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch)
    assert {"diffusers", "aws", "redis"} <= extras


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_only_what_ci_installs(image: str) -> None:
    ci_torch, ci_extras = _ci_installs()
    reqs = [r for install in _pip_installs(_dockerfile(image)) for r in install]
    packages = [r for r in reqs if r.startswith(".[")]
    assert len(packages) == 1, reqs
    extras = _extras(packages[0])
    assert extras <= ci_extras - {"dev"}
    others = [r for r in reqs if not r.startswith(".[")]
    if image == "worker":
        assert "diffusers" in extras
        assert others == [ci_torch], "torch pinned as in CI, before the package"
        assert reqs.index(ci_torch) < reqs.index(packages[0])
    else:
        assert "diffusers" not in extras and not others, f"no torch in the {image} image"


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_multi_stage_non_root_and_pinned(image: str) -> None:
    text = _dockerfile(image)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    bases = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
    for ref in froms:
        ref = bases.get(ref.strip("${}"), ref)
        if ref in stages:
            continue
        _, _, tag = ref.partition(":")
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{ref}: pin the base to a full version"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^ENTRYPOINT \[\"sdfleet\"\]", text, re.M)


def test_worker_has_a_cpu_variant_by_build_args() -> None:
    text = _dockerfile("worker")
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-", text, re.M)
    assert (
        "--build-arg BASE_IMAGE=python:" in text
        and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    )
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in text
