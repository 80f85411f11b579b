"""A hires fix on another checkpoint (``hr_checkpoint_name``), a refiner (``refiner_checkpoint``),
Euler a's ``eta``, Euler's churn, composable diffusion, image-to-image's noise, NGMS
(``s_min_uncond``) and Skip Early CFG (``skip_early_cond``) next to a real SD WebUI
(``SDFLEET_A1111_URL``, see ``test_a1111_interop.py``): the same requests to SD WebUI and, as
tasks' A1111 bodies, to the diffusers runtime loading SD WebUI's own checkpoint files. Every
infotext word is SD WebUI's, and each image is nearest to SD WebUI's image of the same request (the
two implementations' images of one request differ, as any diffusers and SD WebUI images do, but
less than the images of another second model, switch, upscaler or eta do)."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from comfyui_checkpoint import write_checkpoint
from PIL import Image

from fakes.tiny import no_progress
from real_servers import A1111_URL, needs_a1111
from sdfleet.compat._common import params_from_a1111
from sdfleet.models import ModelCatalog
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskType

pytestmark = [needs_a1111, pytest.mark.timeout(1800)]

SECOND = "sdfleet-hires-second.safetensors"
PINNED = {"CLIP_stop_at_last_layers": 2}
"""SD WebUI's settings for the requests, put back after each: clip skip 2 (its random
checkpoint's clip skip 1 overflows on some prompts)."""
BODY: dict[str, Any] = {
    "prompt": "a cat",
    "negative_prompt": "",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 5,
    "sampler_name": "Euler",
    "cfg_scale": 7,
    "enable_hr": True,
    "hr_scale": 2,
    "hr_second_pass_steps": 2,
    "denoising_strength": 0.5,
}
CASES = [
    {"hr_upscaler": "Lanczos", "hr_checkpoint_name": Path(SECOND).stem},
    {"hr_upscaler": "Lanczos"},
    {"hr_upscaler": "Latent", "hr_checkpoint_name": SECOND},
    {"hr_upscaler": "Latent"},  # last: SD WebUI loads its own model back
]
FIRST_USE: list[str] = []
"""The title of the second checkpoint once SD WebUI named it without its hash (``hashed``)."""
REFINED = {"refiner_checkpoint": Path(SECOND).stem}
REFINER_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    [REFINED | {"refiner_switch_at": 0.5}, REFINED | {"refiner_switch_at": 0.0}, {}],
    [REFINED | {"refiner_switch_at": 0.5, "sampler_name": "DDIM"}, {"sampler_name": "DDIM"}],
    [REFINED | {"refiner_switch_at": 0.5, "sampler_name": "Heun"}],
    [REFINED | {"refiner_switch_at": 0.6, "enable_hr": True, "hr_upscaler": "Lanczos"}],
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """SD WebUI's loaded checkpoint's title, and a folder of sdfleet's holding a link to its file
    (the suite runs beside its server, docs/runtimes.md: the file must be here)."""
    title = httpx.get(f"{A1111_URL}/sdapi/v1/options", timeout=60).json()["sd_model_checkpoint"]
    listed = httpx.get(f"{A1111_URL}/sdapi/v1/sd-models", timeout=60).json()
    first = Path(next(m["filename"] for m in listed if m["title"] == title))
    assert first.is_file(), f"SD WebUI's checkpoint {first} is not on this machine"
    ours = tmp_path_factory.mktemp("models")
    (ours / first.name).symlink_to(first)
    return title, ours


@pytest.fixture(scope="module")
def checkpoints(loaded: tuple[str, Path]) -> Iterator[tuple[str, Path]]:
    """``loaded``, its folder also holding a link to a second checkpoint (other random weights)
    put in SD WebUI's folder while the module runs."""
    title, ours = loaded
    first = (ours / title.split(" [")[0]).resolve()
    second = write_checkpoint(first.parent, SECOND, seed=1)
    (ours / second.name).symlink_to(second)
    try:
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-checkpoints", timeout=60).raise_for_status()
        yield title, ours
    finally:
        second.unlink()
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-checkpoints", timeout=60)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def unversioned(text: str) -> str:
    return re.sub(r", Version: [^,]+$", "", text)


