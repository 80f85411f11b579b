"""``sdfleet models pull hf:<repo>[@rev]`` without the hub: a local Hugging Face cache built from
the tiny model (blobs, snapshot symlinks, refs, as huggingface_hub writes them) and
``HF_HUB_OFFLINE=1``. The pulled folder loads offline and the demo runs on it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdfleet.models.catalog import ModelCatalog
from sdfleet.models.hub import SOURCE_FILE, choose, drop_variant

REPO = "sdfleet-tests/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def to_fp16(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.half() for k, v in load_file(str(src)).items()}, str(dst))


def build_hub_cache(cache: Path, model: Path) -> None:
    """``cache/models--owner--name``: each file once in ``blobs/<sha256>``, the snapshot's entries
    symlinks to them, ``refs/main`` naming the commit. Weights come plain and as an fp16 variant;
    a safety checker is listed (the runtime loads without one, so a pull must skip it)."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    cache.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for path in model.rglob("*"):
        if path.is_file():
            files[path.relative_to(model).as_posix()] = path.read_bytes()
    for weights in [p for p in files if p.endswith(".safetensors")]:
        variant = drop_variant(weights, "fp16").replace(".safetensors", ".fp16.safetensors")
        scratch = cache / "scratch.safetensors"
        to_fp16(model / weights, scratch)
        files[variant] = scratch.read_bytes()
        scratch.unlink()
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    files["model_index.json"] = json.dumps(index).encode()
    files["safety_checker/config.json"] = b"{}"
    files["safety_checker/model.safetensors"] = os.urandom(4096)
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdfleet.models.tiny import make_tiny

    work = tmp_path_factory.mktemp("hub")
    build_hub_cache(work / "cache", make_tiny(work / "src", "tiny-sd"))
    return work / "cache"


def cli(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "COLUMNS": "200"}
    command = [sys.executable, "-c", "from sdfleet.cli import main; main()", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_pull_fetches_one_variant_of_each_component_it_loads(tmp_path: Path, hub_cache: Path) -> None:
    run = cli("models", "pull", f"hf:{REPO}", "--dir", str(tmp_path), "--json", cache=hub_cache)
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)
    folder = tmp_path / "tiny-sd"
    assert (result["name"], result["commit"], result["path"]) == ("tiny-sd", COMMIT, str(folder))
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.read_bytes() == (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    assert not list(folder.rglob("*.fp16.*")) and not (folder / "safety_checker").exists()
    assert json.loads((folder / SOURCE_FILE).read_text())["commit"] == COMMIT
    info = ModelCatalog(tmp_path).resolve("tiny-sd")
    assert (info.kind, info.tiny) == ("diffusers", True)

    again = cli("models", "pull", f"hf:{REPO}", "--dir", str(tmp_path), cache=hub_cache)
    assert again.returncode == 0 and "is up to date" in again.stdout

    pinned = cli(
        "models",
        "pull",
        f"hf:{REPO}@{COMMIT}",
        "--name",
        "tiny-fp32",
        "--variant",
        "none",
        "--dir",
        str(tmp_path),
        cache=hub_cache,
    )
    assert pinned.returncode == 0, pinned.stderr
    plain = tmp_path / "tiny-fp32" / "unet" / "diffusion_pytorch_model.safetensors"
    assert plain.read_bytes() == (snapshot / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    # Another model under that name is not written over (it was, by a rename into the trash).
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model_index.json").write_text("{}")
    over = cli("models", "pull", f"hf:{REPO}", "--name", "mine", "--dir", str(tmp_path), cache=hub_cache)
    assert over.returncode == 2, over.stderr
    assert f"{mine} exists and was not pulled from hf:{REPO}; give --name another name" in over.stderr
    assert [p.name for p in mine.iterdir()] == ["model_index.json"]


def test_a_repository_missing_from_the_offline_cache_is_a_clear_error(
    tmp_path: Path, hub_cache: Path
) -> None:
    run = cli("models", "pull", "hf:nobody/nothing", "--dir", str(tmp_path), cache=hub_cache)
    assert run.returncode == 2
    assert "is not in the local Hugging Face cache" in run.stderr and "HF_HUB_OFFLINE=1" in run.stderr
    bad = cli("models", "pull", "hf:not a repo", "--dir", str(tmp_path), cache=hub_cache)
    assert bad.returncode == 2 and "expected hf:<owner>/<name>[@revision]" in bad.stderr
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


def test_the_hubs_warnings_are_logged_once_as_json(tmp_path: Path) -> None:
    """huggingface_hub gives its logger a stderr handler of its own and still propagates: its
    retry warnings (an unreachable hub) came out twice, once as plain text beside the JSON line."""
    code = (
        "import logging, pathlib; from sdfleet.telemetry import setup_logging; setup_logging(); "
        "from sdfleet.models.hub import HubPull; import huggingface_hub.utils.logging; "
        "HubPull(pathlib.Path('.'), 'hf:a/b', name=None, variant=None, bars=False); "
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    said = [line for line in run.stderr.splitlines() if "Retrying" in line]
    assert run.returncode == 0 and len(said) == 1, run.stderr
    assert json.loads(said[0])["logger"] == "huggingface_hub.utils._http"


def test_the_demo_runs_on_a_pulled_model(tmp_path: Path, hub_cache: Path) -> None:
    models = tmp_path / "models"
    assert cli("models", "pull", f"hf:{REPO}", "--dir", str(models), cache=hub_cache).returncode == 0
    env_models = {"SDFLEET_FLEET__MODELS__DIR": str(models)}  # as a user's sdfleet.yaml would give it
    command = [sys.executable, "-c", "from sdfleet.cli import main; main()", "demo", "--model", "tiny-sd"]
    command += ["--size", "64", "--data-dir", str(tmp_path / "demo")]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "COLUMNS": "200",
        **env_models,
    }
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "queues default (model tiny-sd)" in run.stdout
    found = re.findall(r"(\S+\.png) \((\d+)x(\d+) PNG", run.stdout)
    assert [(int(w), int(h)) for _, w, h in found] == [(64, 64), (64, 64)], run.stdout
    assert all(Path(p).is_file() for p, _, _ in found)
    assert "noise from a tiny test model" in run.stdout  # it is the tiny model, and says so


def test_choose_prefers_the_variant_and_skips_the_safety_checker() -> None:
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/config.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "safety_checker/model.safetensors",
        "sd_turbo.safetensors",
    ]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": ["stable_diffusion", "X"],
        "feature_extractor": [None, None],
    }
    assert choose(files, index, "fp16") == {
        "model_index.json": "model_index.json",
        "unet/config.json": "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json": "text_encoder/config.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors": "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors": "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json": "text_encoder/model.safetensors.index.json",
        "vae/config.json": "vae/config.json",
        "vae/diffusion_pytorch_model.bin": "vae/diffusion_pytorch_model.bin",
    }
    plain = choose(files, index, None)
    assert plain["unet/diffusion_pytorch_model.safetensors"] == "unet/diffusion_pytorch_model.safetensors"
    assert not any("fp16" in f for f in plain)
