"""The Dockerfiles, read as text (no Docker here): their pip steps are CI's (the Makefile's install
recipe: the lock's versions, torch from requirements/torch.txt), so a dependency set CI does not
test cannot reach an image; multi-stage, non-root, pinned."""

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
    """The requirement lists of every ``pip install`` in a Makefile recipe or Dockerfile RUN, but
    the ``--no-deps`` reinstall of the source tree over its already installed dependencies."""
    joined = text.replace("\\\n", " ")
    installs = []
    for m in re.finditer(r"pip install ([^\n&;]*)", joined):
        if "--no-deps" in m.group(1):
            continue
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
    """(torch pin, extras) of what CI installs (`.ci/run` → make test → the Makefile's install
    recipe): the lock, compiled from pyproject.toml with the Makefile's extras, and torch.txt."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):") :].split("\ntouch", 1)[0]
    assert "-r $(TORCH) -r $(LOCK)" in recipe, "CI installs torch.txt and the lock"
    torch = next(
        line.strip()
        for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    extras = re.search(r"--extra ([a-z,]+)", makefile)
    assert extras, "the lock is compiled with the package's extras"
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert f"--extra={extras.group(1)}" in lock, "the lock was compiled with the Makefile's extras"
    return torch, set(extras.group(1).split(","))


def test_ci_recipe_is_parsed() -> None:
    torch, extras = _ci_installs()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch)
    assert {"diffusers", "aws", "redis"} <= extras


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_only_what_ci_installs(image: str) -> None:
    _, ci_extras = _ci_installs()
    text = _dockerfile(image)
    reqs = [r for install in _pip_installs(text) for r in install]
    packages = [r for r in reqs if r.startswith(".[")]
    assert len(packages) == 1, reqs
    extras = _extras(packages[0])
    assert extras <= ci_extras - {"dev"}
    # the versions CI tested: every install but torch's under the lock
    for m in re.finditer(r"pip install ([^\n&;]*)", text.replace("\\\n", " ")):
        if "--no-deps" not in m.group(1) and "requirements/torch.txt" not in m.group(1):
            assert "-c requirements/lock.txt" in m.group(1), m.group(0)
    others = [r for r in reqs if not r.startswith(".[")]
    if image == "worker":
        assert "diffusers" in extras
        assert "-r requirements/torch.txt" in text, "torch pinned as in CI, before the package"
        assert text.index("requirements/torch.txt ") < text.index(packages[0])
        assert others == ["requirements/torch.txt"], others
    else:
        assert "diffusers" not in extras and not others and "torch" not in text.split("FROM base\n")[-1]


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
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in text


# torch's PyPI wheels bundle their CUDA runtime; the node's driver must support this CUDA version.
TORCH_CUDA = {"2.13.0": "13.0"}


def test_one_python_everywhere_and_the_driver_torch_needs() -> None:
    python = re.search(r'python_version = "(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert python
    bases = {image: re.search(r"^ARG BASE_IMAGE=(\S+)", _dockerfile(image), re.M) for image in IMAGES}
    tags = {image: m.group(1) for image, m in bases.items() if m}
    assert len(set(tags.values())) == 1, tags
    assert re.fullmatch(rf"python:{re.escape(python.group(1))}\.\d+-slim-\w+", tags["api"]), tags
    worker = _dockerfile("worker")
    assert "nvidia/cuda" not in worker, "torch brings its CUDA libraries; a CUDA base only disagrees"
    torch = _ci_installs()[0].split("==")[1]
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={TORCH_CUDA[torch]}"' in worker


@pytest.mark.parametrize("image", IMAGES)
def test_dependencies_are_a_layer_below_the_source(image: str) -> None:
    lines = _dockerfile(image).splitlines()
    deps = next(i for i, line in enumerate(lines) if re.search(r"pip install .*'\.\[", line))
    copy_src = next(i for i, line in enumerate(lines) if line.startswith("COPY src"))
    reinstall = next(i for i, line in enumerate(lines) if "--no-deps" in line)
    copies_before = [line for line in lines[:deps] if line.startswith("COPY ")]
    assert copies_before == ["COPY pyproject.toml README.md ./", "COPY requirements ./requirements"]
    assert deps < copy_src < reinstall


def test_build_context_is_only_what_the_images_copy() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "exclude everything, then allow what the Dockerfiles copy"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {
        path.rstrip("/")
        for image in IMAGES
        for m in re.finditer(r"^COPY (?!--from)(.+) \S+$", _dockerfile(image), re.M)
        for path in m.group(1).split()
    }
    assert allowed == copied == {"pyproject.toml", "README.md", "requirements", "src"}
