"""LoRA in SD WebUI's prompt syntax on the diffusers runtime: tiny random LoRAs made offline for the
tiny model with peft, saved in the kohya/SD WebUI format and in diffusers' own (CPU, 64x64, 2 steps)."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from safetensors.torch import save_file

from fakes.servers import a1111_server, free_port
from sdfleet.errors import Reject
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes._diffusers_opts import DiffusersOptions
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 4


def lora_weights(model: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA for ``model``'s ``targets``, as peft makes it: module → (A, B)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, model, "made")
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="made").items()}


def kohya(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys → the kohya/SD WebUI layout: ``lora_unet_<module_path>.lora_down.weight`` ..."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        module, kind = key.rsplit(".lora_", 1)
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(RANK))
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("models")
    tiny = make_tiny(root, "tiny-a", seed=0)
    unet: torch.nn.Module = UNet2DConditionModel.from_pretrained(tiny / "unet")
    text: torch.nn.Module = CLIPTextModel.from_pretrained(tiny / "text_encoder")
    (root / "Lora" / "sub").mkdir(parents=True)
    style = kohya("lora_unet", lora_weights(unet, UNET_TARGETS, 1))
    # SD WebUI's LoRAs name text encoder layers as transformers 4 did (text_model.encoder...)
    style |= kohya("lora_te_text_model", lora_weights(text, TEXT_TARGETS, 2))
    save_file(style, str(root / "Lora" / "tiny-style.safetensors"))
    detail = lora_weights(UNet2DConditionModel.from_pretrained(tiny / "unet"), UNET_TARGETS, 3)
    StableDiffusionPipeline.save_lora_weights(
        root / "Lora" / "sub", unet_lora_layers=detail, weight_name="Tiny-Detail.safetensors"
    )
    misfit = dict(style)
    first = next(k for k in misfit if k.endswith("lora_down.weight"))
    misfit[first] = torch.zeros(RANK, 7)  # made for another model: a layer of another width
    save_file(misfit, str(root / "Lora" / "misfit.safetensors"))
    return root


def make_runtime(models_dir: Path, **options: object) -> DiffusersRuntime:
    opts = DiffusersOptions.parse({"device": "cpu", **options})
    return DiffusersRuntime(ModelCatalog(models_dir), default_model="tiny-a", options=opts)


@pytest.fixture(scope="module")
def runtime(models_dir: Path) -> DiffusersRuntime:
    return make_runtime(models_dir, max_batch=4)


def job(prompt: str, negative: str = "", task_id: str = "t-1", seed: int = 1) -> Job:
    params = TaskParams(prompt=prompt, negative_prompt=negative, steps=2, width=64, height=64, seed=seed)
    return Job(task_id, TaskType.TEXT_TO_IMAGE, None, params)


async def no_progress(value: float) -> None:
    return None


def arrays(pngs: list[bytes]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(png))).astype(int) for png in pngs]


def pixels(pngs: list[bytes]) -> list[bytes]:
    """The decoded pixels (the PNGs' own text holds the prompt, tags and all)."""
    return [Image.open(io.BytesIO(png)).tobytes() for png in pngs]


async def images(runtime: DiffusersRuntime, prompt: str, negative: str = "") -> list[bytes]:
    return pixels((await runtime.run(job(prompt, negative), no_progress)).images)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<lora:a>", [L.LoraUse("a", 1.0, 1.0)]),
        ("x <lora:a:0.5>, y", [L.LoraUse("a", 0.5, 0.5)]),
        ("<lora:a:0.5:0.25>", [L.LoraUse("a", 0.5, 0.25)]),
        ("<lora:a:te=0.3:unet=-1>", [L.LoraUse("a", 0.3, -1.0)]),
        ("<lyco:b:2> <lora:c:1:dyn=8>", [L.LoraUse("b", 2.0, 2.0), L.LoraUse("c", 1.0, 1.0)]),
        ("no tags, <not a tag>", []),
    ],
)
def test_tags_are_read_as_sd_webui_reads_them(prompt: str, expected: list[L.LoraUse]) -> None:
    assert L.parse(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:a:much>", "'much' is not a weight"),
        ("<lora:a:nan>", "'nan' is not a weight"),
        ("<hypernet:h:1>", "<hypernet:...> is not supported"),
        ("<lora: :1>", "names no LoRA"),
    ],
)
def test_bad_tags_are_rejected(prompt: str, message: str) -> None:
    with pytest.raises(Reject, match=message):
        L.parse(prompt)


def test_text_encoder_sees_no_tags() -> None:
    assert L.text("<lora:a:1>a red cat, <lyco:b>night<x:y>") == "a red cat, night"


def test_loras_are_listed(runtime: DiffusersRuntime) -> None:
    assert runtime.loras == ["misfit", "Tiny-Detail", "tiny-style"]


async def test_lora_changes_the_image_and_its_tag_is_not_text(runtime: DiffusersRuntime) -> None:
    plain = await images(runtime, "a red cat")
    first = await images(runtime, "<lora:tiny-style:1>a red cat")
    last = await images(runtime, "a red cat<lora:TINY-STYLE:1>")
    assert first == last != plain
    result = await runtime.run(job("a red cat<lora:tiny-style:1>"), no_progress)
    assert result.info["prompt"] == "a red cat<lora:tiny-style:1>"  # as SD WebUI reports it


