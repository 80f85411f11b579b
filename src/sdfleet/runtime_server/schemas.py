"""Request and response bodies of the AUTOMATIC1111-compatible API, with SD WebUI's field names.

Written from SD WebUI's ``modules/api/models.py`` and the processing classes its request models are
generated from (``modules/processing.py``). Unknown fields are kept (``extra="allow"``) and passed to
the runtime in ``TaskParams.extra``, as SD WebUI ignores what it does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class GenerationRequest(_Lenient):
    """What txt2img and img2img share (``StableDiffusionProcessing``)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ExtrasRequest(_Lenient):
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


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData]


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class ScriptsList(BaseModel):
    txt2img: list[str] | None = None
    img2img: list[str] | None = None
