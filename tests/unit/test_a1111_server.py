"""``sdfleet runtime serve`` driven by the third-party ``webuiapi`` client over real HTTP (127.0.0.1).

Each of the client's calls gets what it got from the real SD WebUI v1.10.1
(tests/data/webuiapi-0.9.17-sdwebui-1.10.1.json), starting right after the server starts with no
model configured: like SD WebUI, it loads the first model of its folder.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from fakes.servers import ServerThread, a1111_server, free_port
from sdfleet.media import infotext, reencode

SMALL = {"width": 64, "height": 64, "steps": 2}
REAL: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "webuiapi-0.9.17-sdwebui-1.10.1.json").read_text()
)

# Real servers with diffusers models: minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = a1111_server(tmp_path_factory.mktemp("models"), free_port(), default_model=None)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: ServerThread) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=2)


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_txt2img_right_after_start_and_fixed_seeds(api: webuiapi.WebUIApi) -> None:
    first = api.txt2img(prompt="a red cat", seed=42, batch_size=2, **SMALL)  # no model was ever chosen
    again = api.txt2img(prompt="a red cat", seed=42, batch_size=2, **SMALL)
    other = api.txt2img(prompt="a red cat", seed=43, **SMALL)
    assert [i.size for i in first.images] == [(64, 64), (64, 64)] and first.image.size == (64, 64)
    assert [pixels(i) for i in first.images] == [pixels(i) for i in again.images]
    assert pixels(first.images[0]) != pixels(other.images[0])
    real = REAL["txt2img"]["value"]
    assert sorted(first.info) == real["info_keys"] and len(first.parameters) == real["parameters_keys"]
    assert first.info["all_seeds"] == [42, 43] and first.info["sampler_name"] == "Euler a"
    assert first.info["sd_model_name"] == "tiny-a"  # the first model of the folder
    assert (
        "Seed: 42" in first.info["infotexts"][0] and "Schedule type: Automatic" in first.info["infotexts"][0]
    )
    default = api.txt2img(prompt="x", sampler_name=None, **SMALL)  # webuiapi's default sampler
    assert sorted(default.info) == REAL["txt2img default sampler"]["value"]["info_keys"]


def test_tiling_runs_and_says_so_in_the_infotext_as_sd_webui_does(api: webuiapi.WebUIApi) -> None:
    """``tiling`` was 422 'tiling is not available on this server'."""
    tiled = api.txt2img(prompt="a red cat", seed=42, tiling=True, **SMALL)
    plain = api.txt2img(prompt="a red cat", seed=42, **SMALL)
    assert pixels(tiled.image) != pixels(plain.image)
    assert "Model: tiny-a, Tiling: True, Version: " in tiled.info["infotexts"][0]  # where SD WebUI puts it
    assert "Tiling" not in plain.info["infotexts"][0]


def test_hires_fix_runs_with_sd_webuis_words(api: webuiapi.WebUIApi) -> None:
    """``enable_hr`` was 422 'enable_hr (hires fix) is not available on this server'."""
    result = api.txt2img(
        prompt="a red cat",
        seed=42,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        denoising_strength=0.5,
        **SMALL,
    )
    assert result.image.size == (128, 128)
    text = result.info["infotexts"][0]
    assert (
        "Size: 64x64, Model hash: " in text
        and "Denoising strength: 0.5, Hires upscale: 2.0, Hires upscaler: Latent, Version: " in text
    ), text
    # SD WebUI 1.10.1's own for such a request, its places for later words null
    assert result.info["extra_generation_params"] == {
        "Denoising strength": 0.5,
        "Hires prompt": None,
        "Hires negative prompt": None,
        "Hires schedule type": None,
        "Hires upscale": 2.0,
        "Hires upscaler": "Latent",
    }


def test_another_checkpoint_for_the_hires_pass_or_the_refiner_is_named_as_sd_webui_does(
    tmp_path: Path,
) -> None:
    """``hr_checkpoint_name`` was 422 'hr_checkpoint_name (hires fix) is not available on this
    server', ``refiner_checkpoint`` 422 too. They are found as SD WebUI finds a checkpoint and
    named by its short title. (A server of its own: loading tiny-b hashes it, which
    ``test_models_options_and_switching`` must not see.)"""
    srv = a1111_server(tmp_path, free_port())
    try:
        api = webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", sampler="Euler a", steps=2)
        asked = {"prompt": "a red cat", "seed": 42, "enable_hr": True, "hr_upscaler": "Latent"}
        plain = api.txt2img(**asked, denoising_strength=0.5, **SMALL)
        other = api.txt2img(**asked, denoising_strength=0.5, hr_checkpoint_name="tiny-b", **SMALL)
        assert other.image.size == (128, 128) and pixels(other.image) != pixels(plain.image)
        (title,) = [m["title"] for m in api.get_sd_models() if m["model_name"] == "tiny-b"]
        short = title.replace(".safetensors", "")  # "tiny-b [hash]": hashed when it was loaded
        assert other.info["extra_generation_params"]["Hires checkpoint"] == short and "[" in short
        assert (
            f"Model: tiny-a, Denoising strength: 0.5, Hires checkpoint: {short}, Hires upscale: 2.0"
            in (other.info["infotexts"][0])
        )
        with pytest.raises(RuntimeError, match="Could not find checkpoint with name nope"):
            api.txt2img(prompt="a", enable_hr=True, hr_checkpoint_name="nope", **SMALL)
        # the refiner (this was 422 'refiner_checkpoint='tiny-b' is not available on this
        # server'); webuiapi 0.9.17 has no argument for it: the request as SD WebUI takes it
        body = {"prompt": "a red cat", "seed": 42, "sampler_name": "Euler a", **SMALL}
        wanted = {"refiner_checkpoint": "tiny-b.safetensors", "refiner_switch_at": 0.5}
        refined = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body | wanted, timeout=300).json()
        info = json.loads(refined["info"])
        assert info["extra_generation_params"] == {"Refiner": short, "Refiner switch at": 0.5}
        assert f"Model: tiny-a, Refiner: {short}, Refiner switch at: 0.5, Version: " in info["infotexts"][0]
        plain = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300).json()
        assert refined["images"][0] != plain["images"][0]
        missing = httpx.post(
            f"{srv.url}/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": "nope"}, timeout=60
        )
        assert missing.json()["errors"] == "Could not find checkpoint with name nope", missing.text
        # SD WebUI's two refiner options, set as options or overridden by a request (they were
        # not read): the words where SD WebUI says them (test_sdwebui_weights_interop.py)
        hr = {"enable_hr": True, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}
        options = {"hires_fix_refiner_pass": "first pass"}
        httpx.post(f"{srv.url}/sdapi/v1/options", json=options, timeout=60).raise_for_status()
        by_steps = {"override_settings": {"refiner_switch_by_sample_steps": True}}
        first = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body | wanted | hr | by_steps, timeout=300)
        assert (
            "Hires upscaler: Lanczos, Refiner switch by sampling steps: True, Hires refiner: first pass, "
            f"Refiner: {short}, Refiner switch at: 0.5, Version: "
        ) in json.loads(first.json()["info"])["infotexts"][0]
        both = {"override_settings": {"hires_fix_refiner_pass": "both passes"}}
        either = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body | wanted | hr | both, timeout=300)
        said = json.loads(either.json()["info"])["extra_generation_params"]
        assert list(said)[-3:] == ["Hires refiner", "Refiner", "Refiner switch at"], said
        assert said["Hires refiner"] == "both passes" and either.json()["images"] != first.json()["images"]
        third = {"override_settings": {"hires_fix_refiner_pass": "third pass"}}
        bad = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body | wanted | hr | third, timeout=60)
        assert bad.status_code == 422 and "hires_fix_refiner_pass must be one of" in bad.text, bad.text
    finally:
        srv.stop()


def test_variation_seeds_run_with_sd_webuis_seeds_and_words(api: webuiapi.WebUIApi) -> None:
    """``subseed_strength`` was 422 'subseed_strength (variation seeds) is not available on this
    server'. The seeds, variation seeds and words are SD WebUI's (``test_a1111_interop``)."""
    varied = api.txt2img(prompt="a red cat", seed=42, subseed=7, subseed_strength=0.4, batch_size=2, **SMALL)
    info = varied.info
    assert (info["all_seeds"], info["all_subseeds"], info["subseed_strength"]) == ([42, 42], [7, 8], 0.4)
    assert "Model: tiny-a, Variation seed: 8, Variation seed strength: 0.4, Version: " in info["infotexts"][1]
    assert pixels(varied.images[0]) != pixels(varied.images[1])
    resized = api.txt2img(prompt="a red cat", seed=42, seed_resize_from_w=32, seed_resize_from_h=48, **SMALL)
    assert resized.info["all_seeds"] == [42]
    assert "Model: tiny-a, Seed resize from: 32x48, Version: " in resized.info["infotexts"][0]
    # the variation seeds go on past 2**32 - 1 as SD WebUI's (they wrapped to 0 here); the CPU
    # generator reads a seed's low 32 bits, in SD WebUI too: the image is variation seed 0's
    top = 2**32 - 1
    past = api.txt2img(prompt="a red cat", seed=42, subseed=top, subseed_strength=0.4, batch_size=2, **SMALL)
    assert past.info["all_subseeds"] == [top, top + 1], past.info["all_subseeds"]
    assert "Variation seed: 4294967296, Variation seed strength: 0.4" in past.info["infotexts"][1]
    zero = api.txt2img(prompt="a red cat", seed=42, subseed=0, subseed_strength=0.4, **SMALL)
    assert pixels(past.images[1]) == pixels(zero.images[0])
    # image-to-image's too (it was refused), with its noise multiplier, said as SD WebUI says them
    i2i = api.img2img(
        images=[Image.new("RGB", (64, 64))], prompt="a", seed=3, subseed=9, subseed_strength=0.5,
        initial_noise_multiplier=0.8, **SMALL,
    )  # fmt: skip
    words = "Variation seed: 9, Variation seed strength: 0.5, Denoising strength: 0.75, Noise multiplier: 0.8"
    assert words in i2i.info["infotexts"][0], i2i.info["infotexts"][0]
    with pytest.raises(
        RuntimeError, match=r"subseed_strength \(variation seeds\) with a mask at denoising_s"
    ):
        api.img2img(
            images=[Image.new("RGB", (64, 64))], mask_image=Image.new("L", (64, 64), 255), prompt="a",
            subseed_strength=0.5, denoising_strength=1.0, **SMALL,
        )  # fmt: skip


def txt2img(http: httpx.Client, body: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The image and infotext of a txt2img request that must succeed."""
    r = http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    return np.asarray(image.convert("RGB"), dtype=int), json.loads(r.json()["info"])["infotexts"][0]