async def test_the_second_pass_on_another_checkpoint_is_sd_webuis(checkpoints: tuple[str, Path]) -> None:
    title, folder = checkpoints
    first = title.split(" [")[0]
    runtime = DiffusersRuntime.from_options(catalog=ModelCatalog(folder), options={"device": "cpu"})
    theirs, ours = [], []
    pinned = {"override_settings": {"sd_model_checkpoint": title, **PINNED}}
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=900) as client:
        for n, case in enumerate([CASES[0], *CASES]):
            body = BODY | pinned | case
            answer = await client.post("/sdapi/v1/txt2img", json=body)
            assert answer.status_code == 200, answer.text
            their_text = json.loads(answer.json()["info"])["infotexts"][0]
            params = params_from_a1111(TaskType.TEXT_TO_IMAGE, body)
            made = await runtime.run(Job(f"t{n}", TaskType.TEXT_TO_IMAGE, first, params), no_progress)
            our_text = made.info["infotexts"][0]
            assert unversioned(our_text) == unversioned(hashed(their_text, made.info.get("hires_checkpoint")))
            theirs.append(pixels(base64.b64decode(answer.json()["images"][0])))
            ours.append(pixels(made.images[0]))
    await runtime.aclose()
    nearest(ours[1:], theirs[1:])


def hashed(text: str, title: str | None) -> str:
    """SD WebUI's infotext with the second checkpoint's title as sdfleet says it, where SD WebUI
    named it without its hash: it names a checkpoint by its hash once it has read it, not before
    its first load, where the title is made (sdfleet reads it beside the first run). Only the
    first request that names it (the fixture's file is new) may say it so."""
    bare = f": {Path(SECOND).stem}, "
    if bare not in text:
        return text
    assert title is not None and title.startswith(f"{Path(SECOND).stem} [") and not FIRST_USE, text
    FIRST_USE.append(title)
    return text.replace(bare, f": {title}, ")


def nearest(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    """Each of ``ours`` is nearest to SD WebUI's image of the same request."""
    distances = [[float(np.abs(o - t).mean()) for t in theirs] for o in ours]
    for n, row in enumerate(distances):
        assert int(np.argmin(row)) == n, distances


async def test_the_refiner_is_sd_webuis(checkpoints: tuple[str, Path]) -> None:
    """The refiner's words where SD WebUI says them (Euler, DDIM by timestep, Heun's two passes a
    step, a hires fix's second pass), and its images nearest SD WebUI's: half-way, from the start,
    and none, on the same seed."""
    await side_by_side(*checkpoints, REFINER_CASES)


def chosen(**options: Any) -> dict[str, Any]:
    return {"override_settings": options}


HIRES = {"enable_hr": True, "hr_upscaler": "Lanczos"}
BY_STEPS = chosen(refiner_switch_by_sample_steps=True)
REFINER_OPTION_CASES: list[list[dict[str, Any]]] = [
    # each pass the option names refined from 0.3 on, the images nearest SD WebUI's: the first
    # pass's next to both (the second pass refined or not), the second's next to none (the
    # second pass at 0.5 is all the refiner's from 0.3: both passes' images are near the
    # second's, here and in SD WebUI)
    [
        REFINED | HIRES | {"refiner_switch_at": 0.3} | chosen(hires_fix_refiner_pass=passes)
        for passes in ("first pass", "both passes")
    ],
    [REFINED | HIRES | {"refiner_switch_at": 0.3} | chosen(hires_fix_refiner_pass="second pass"), HIRES],
    # by steps, 0.9 is never reached (by timestep it is, at the last pass), 0.75 at 6 / 8
    [REFINED | {"refiner_switch_at": 0.9} | BY_STEPS],
    [REFINED | {"refiner_switch_at": 0.75} | BY_STEPS],
    [BY_STEPS],  # said without a refiner too
    # DDIM's 8 steps on SD WebUI's timesteps are 7 passes, counted of 8: 0.8 is never reached
    [REFINED | {"refiner_switch_at": 0.8, "sampler_name": "DDIM"} | BY_STEPS],
    [  # the words said while sampling, in their order: each pass's eta, by steps, the refiner's
        REFINED
        | HIRES
        | {"refiner_switch_at": 0.5, "sampler_name": "DDIM", "hr_sampler_name": "Euler a", "eta": 0.5}
        | chosen(hires_fix_refiner_pass="first pass", refiner_switch_by_sample_steps=True)
    ],
]
OPTION_DEFAULTS = {
    "hires_fix_refiner_pass": "second pass",
    "refiner_switch_by_sample_steps": False,
    "s_min_uncond_all": False,
    "skip_early_cond": 0.0,
}
"""What a request's override of these leaves set in SD WebUI 1.10.1 (its override leak), put back."""


async def test_the_refiners_options_are_sd_webuis(checkpoints: tuple[str, Path]) -> None:
    """SD WebUI's ``hires_fix_refiner_pass`` and ``refiner_switch_by_sample_steps`` as a request
    overrides them: their words where SD WebUI says them, and the images of each pass refined
    nearest SD WebUI's."""
    await side_by_side(*checkpoints, REFINER_OPTION_CASES)


K_DIFFUSION_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    [{"sampler_name": "Euler a", "eta": eta} for eta in (0.5, 1.0, 0.0)],
    # churn without noise (s_noise 0) is too near plain Euler to tell apart from the two
    # implementations' own difference (a mean of 13 of 255 here): unit tests hold what it does
    [{"sampler_name": "Euler", "s_churn": 1.0}, {"sampler_name": "Euler"}],
]


