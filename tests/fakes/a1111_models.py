"""Pydantic mirrors of SD WebUI's API request models, field names and types, to check what we send.

Sources (AUTOMATIC1111/stable-diffusion-webui, read with the search tool):
- ``modules/api/models.py`` @ 008a8e7576387bc172f9ecd0384274dd19f9036b: ``API_NOT_ALLOWED``, the extra
  fields of ``StableDiffusionTxt2ImgProcessingAPI`` / ``StableDiffusionImg2ImgProcessingAPI``,
  ``ExtrasBaseRequest``, ``ExtrasSingleImageRequest``, ``FileData``, ``ExtrasBatchImagesRequest``.
- ``modules/processing.py`` @ 0027ce1f6e58c5f4279173e468a60aef420babfe: the ``__init__`` fields of
  ``StableDiffusionProcessing``, ``StableDiffusionProcessingTxt2Img`` and ``...Img2Img`` that the API
  models are generated from (every generated field is ``Optional``; ``Image`` becomes ``str``).
Brought up to SD WebUI 1.10.1 (82a973c0, read from its source): ``scheduler``, ``firstpass_image``,
``hr_scheduler``, ``mask_round``; the field sets equal the ``parameters`` 1.10.1 echoes
(tests/data/sdwebui-1.10.1.json, checked in test_a1111_server.py). ``extra="forbid"`` and
``strict=True`` make a wrong name or type fail.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)


class _Processing(BaseModel):
    """``StableDiffusionProcessing`` less ``API_NOT_ALLOWED``."""

    model_config = _STRICT

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = 0
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    # additional_fields of both API models
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class StableDiffusionTxt2ImgProcessingAPI(_Processing):
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class StableDiffusionImg2ImgProcessingAPI(_Processing):
    init_images: list[Any] | None = None
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ExtrasBaseRequest(BaseModel):
    model_config = _STRICT

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(BaseModel):
    model_config = _STRICT

    data: str
    name: str


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData]


REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/sdapi/v1/txt2img": StableDiffusionTxt2ImgProcessingAPI,
    "/sdapi/v1/img2img": StableDiffusionImg2ImgProcessingAPI,
    "/sdapi/v1/extra-single-image": ExtrasSingleImageRequest,
    "/sdapi/v1/extra-batch-images": ExtrasBatchImagesRequest,
}