def test_ngms_is_taken_from_the_request_or_the_option(server: ServerThread) -> None:
    """``s_min_uncond`` was 422 'not available on this server'. SD WebUI reads it from the request,
    else from its option (an override of it comes too late), and ``s_min_uncond_all`` from either."""
    body: dict[str, Any] = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 5, **SMALL}
    body |= {"sampler_name": "Euler", "cfg_scale": 7}
    every = {"override_settings": {"s_min_uncond_all": True}}

    def made(**fields: Any) -> tuple[np.ndarray, str]:
        return txt2img(http, body | fields)

    with httpx.Client(base_url=server.url, timeout=300) as http:
        skipped, text = made(s_min_uncond=1000, **every)
        assert text.endswith(", NGMS: 1000.0, NGMS all steps: True, Version: sdfleet-0.1.0"), text
        unguided, _ = made(cfg_scale=1)
        assert np.abs(skipped - unguided).max() <= 1  # every pass the prompt's prediction alone
        plain, plain_text = made()
        assert np.abs(skipped - plain).max() > 1 and "NGMS" not in plain_text
        set_options = http.post("/sdapi/v1/options", json={"s_min_uncond": 1000.0, "s_min_uncond_all": True})
        assert set_options.status_code == 200, set_options.text
        try:
            by_option, option_text = made()
            overridden, _ = made(override_settings={"s_min_uncond_all": False})
        finally:
            http.post("/sdapi/v1/options", json={"s_min_uncond": 0.0, "s_min_uncond_all": False})
        assert (by_option == skipped).all() and option_text == text
        assert np.abs(overridden - skipped).max() > 1  # every other pass only
        assert overridden.tolist() == made(s_min_uncond=1000)[0].tolist()
        bad = http.post(
            "/sdapi/v1/txt2img",
            json=body | {"s_min_uncond": 1, "override_settings": {"s_min_uncond_all": 2}},
        )
        assert bad.status_code == 422 and "s_min_uncond_all must be true or false" in bad.text, bad.text