COMPOSABLE_CASES: list[list[dict[str, Any]]] = [  # composable diffusion, the parts' own weights
    # (weights far from 1: at 0.2 the images of a random checkpoint differ less than the two
    # implementations' own difference, a mean of about 13 of 255)
    [{"prompt": p} for p in ("a cat AND a red house :3", "a cat AND a red house :-2", "a cat")],
    [{"prompt": "a [cat:dog:0.5] AND a red house :0.5", "negative_prompt": "ugly"}],
    # a hires fix reads the parts in each pass, its own hr_prompt's too: the words (the two
    # implementations' 128² images differ by a mean of about 38 of 255 here, more than these
    # prompts change them; unit tests hold what each pass reads)
    [{"prompt": "a cat AND a red house :3", **HIRES}],
    [{"prompt": "a cat", "hr_prompt": "a cat AND a red house :-2", **HIRES}],
]


async def test_composable_diffusion_is_sd_webuis(loaded: tuple[str, Path]) -> None:
    """A prompt of several parts (``AND``): the same infotext, and each image nearest SD WebUI's
    of the same prompt among the parts at other weights and the parts alone."""
    await side_by_side(*loaded, COMPOSABLE_CASES)


async def test_k_diffusions_fields_are_sd_webuis(loaded: tuple[str, Path]) -> None:
    """Euler a's ``eta`` (k-diffusion's share of fresh noise a step) and Euler's churn
    (``s_churn``): their words (SD WebUI says ``Eta``, and no word of a request's churn), and
    images nearest SD WebUI's: at eta 0.5, 1 (its default) and 0 (no noise: Euler's path); with
    churn and without."""
    await side_by_side(*loaded, K_DIFFUSION_CASES)


INPUT = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
I2I: dict[str, Any] = {"init": INPUT, "denoising_strength": 0.6}
"""An image-to-image request of ``side_by_side``: from ``INPUT``."""
SQUARE = Image.new("L", (64, 64), 0)
SQUARE.paste(255, (16, 16, 48, 48))
MASKED: dict[str, Any] = I2I | {"mask": SQUARE, "inpainting_fill": 1, "inpaint_full_res": False}
"""A masked one: the square repainted from the input ("original"), the whole picture."""
IMG2IMG_NOISE_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    # the noise is the seed's first draw (it was its second here: the VAE's sample drew first),
    # and the variation seed's, as SD WebUI's ImageRNG
    [I2I | {"subseed": 7, "subseed_strength": s} for s in (1.0, 0.5, 0.0)],
    [I2I | {"initial_noise_multiplier": m} for m in (0.6, 1.4, 1.0)],
    [I2I | {"subseed": 7, "subseed_strength": 0.5, "initial_noise_multiplier": 0.8}],  # the words' order
    [MASKED | {"subseed": 7, "subseed_strength": s} for s in (1.0, 0.0)] + [MASKED | {"seed": 8}],
    # a hires fix's second pass draws them anew at its size: the words (the two implementations'
    # 128² images differ more than these noises change them)
    [{"subseed": 7, "subseed_strength": 0.5, **HIRES}],
    [{"seed_resize_from_w": 32, "seed_resize_from_h": 48, "hr_upscaler": "Latent", "enable_hr": True}],
]