def addnet(path: Path) -> str:
    """kohya's hash, written out here: the sha256 of what follows the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


async def test_the_infotext_says_lora_hashes_as_sd_webui_does(
    runtime: DiffusersRuntime, models_dir: Path
) -> None:
    """SD WebUI writes ``Lora hashes: "name: <12 hex>, ..."`` of the LoRAs it applied (its tags'
    names, in order); Civitai and others read it to name the LoRAs behind an image. It was not
    written."""
    style = addnet(models_dir / "Lora" / "tiny-style.safetensors")[:12]
    detail = addnet(models_dir / "Lora" / "sub" / "Tiny-Detail.safetensors")[:12]
    result = await runtime.run(job("a red cat <lora:Tiny-Detail:0.5> <lora:tiny-style:1>"), no_progress)
    said = f'Lora hashes: "Tiny-Detail: {detail}, tiny-style: {style}", Version: {VERSION}'
    assert result.info["infotexts"][0].endswith(said), result.info["infotexts"][0]
    with Image.open(io.BytesIO(result.images[0])) as im:
        assert im.info["parameters"].endswith(said)  # the PNG's own text
    negative = await runtime.run(job("a red cat", "<lora:tiny-style:0.5>"), no_progress)
    assert f'Lora hashes: "tiny-style: {style}"' in negative.info["infotexts"][0]  # applied there too
    plain = await runtime.run(job("a red cat"), no_progress)
    assert "Lora hashes" not in plain.info["infotexts"][0]


def test_runtime_serve_says_lora_hashes_unless_its_option_is_off(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(models_dir / "Lora", root / "Lora")
    srv = a1111_server(root, free_port())
    try:
        api = webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", sampler="Euler", steps=2)
        style = addnet(root / "Lora" / "tiny-style.safetensors")[:12]
        made = api.txt2img(prompt="a red cat <lora:tiny-style:0.5>", seed=1, width=64, height=64)
        assert made.info["infotexts"][0].endswith(f'Lora hashes: "tiny-style: {style}", Version: {VERSION}')
        assert made.info["extra_generation_params"] == {"Lora hashes": f"tiny-style: {style}"}
        api.set_options({"lora_add_hashes_to_infotext": False})
        off = api.txt2img(prompt="a red cat <lora:tiny-style:0.5>", seed=1, width=64, height=64)
        assert "Lora hashes" not in off.info["infotexts"][0]
    finally:
        srv.stop()


async def test_disable_extra_networks_runs_without_them_as_sd_webui_does(runtime: DiffusersRuntime) -> None:
    """SD WebUI's ``disable_extra_networks``: tags out of the text, no LoRA applied, an unknown one
    no error. It was dropped without a word (the LoRA applied)."""
    plain = await images(runtime, "a red cat")
    off = job("a red cat<lora:tiny-style:1><lora:nowhere:1>")
    off.params.extra["disable_extra_networks"] = True
    assert pixels((await runtime.run(off, no_progress)).images) == plain
    assert L.key(off) == ()


async def test_plain_images_are_the_same_before_and_after_a_lora_task(models_dir: Path) -> None:
    rt = make_runtime(models_dir)
    before = await images(rt, "a red cat", "blurry")
    with_lora = await images(rt, "a red cat <lora:tiny-style:0.8> <lora:tiny-detail:1>", "blurry")
    after = await images(rt, "a red cat", "blurry")
    assert before == after != with_lora


async def test_negative_prompt_tags_apply_the_lora(runtime: DiffusersRuntime) -> None:
    in_negative = await images(runtime, "a red cat", "blurry <lora:tiny-style:1>")
    in_prompt = await images(runtime, "a red cat <lora:tiny-style:1>", "blurry")
    assert in_negative == in_prompt


async def test_text_encoder_and_unet_weights(runtime: DiffusersRuntime) -> None:
    plain = await images(runtime, "a red cat")
    assert await images(runtime, "a red cat <lora:tiny-style:0>") == plain
    full = await images(runtime, "a red cat <lora:tiny-style:1>")
    te_only = await images(runtime, "a red cat <lora:tiny-style:1:0>")
    assert len({*plain, *full, *te_only}) == 3
    # tiny-detail has no text encoder part: its te weight changes nothing
    assert await images(runtime, "<lora:tiny-detail:0:1> x") == await images(
        runtime, "<lora:tiny-detail:1> x"
    )
    # the same LoRA twice adds its weights
    assert await images(runtime, "<lora:tiny-style:0.5> <lora:tiny-style:0.5> a red cat") == full


async def test_unknown_lora_is_rejected_with_the_list(runtime: DiffusersRuntime) -> None:
    with pytest.raises(Reject) as caught:
        await runtime.run(job("a cat <lora:nope:1>"), no_progress)
    assert caught.value.code == "unknown_lora"
    assert "LoRA nope not found; available: misfit, Tiny-Detail, tiny-style" in caught.value.reason


async def test_with_missing_lora_skip_what_is_not_found_is_left_out_as_sd_webui_does(
    models_dir: Path, runtime: DiffusersRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """SD WebUI 1.10 runs a prompt whose LoRA it lacks without it (a "Lora not found" comment,
    nothing in the API's answer), and skips extra networks it cannot find (``<hypernet:...>``);
    ``sdfleet runtime serve`` does the same by default (checked against SD WebUI 1.10.1)."""
    skipping = make_runtime(models_dir, missing_lora="skip")
    try:
        tagged = "a red cat <lora:nope:1> <lora:tiny-style:1> <hypernet:h:1>"
        got = await images(skipping, tagged, "<lora:gone>")
        assert got == await images(runtime, "a red cat <lora:tiny-style:1>")
        assert "not found, left out: nope, gone, <hypernet:h:1>" in caplog.text
        with pytest.raises(Reject, match="is not a weight"):  # a bad weight is still refused
            await skipping.run(job("a cat <lora:tiny-style:heavy>"), no_progress)
    finally:
        await skipping.aclose()
    with pytest.raises(ValueError, match="missing_lora must be one of"):
        make_runtime(models_dir, missing_lora="ignore")


async def test_lora_made_for_another_model_is_rejected_and_leaves_the_model_plain(
    runtime: DiffusersRuntime,
) -> None:
    plain = await images(runtime, "a red cat")
    await images(runtime, "a red cat <lora:tiny-style:1>")
    with pytest.raises(Reject) as caught:
        await runtime.run(job("a cat <lora:misfit:1>"), no_progress)
    assert caught.value.code == "bad_lora" and "misfit does not fit this model" in caught.value.reason
    assert await images(runtime, "a red cat") == plain


async def test_batches_share_a_call_only_with_the_same_loras(runtime: DiffusersRuntime) -> None:
    a, b = job("cat <lora:tiny-style:1>", seed=1), job("dog <lora:Tiny-Style:1.0>", task_id="t-2", seed=2)
    assert runtime.batch_key(a) == runtime.batch_key(b)
    for other in ("cat <lora:tiny-style:0.9>", "cat <lora:tiny-detail:1>", "cat", "cat <lora:x:bad>"):
        assert runtime.batch_key(job(other)) != runtime.batch_key(a)
    assert runtime.batch_key(job("cat <lora:x:bad>")) is None  # fails alone, with its reason
    batched = await runtime.run_batch([a, b], [no_progress, no_progress])
    alone = [await runtime.run(j, no_progress) for j in (a, b)]
    for together, apart in zip(batched, alone, strict=True):
        assert isinstance(together, RuntimeResult)
        # one call for both: equal up to float rounding, as test_diffusers_batching allows
        diff = np.abs(arrays(together.images)[0] - arrays(apart.images)[0])
        assert diff.max() <= 1
    assert [r.info["batch_tasks"] for r in batched] == [2, 2]  # type: ignore[union-attr]


async def test_least_recently_used_adapters_are_unloaded(models_dir: Path) -> None:
    rt = make_runtime(models_dir, lora_max_loaded=1)
    style = await images(rt, "a red cat <lora:tiny-style:1>")
    detail = await images(rt, "a red cat <lora:tiny-detail:1>")
    assert rt._loras.resident(rt._cache.get("tiny-a").pipe) == ["Tiny-Detail.safetensors"]  # type: ignore[union-attr]
    assert await images(rt, "a red cat <lora:tiny-style:1>") == style != detail
    both = await images(rt, "a red cat <lora:tiny-style:1> <lora:tiny-detail:1>")  # one call needs two
    assert both not in (style, detail)


def test_lora_option_is_checked() -> None:
    with pytest.raises(ValueError, match="lora_max_loaded"):
        DiffusersOptions.parse({"lora_max_loaded": 0})


async def test_sdxl_lora_reaches_both_text_encoders(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tiny = make_tiny(tmp_path, "tiny-xl", sdxl=True)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "Lora",
        unet_lora_layers=lora_weights(UNet2DConditionModel.from_pretrained(tiny / "unet"), UNET_TARGETS, 1),
        text_encoder_lora_layers=lora_weights(
            CLIPTextModel.from_pretrained(tiny / "text_encoder"), TEXT_TARGETS, 2
        ),
        text_encoder_2_lora_layers=lora_weights(
            CLIPTextModelWithProjection.from_pretrained(tiny / "text_encoder_2"), TEXT_TARGETS, 3
        ),
        weight_name="xl-style.safetensors",
    )
    rt = DiffusersRuntime(ModelCatalog(tmp_path), default_model="tiny-xl", device="cpu")
    plain = await images(rt, "a red cat")
    full = await images(rt, "a red cat <lora:xl-style:1>")
    te_only = await images(rt, "a red cat <lora:xl-style:1:0>")
    assert len({*plain, *full, *te_only}) == 3
    assert await images(rt, "a red cat") == plain
    adapters = rt._cache["tiny-xl"].pipe.get_list_adapters()
    assert set(adapters) == {"unet", "text_encoder", "text_encoder_2"}