def test_skip_early_cfg_is_taken_from_the_override_or_the_option(server: ServerThread) -> None:
    """``skip_early_cond`` changed nothing here (an option this server did not read). SD WebUI reads
    it from the request's ``override_settings``, else the option, and says ``Skip Early CFG``."""
    body: dict[str, Any] = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 5, **SMALL}
    body |= {"sampler_name": "Euler", "cfg_scale": 7}

    def made(**fields: Any) -> tuple[np.ndarray, str]:
        return txt2img(http, body | fields)

    with httpx.Client(base_url=server.url, timeout=300) as http:
        skipped, text = made(override_settings={"skip_early_cond": 1})
        assert text.endswith(", Skip Early CFG: 1, Version: sdfleet-0.1.0"), text
        unguided, _ = made(cfg_scale=1)
        assert np.abs(skipped - unguided).max() <= 1  # every pass the prompt's prediction alone
        plain, plain_text = made()
        assert np.abs(skipped - plain).max() > 1 and "Skip Early CFG" not in plain_text
        set_options = http.post("/sdapi/v1/options", json={"skip_early_cond": 1})
        assert set_options.status_code == 200, set_options.text
        try:
            by_option, option_text = made()
            overridden, overridden_text = made(override_settings={"skip_early_cond": 0})
        finally:
            http.post("/sdapi/v1/options", json={"skip_early_cond": 0.0})
        assert (by_option == skipped).all() and option_text == text
        assert (overridden == plain).all() and overridden_text == plain_text
        bad = http.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"skip_early_cond": "all"}})
        assert bad.status_code == 422 and "skip_early_cond must be a number" in bad.text, bad.text