async def test_image_to_image_noise_is_sd_webuis(loaded: tuple[str, Path]) -> None:
    """Image-to-image's noise (masked too) with variation seeds and ``initial_noise_multiplier``
    (both were refused), and a hires fix's second pass's with variation seeds: SD WebUI's words,
    and each image nearest SD WebUI's of the same request among the group's."""
    await side_by_side(*loaded, IMG2IMG_NOISE_CASES)


EVERY_PASS = chosen(s_min_uncond_all=True)
NEGATIVE = {"negative_prompt": "a red house"}
"""A negative prompt that moves the image: skipping it shows."""
NGMS_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    # every pass, every other pass below each level, none (Euler's sigmas: 14.6 down to 0.03)
    [NEGATIVE | {"s_min_uncond": s} | EVERY_PASS for s in (1000.0, 4.0)]
    + [NEGATIVE | {"s_min_uncond": s} for s in (1000.0, 0.0)],
    # the words' order: Euler a's eta said as its sampling starts, NGMS at the first pass skipped
    [NEGATIVE | {"sampler_name": "Euler a", "eta": 0.5, "s_min_uncond": 2.0}],
    # Heun's two passes a step, DDIM's timestep (the odd passes below 300: 251 and 1), a hires
    # fix's passes, image-to-image
    [NEGATIVE | {"sampler_name": "Heun", "s_min_uncond": 1000.0}, NEGATIVE | {"sampler_name": "Heun"}],
    [NEGATIVE | {"sampler_name": "DDIM", "s_min_uncond": 300.0}],
    [NEGATIVE | {"s_min_uncond": 3.0, **HIRES}],
    [I2I | NEGATIVE | {"s_min_uncond": 1000.0} | EVERY_PASS, I2I | NEGATIVE],
]


async def test_ngms_is_sd_webuis(loaded: tuple[str, Path]) -> None:
    """SD WebUI's negative guidance minimum sigma (``s_min_uncond``, its option
    ``s_min_uncond_all``; it was refused): its words where SD WebUI says them, and each image
    nearest SD WebUI's of the same request among the group's."""
    await side_by_side(*loaded, NGMS_CASES)


def early(share: float, **more: Any) -> dict[str, Any]:
    return chosen(skip_early_cond=share, **more)


SKIP_EARLY_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    # every pass (1, said as 1), the first pass only, none. (On this random checkpoint the first
    # passes make most of the negative prompt's mark: SD WebUI's own images at 1, 0.5 and 0.25 lie
    # within 0.4 of 255, less than the two implementations' own 0.5, and are not told apart here.)
    [NEGATIVE | early(share) for share in (1, 0.01)] + [NEGATIVE],
    # with NGMS: Skip Early CFG on passes 0-2, then NGMS on the odd ones it leaves (the words' order)
    [NEGATIVE | {"s_min_uncond": 1000.0} | early(0.3), NEGATIVE],
    # Heun's total_steps (16 for its 15 passes), DDIM, image-to-image (t_enc + 1 passes: 0.5 skips
    # 3 of 5), a hires fix's passes each counted anew
    [NEGATIVE | {"sampler_name": "Heun"} | early(share) for share in (0.5, 0.01)]
    + [NEGATIVE | {"sampler_name": "Heun"}],
    [NEGATIVE | {"sampler_name": "DDIM"} | early(share) for share in (1, 0.01)]
    + [NEGATIVE | {"sampler_name": "DDIM"}],
    [I2I | NEGATIVE | early(share) for share in (1, 0.5, 0.01)] + [I2I | NEGATIVE],
    [NEGATIVE | early(0.5) | HIRES, NEGATIVE | HIRES],
]