def test_the_emphasis_option_and_override_are_taken(api: webuiapi.WebUIApi) -> None:
    """``emphasis`` was stored and left unused: brackets were always read as "Original"."""
    plain = api.txt2img(prompt="a red cat", seed=4, **SMALL)
    api.set_options({"emphasis": "Ignore"})
    try:
        ignored = api.txt2img(prompt="a (red:1.8) cat", seed=4, **SMALL)
    finally:
        api.set_options({"emphasis": "Original"})
    a, b = (np.asarray(r.image, dtype=int) for r in (plain, ignored))
    assert np.abs(a - b).max() <= 1
    assert ignored.info["infotexts"][0].endswith(", Emphasis: Ignore, Version: sdfleet-0.1.0")
    overridden = api.txt2img(
        prompt="a (red:1.8) cat", seed=4, override_settings={"emphasis": "Ignore"}, **SMALL
    )
    assert pixels(overridden.image) == pixels(ignored.image)
    original = api.txt2img(prompt="a (red:1.8) cat", seed=4, **SMALL)
    assert pixels(original.image) != pixels(ignored.image) and "Emphasis" not in original.info["infotexts"][0]


def test_fields_this_server_would_leave_out_are_refused_by_name(api: webuiapi.WebUIApi) -> None:
    """``resize_mode`` 1 ran as a plain resize and ``s_churn`` as 0, without a word: crop and fill
    run now (``test_fit_is_sd_webuis_resize``), and Euler's churn (without a word, as in SD
    WebUI); the latent mode 3 and Heun's churn are refused."""
    with pytest.raises(RuntimeError, match=r"s_churn=0\.5 \(with Heun\) is not available on this server"):
        api.txt2img(prompt="a", s_churn=0.5, sampler_name="Heun", **SMALL)
    churned = api.txt2img(prompt="a", seed=3, sampler_name="Euler", s_churn=0.5, **SMALL)
    plain = api.txt2img(prompt="a", seed=3, sampler_name="Euler", **SMALL)
    assert pixels(churned.image) != pixels(plain.image)
    assert churned.info["infotexts"] == plain.info["infotexts"]
    with pytest.raises(RuntimeError, match="resize_mode=3 is not available on this server"):
        api.img2img(images=[Image.new("RGB", (64, 64))], prompt="a", resize_mode=3, **SMALL)
    wide = Image.new("RGB", (128, 64), (30, 200, 30))  # a crop keeps the green middle third
    wide.paste((200, 30, 30), (0, 0, 43, 64))
    wide.paste((30, 30, 200), (86, 0, 128, 64))
    crop = api.img2img(images=[wide], prompt="a", resize_mode=1, seed=2, denoising_strength=0.3, **SMALL)
    stretch = api.img2img(images=[wide], prompt="a", resize_mode=0, seed=2, denoising_strength=0.3, **SMALL)
    assert crop.image.size == (64, 64)
    a, b = (np.asarray(r.image, dtype=int) for r in (crop, stretch))
    assert np.abs(a - b).max() > 32
    ddim = api.txt2img(prompt="a", seed=3, sampler_name="DDIM", eta=1.0, **SMALL)  # webuiapi's own eta
    quiet = api.txt2img(prompt="a", seed=3, sampler_name="DDIM", eta=0, **SMALL)
    assert pixels(ddim.image) != pixels(quiet.image)


def test_img2img_and_extras(api: webuiapi.WebUIApi) -> None:
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    out = api.img2img(images=[source], prompt="a blue cat", seed=7, denoising_strength=0.5, **SMALL)
    again = api.img2img(images=[source], prompt="a blue cat", seed=7, denoising_strength=0.5, **SMALL)
    assert out.image.size == (64, 64) and pixels(out.image) == pixels(again.image)
    assert sorted(out.info) == REAL["img2img"]["value"]["info_keys"]
    assert len(out.parameters) == REAL["img2img"]["value"]["parameters_keys"]
    unchanged = api.extra_single_image(image=source)  # webuiapi's defaults: upscaler "None"
    assert unchanged.image.size == (64, 64) and unchanged.info == "<p></p>"
    single = api.extra_single_image(image=source, upscaler_1="Lanczos", upscaling_resize=2)
    real_single = REAL["extra_single_image"]["value"]
    assert list(single.image.size) == real_single["image"] and single.info == real_single["info_keys"]
    batch = api.extra_batch_images(images=[source, source], upscaler_1="Lanczos", upscaling_resize=2)
    real_batch = REAL["extra_batch_images"]["value"]
    assert [list(i.size) for i in batch.images] == real_batch["images"] and batch.info == real_batch[
        "info_keys"
    ]
    odd = api.extra_batch_images(images=[source], upscaler_1="Nearest", upscaling_resize=1.5)
    assert [i.size for i in odd.images] == [(96, 96)]


def test_models_options_and_switching(api: webuiapi.WebUIApi) -> None:
    models = api.get_sd_models()
    assert sorted(m["model_name"] for m in models) == ["tiny-a", "tiny-b"]
    assert all(set(m) == set(REAL["get_sd_models"]["value"][0]) for m in models)
    by_name = {m["model_name"]: m for m in models}
    assert by_name["tiny-a"]["title"] == f"tiny-a [{by_name['tiny-a']['hash']}]"
    assert by_name["tiny-b"]["title"] == "tiny-b.safetensors"  # not loaded yet, so not hashed yet
    assert api.util_get_model_names() == sorted(m["title"] for m in models)
    assert api.util_get_current_model() == by_name["tiny-a"]["title"]
    a = api.txt2img(prompt="x", seed=1, **SMALL)
    assert api.util_set_model("tiny-b.safetensors", find_closest=False) is None  # POSTs /options
    title = api.util_get_current_model()
    assert title.startswith("tiny-b.safetensors [") and api.get_options()["sd_model_checkpoint"] == title
    b = api.txt2img(prompt="x", seed=1, **SMALL)
    assert b.info["sd_model_name"] == "tiny-b" and pixels(a.images[0]) != pixels(b.images[0])
    api.set_options({"sd_model_checkpoint": by_name["tiny-a"]["title"], "CLIP_stop_at_last_layers": 2})
    clipped = api.txt2img(prompt="x", seed=1, **SMALL)
    assert clipped.info["clip_skip"] == 2 and api.get_options()["CLIP_stop_at_last_layers"] == 2.0
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert api.util_get_current_model() == by_name["tiny-a"]["title"]
    # by the hashes SD WebUI has computed (sd-models' hash, a PNG's "Model hash"), as it takes them
    sha = next(m["sha256"] for m in api.get_sd_models() if m["model_name"] == "tiny-b")
    for alias in (sha, sha[:10]):
        api.set_options({"sd_model_checkpoint": by_name["tiny-a"]["title"]})
        api.set_options({"sd_model_checkpoint": alias})
        assert api.util_get_current_model().startswith("tiny-b.safetensors ["), alias
    by_hash = api.txt2img(prompt="x", seed=1, override_settings={"sd_model_checkpoint": sha[:10]}, **SMALL)
    assert by_hash.info["sd_model_name"] == "tiny-b"
    api.set_options({"sd_model_checkpoint": by_name["tiny-a"]["title"]})
    assert api.refresh_checkpoints() is None
    assert set(REAL["get_options keys"]["value"]) <= set(api.get_options())


def test_lists_and_state(api: webuiapi.WebUIApi) -> None:
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert api.util_get_sampler_names() == sorted(api.util_get_sampler_names())
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "uniform", "karras"]
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    progress = api.get_progress()
    assert set(progress) == set(REAL["get_progress"]["value"]) and progress["state"]["job_count"] == 0
    assert api.interrupt() == REAL["interrupt"]["value"] == {}
    assert api.skip() is REAL["skip"]["value"] is None
    flags = api.get_cmd_flags()
    assert set(REAL["get_cmd_flags"]["value"]) <= set(flags) and flags["nowebui"] is True
    assert api.get_sd_vae() == REAL["get_sd_vae"]["value"] == []
    memory = api.get_memory()
    assert set(memory["ram"]) == {"free", "used", "total"} and memory["cuda"] == {"error": "unavailable"}