async def test_skip_early_cfg_is_sd_webuis(loaded: tuple[str, Path]) -> None:
    """SD WebUI's ``skip_early_cond`` option ("Skip Early CFG"; it was refused): its words where
    SD WebUI says them, and each image nearest SD WebUI's of the same request among the group's."""
    await side_by_side(*loaded, SKIP_EARLY_CASES)


DPM2_CASES: list[list[dict[str, Any]]] = [
    [NEGATIVE | {"sampler_name": sampler, "scheduler": schedule} for schedule in ("Karras", "Uniform")]
    for sampler in ("DPM2", "DPM2 a")
]


async def test_dpm2_is_sd_webuis(loaded: tuple[str, Path]) -> None:
    """SD WebUI's DPM2 and DPM2 a step over the schedule of one step more less its next-to-last
    sigma (``discard_next_to_last_sigma``; ``_diffusers_dpm2``): each image within 0.8 of 255 of
    SD WebUI's (Euler's are 0.5 apart; these were 0.7 and 1.6-1.8 before)."""
    await side_by_side(*loaded, DPM2_CASES, within=0.8)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def side_by_side(
    title: str, folder: Path, groups: list[list[dict[str, Any]]], within: float | None = None
) -> None:
    """Each request of ``groups`` (8 steps; no hires fix unless it asks; image-to-image from its
    ``init`` image where it gives one, masked by its ``mask``) to SD WebUI and to the diffusers
    runtime on SD WebUI's checkpoint files in ``folder``: the same words, and each group's images
    nearest SD WebUI's of the same request (and, given ``within``, each at most that far from
    it: a mean of 255)."""
    runtime = DiffusersRuntime.from_options(catalog=ModelCatalog(folder), options={"device": "cpu"})
    pinned = {"override_settings": {"sd_model_checkpoint": title, **PINNED}, "steps": 8, "enable_hr": False}
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=900) as client:
        for n, group in enumerate(groups):
            theirs, ours = [], []
            for case in group:
                init, mask = case.get("init"), case.get("mask")
                kind = TaskType.TEXT_TO_IMAGE if init is None else TaskType.IMAGE_TO_IMAGE
                body = BODY | pinned | {k: v for k, v in case.items() if k not in ("init", "mask")}
                body["override_settings"] = pinned["override_settings"] | case.get("override_settings", {})
                if init is not None:  # SD WebUI's img2img takes no hires fix
                    body = {k: v for k, v in body.items() if k != "enable_hr" and not k.startswith("hr_")}
                    body["init_images"] = [base64.b64encode(png(init)).decode()]
                if mask is not None:
                    body["mask"] = base64.b64encode(png(mask)).decode()
                answer = await client.post(f"/sdapi/v1/{'txt2img' if init is None else 'img2img'}", json=body)
                if "override_settings" in case:  # SD WebUI leaves them set
                    put_back = {k: OPTION_DEFAULTS[k] for k in case["override_settings"]}
                    (await client.post("/sdapi/v1/options", json=put_back)).raise_for_status()
                assert answer.status_code == 200, answer.text
                their_text = json.loads(answer.json()["info"])["infotexts"][0]
                params = params_from_a1111(kind, {k: v for k, v in body.items() if k != "init_images"})
                inputs = [] if init is None else [png(init)]
                given = None if mask is None else png(mask)
                job = Job(f"s{n}", kind, title.split(" [")[0], params, init_images=inputs, mask=given)
                made = await runtime.run(job, no_progress)
                refined = made.info.get("refiner")
                said = hashed(their_text, refined[0] if refined else None)
                assert unversioned(made.info["infotexts"][0]) == unversioned(said), case
                theirs.append(pixels(base64.b64decode(answer.json()["images"][0])))
                ours.append(pixels(made.images[0]))
                apart = float(np.abs(ours[-1] - theirs[-1]).mean())
                assert within is None or apart <= within, (case, apart)
            nearest(ours, theirs)
    await runtime.aclose()