def test_png_info(api: webuiapi.WebUIApi) -> None:
    made = api.txt2img(prompt="a green cat", negative_prompt="dogs, rain", seed=77, **SMALL)
    read = api.png_info(made.image)
    assert read.info == made.info["infotexts"][0]
    assert read.parameters["Prompt"] == "a green cat" and read.parameters["Negative prompt"] == "dogs, rain"
    assert (read.parameters["Seed"], read.parameters["Size-1"], read.parameters["Steps"]) == ("77", "64", "2")
    assert read.parameters["Clip skip"] == "1" and read.parameters["Schedule type"] == "Automatic"
    # As against SD WebUI itself: /png-info answers no image, so the client's ``.image`` fails.
    assert read.images == [] and REAL["png_info"] == {
        "ok": False,
        "error": "IndexError: list index out of range",
    }
    with pytest.raises(IndexError):
        _ = read.image


def test_png_info_reads_a_jpeg_or_webps_exif_as_sd_webui_does(server: ServerThread) -> None:
    """SD WebUI keeps a JPEG's or WebP's infotext in EXIF ``UserComment`` and its PNG Info reads
    it there (``tests/interop`` checks ``media.reencode``'s images against the real one)."""
    with httpx.Client(base_url=server.url, timeout=300) as http:
        made = http.post("/sdapi/v1/txt2img", json={"prompt": "a blue cat", "seed": 9, **SMALL}).json()
        png = base64.b64decode(made["images"][0])
        text = json.loads(made["info"])["infotexts"][0]
        for fmt, mime in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
            image = f"data:{mime};base64,{base64.b64encode(reencode(png, fmt)).decode()}"  # type: ignore[arg-type]
            read = http.post("/sdapi/v1/png-info", json={"image": image}).json()
            assert read["info"] == text and read["parameters"]["Seed"] == "9", (fmt, read)
            assert "exif" not in read["items"], read["items"]


def test_images_come_back_in_the_samples_format_option(server: ServerThread) -> None:
    """SD WebUI's API encodes its images in ``samples_format`` (jpg, jpeg, webp: at
    ``jpeg_quality``, the infotext in EXIF); this server did PNG whatever it said.
    ``tests/interop`` checks the same against the real one."""
    with httpx.Client(base_url=server.url, timeout=300) as http:
        try:
            for fmt, pil in (("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")):
                assert http.post("/sdapi/v1/options", json={"samples_format": fmt}).status_code == 200
                made = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "seed": 5, **SMALL}).json()
                with Image.open(io.BytesIO(base64.b64decode(made["images"][0]))) as image:
                    assert image.format == pil and image.size == (64, 64)
                    assert infotext(image) == json.loads(made["info"])["infotexts"][0]
            http.post("/sdapi/v1/options", json={"samples_format": "tiff"})
            bad = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", **SMALL})
            assert bad.status_code == 422 and bad.json()["detail"] == "Invalid image format", bad.text
        finally:
            http.post("/sdapi/v1/options", json={"samples_format": "png"})


def test_a_json_body_without_a_content_type_is_read_as_sd_webui_reads_it(server: ServerThread) -> None:
    """``requests.post(url, data=json.dumps(body))`` sends no ``Content-Type``: SD WebUI 1.10
    (FastAPI 0.94) reads the body as JSON; newer FastAPI answered every such POST 422."""
    body = json.dumps({"prompt": "a red cat", "seed": 5, **SMALL}).encode()
    with httpx.Client(base_url=server.url, timeout=300) as http:
        r = http.post("/sdapi/v1/txt2img", content=body)  # httpx sets no Content-Type for bytes
        assert "content-type" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["seed"] == 5
        bad = http.post("/sdapi/v1/txt2img", content=b"{not json")
        assert bad.status_code == 422, bad.text  # still JSON, read as JSON: a clear refusal