SAME_PIXELS_CASES: list[list[dict[str, Any]]] = [  # each group's images compared with each other
    [NEGATIVE | {"sampler_name": sampler} for sampler in ("Euler", "Euler a", "LMS", "Heun")],
    # SD WebUI's timesteps: 8 steps (1000 // 8 divides 1000: 0.02 before), 15 (5.2 before); UniPC
    # as SD WebUI's own (9.0 before; its 16 steps for 15, 0.25 before)
    [
        NEGATIVE | {"sampler_name": sampler} | more
        for sampler in ("DDIM", "PLMS", "UniPC")
        for more in ({}, {"steps": 15})
    ],
    # image-to-image at 0.6: the last 5 of 8 steps (LMS's order counted from the first: 1.9 before);
    # DDIM's and PLMS's noised one timestep above their first evaluation (3.1 and 2.1 before);
    # UniPC's own schedule from the timestep below its noise (3.7 before)
    [
        I2I | NEGATIVE | {"sampler_name": sampler}
        for sampler in ("Euler", "Euler a", "LMS", "Heun", "DDIM", "PLMS", "UniPC")
    ],
    # masked: the timestep samplers' model given the kept latents un-noised (DDIM 3.7, UniPC 2.8
    # before)
    [MASKED | NEGATIVE | {"sampler_name": sampler} for sampler in ("Euler", "DDIM", "PLMS", "UniPC")],
]
NEAR_PIXELS_CASES: list[list[dict[str, Any]]] = [
    [
        case | {"sampler_name": sampler, "scheduler": "Karras"}
        for sampler in ("DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE")
        for case in (NEGATIVE, I2I | NEGATIVE)
    ],
]
"""Measured 0.01 to 0.07 of 255 apart: diffusers' solvers' own float arithmetic (DPM++ 2M SDE with
SD WebUI's Brownian-tree noise: 28 and 30 before; DPM++ SDE, new, 0.009 and 0.029)."""
SECOND_PASS = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 0, "denoising_strength": 0.6}
"""8 steps at 0.6: SD WebUI's schedule of 13, where diffusers' shortest is 14."""
SECOND_PASS_CASES: list[list[dict[str, Any]]] = [
    [
        NEGATIVE | SECOND_PASS | {"hr_upscaler": "Latent"} | more
        for more in (
            {},
            *({"sampler_name": name} for name in ("Heun", "DDIM", "PLMS", "UniPC")),
            {"sampler_name": "DPM++ 2M SDE", "scheduler": "Karras"},
        )
    ],
    [
        NEGATIVE | SECOND_PASS | {"hr_upscaler": "Lanczos"} | more
        for more in ({}, {"scheduler": "Karras"}, {"sampler_name": "LMS"})
    ],
]


async def test_images_are_sd_webuis_pixel_for_pixel(loaded: tuple[str, Path]) -> None:
    """The same request makes SD WebUI's image, pixel for pixel but for float noise: 8-bit pixels
    truncated as SD WebUI truncates them (diffusers rounds: 0.5 of 255 apart before), these
    k-diffusion samplers, DDIM and PLMS on SD WebUI's timesteps, UniPC on its times, and
    image-to-image and inpainting with them (each measured 0.000 apart); DPM++ 2M Karras within
    0.1."""
    await side_by_side(*loaded, SAME_PIXELS_CASES, within=0.05)
    await side_by_side(*loaded, NEAR_PIXELS_CASES, within=0.1)


async def test_a_hires_pass_runs_sd_webuis_schedule(loaded: tuple[str, Path]) -> None:
    """A hires pass of 8 steps at 0.6 runs the last 8 of SD WebUI's schedule of 13 (it ran 14:
    3.8 of 255 apart with a Lanczos upscaler, 1.0 with a latent one; LMS 2.0). Latent: 0.004
    apart measured (DDIM's ``n - 2`` evaluations as SD WebUI's: 0.024, 2.7 before; UniPC's own
    schedule of ``n - 1``: 0.002, 2.7 before; PLMS's ``n - 1``: 0.023; DPM++ 2M SDE's Brownian
    noise: 0.066, 29 before); Lanczos ×1.5
    0.36 to 0.40 (not explained: the resize is SD WebUI's byte for byte, the encoding's draw is
    SD WebUI's, another draws 2.5 to 4 apart; ×2 is 0.000)."""
    await side_by_side(*loaded, SECOND_PASS_CASES[:1], within=0.1)
    await side_by_side(*loaded, SECOND_PASS_CASES[1:], within=0.6)