def test_img2img_with_several_inputs_makes_one_item_from_each(
    api: webuiapi.WebUIApi, server: ServerThread
) -> None:
    """SD WebUI 1.10: with several init images batch item i starts from image i (the batch as
    large as the images); more images than batch_size is its error. Every item came from the first."""
    red, blue = Image.new("RGB", (64, 64), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))
    out = api.img2img(images=[red, blue], prompt="x", seed=3, batch_size=4, denoising_strength=0.5, **SMALL)
    assert len(out.images) == 2 and out.info["all_seeds"] == [3, 4] and out.info["batch_size"] == 2
    reds = api.img2img(images=[red], prompt="x", seed=3, batch_size=2, denoising_strength=0.5, **SMALL)
    assert pixels(out.images[1]) != pixels(reds.images[1]), "item 2 starts from the blue input"
    body = {"init_images": [webuiapi.raw_b64_img(red)] * 2, "prompt": "x", "batch_size": 1, **SMALL}
    with httpx.Client(base_url=server.url, timeout=300) as http:
        r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and "bad number of images passed: 2; expecting 1 or less" in r.text, r.text
    assert r.json()["error"] == "RuntimeError"  # SD WebUI's words (its status: 500)


def test_lists_of_what_this_server_lacks_are_empty_lists_not_404s(
    api: webuiapi.WebUIApi, server: ServerThread
) -> None:
    """webuiapi's get_* helpers return the answer's JSON: a 404 gave them {"detail": "Not Found"},
    and a client looping over the "list" failed. SD WebUI 1.10 serves each of these routes."""
    for get in (
        api.get_prompt_styles,
        api.get_face_restorers,
        api.get_realesrgan_models,
        api.get_hypernetworks,
        api.get_latent_upscale_modes,
    ):
        assert get() == [], get.__name__
    with httpx.Client(base_url=f"{server.url}/sdapi/v1", timeout=60) as http:
        assert http.get("/script-info").json() == []
        for path in ("/refresh-vae", "/refresh-embeddings", "/refresh-checkpoints"):
            r = http.post(path)
            assert r.status_code == 200 and r.json() is None, (path, r.text)


def test_values_beyond_the_runtimes_bounds_are_refused_by_field_name(server: ServerThread) -> None:
    """SD WebUI takes any seed, steps, CFG scale or size; this server refuses what the diffusers runtime
    does not run (documented), in the request's own words: the answer was pydantic's text about an
    internal model, with a link to pydantic's site."""
    with httpx.Client(base_url=f"{server.url}/sdapi/v1", timeout=60) as http:
        for field, value in (("seed", 2**40), ("steps", 151), ("cfg_scale", 31)):
            r = http.post("/txt2img", json={"prompt": "x", **SMALL, field: value})
            detail = r.json()["detail"]
            assert r.status_code == 422 and detail.startswith(f"{field}: "), r.text
            assert str(value) in detail and "pydantic" not in detail and "TaskParams" not in detail
        # A size the fleet's API would refuse (2048² by default) is refused before it runs.
        r = http.post("/txt2img", json={"prompt": "x", **SMALL, "width": 4096, "height": 2048})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == (
            "text-to-image at 4096x2048 (8388608 pixels) is more than the 4194304 the runtime allows "
            "(generate_max_pixels); use a smaller width/height"
        ), r.text


def test_sd_webuis_pydantic_1_coercions_are_kept(server: ServerThread) -> None:
    """SD WebUI 1.10 parses requests with pydantic 1, which truncates a float for an integer,
    takes a number for a string and an empty list for an object (PHP's json_encode writes [] for
    an empty array); these were 422 here. What the server parsed shows in ``parameters``."""
    body = {"prompt": 123, "seed": 7.9, "width": 64.5, "height": 64, "steps": 2, "override_settings": []}
    with httpx.Client(base_url=f"{server.url}/sdapi/v1", timeout=300) as http:
        r = http.post("/txt2img", json={**body, "alwayson_scripts": []})
        assert r.status_code == 200, r.text
        parameters, info = r.json()["parameters"], json.loads(r.json()["info"])
        assert (parameters["prompt"], parameters["seed"], parameters["width"]) == ("123", 7, 64)
        assert parameters["override_settings"] == {} and parameters["alwayson_scripts"] == {}
        assert info["seed"] == 7 and info["prompt"] == "123"
        bad = http.post("/txt2img", json={**body, "seed": "seven"})
        assert bad.status_code == 422, bad.text  # what pydantic 1 refuses too


def test_save_images_puts_sd_webuis_grid_first(api: webuiapi.WebUIApi) -> None:
    """SD WebUI makes a grid for a request that saves its images and returns it first (its
    ``return_grid``, ``grid_only_if_multiple``, ``n_rows`` -1 defaults); runtime serve left it out."""
    plain = api.txt2img(prompt="a red cat", seed=42, batch_size=3, **SMALL)
    saved = api.txt2img(prompt="a red cat", seed=42, batch_size=3, save_images=True, **SMALL)
    assert len(saved.images) == 4 and saved.info["index_of_first_image"] == 1
    assert [pixels(i) for i in saved.images[1:]] == [pixels(i) for i in plain.images]
    grid = saved.images[0].convert("RGB")
    assert grid.size == (128, 128)  # 3 images: round(√3) = 2 rows of 2 cells of 64×64
    for i, image in enumerate(plain.images):
        cell = grid.crop((i % 2 * 64, i // 2 * 64, i % 2 * 64 + 64, i // 2 * 64 + 64))
        assert pixels(cell) == pixels(image), i
    assert grid.getpixel((100, 100)) == (255, 255, 255)  # the empty cell: grid_background_color
    texts = saved.info["infotexts"]
    assert len(texts) == 4 and texts[0] == texts[1] == plain.info["infotexts"][0]
    assert saved.info["all_seeds"] == [42, 43, 44]
    one = api.txt2img(prompt="a red cat", seed=42, save_images=True, **SMALL)
    assert len(one.images) == 1 and one.info["index_of_first_image"] == 0  # grid_only_if_multiple


def test_unload_and_reload_checkpoint_as_sd_webui_answers_them(server: ServerThread) -> None:
    """SD WebUI 1.10.1 answers both with 200 ``{}`` and keeps serving (checked against it); here
    unload frees the runtime's pipelines and the next job, or reload, loads the checkpoint again."""
    runtime = server.server.config.app.state.sd.runtime
    base = f"{server.url}/sdapi/v1"
    chosen = httpx.get(f"{base}/options").json()["sd_model_checkpoint"]
    assert runtime.cached_models
    # Unloading frees pipelines (garbage collection): seconds on a loaded machine, not httpx's 5 s.
    r = httpx.post(f"{base}/unload-checkpoint", timeout=60)
    assert (r.status_code, r.json()) == (200, {}) and runtime.cached_models == []
    assert httpx.get(f"{base}/options").json()["sd_model_checkpoint"] == chosen
    made = httpx.post(f"{base}/txt2img", json={"prompt": "a cat", **SMALL}, timeout=120)
    assert made.status_code == 200 and len(made.json()["images"]) == 1 and runtime.cached_models
    httpx.post(f"{base}/unload-checkpoint", timeout=60)
    r = httpx.post(f"{base}/reload-checkpoint", timeout=120)
    assert (r.status_code, r.json()) == (200, {}) and runtime.cached_models


# FastAPI's own 422s, as the real SD WebUI 1.10.1 answered these calls here (pydantic 1's words).
_V1_ANSWERS = [
    (
        "/extra-single-image",
        {"image": "", "upscaler_1": "Lanczos", "upscaling_resize": 0},
        {
            "loc": ["body", "upscaling_resize"],
            "msg": "ensure this value is greater than 0",
            "type": "value_error.number.not_gt",
            "ctx": {"limit_value": 0},
        },
    ),
    (
        "/extra-single-image",
        {"image": "", "upscaler_1": "Lanczos", "resize_mode": 5},
        {
            "loc": ["body", "resize_mode"],
            "msg": "unexpected value; permitted: 0, 1",
            "type": "value_error.const",
            "ctx": {"given": 5, "permitted": [0, 1]},
        },
    ),
    (
        "/extra-single-image",
        {"image": "", "upscaler_1": None},
        {
            "loc": ["body", "upscaler_1"],
            "msg": "none is not an allowed value",
            "type": "type_error.none.not_allowed",
        },
    ),
    (
        "/txt2img",
        b"{bad json",
        {
            "loc": ["body", 1],
            "msg": "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
            "type": "value_error.jsondecode",
            "ctx": {
                "msg": "Expecting property name enclosed in double quotes",
                "doc": "{bad json",
                "pos": 1,
                "lineno": 1,
                "colno": 2,
            },
        },
    ),
]


@pytest.mark.parametrize(("path", "body", "item"), _V1_ANSWERS)
def test_fastapis_own_422s_in_pydantic_1s_words(
    server: ServerThread, path: str, body: Any, item: dict[str, Any]
) -> None:
    url = f"{server.url}/sdapi/v1{path}"
    if isinstance(body, bytes):
        answer = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        answer = httpx.post(url, json=body)
    assert (answer.status_code, answer.json()) == (422, {"detail": [item]})
