"""The seed's request and answer bodies as OpenAPI schemas, and the types the API holds them to.

The seed formats are read leniently by ``compat`` (its own wording for missing keys); these models
then check every field they declare with its declared type (``parse_strict``), so what the OpenAPI
document says is what the server accepts. Undeclared fields pass through to the runtime.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sdfleet.compat._common import MAX_INT_ID, PREFIX_PATTERN, TASK_TYPES
from sdfleet.compat.v1alpha1 import ACCEPTED_TYPES
from sdfleet.errors import worded
from sdfleet.tasks import BATCH_MAX, TASK_ID_PATTERN, Integer, integral

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
URL_HOST = rf"{_LABEL}(\.{_LABEL}){{0,126}}"
URL_PORT = r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
_PCHAR = r"[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2}"
"""RFC 3986 path characters, percent-encoded octets included (presigned S3 URLs, ``my%20cat.png``)."""
URL_PATTERN = worded(rf"^https?://{URL_HOST}{URL_PORT}(/({_PCHAR})*)?(\?({_PCHAR}|\?)*)?$", "an http(s) URL")
"""The http(s) URLs the API takes for input images and webhooks (a host name of any number of
labels, e.g. ``bucket.s3.us-west-2.amazonaws.com``, or an IPv4; an optional port; then path and
query in URL characters or percent-encoded). Where they may point is the agents' URL guard's
decision. Images may also come inline as a ``data:`` URL or base64 (checked by decoding them, not
by a pattern)."""
S3_URL_PATTERN = rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]/({_PCHAR})+$"
"""``s3://bucket/key`` inputs, as the seed's agent reads them; agents fetch them only from the
buckets ``agent.input_s3_buckets`` allows (the API cannot know those, so it checks the form)."""
INPUT_URL_PATTERN = worded(f"({URL_PATTERN})|({S3_URL_PATTERN})", "an http(s) URL or s3://bucket/key")
"""What an input image URL may be: http(s) as ``URL_PATTERN``, or ``s3://``."""
TEXT_MAX = 100_000
"""Longest prompt or negative prompt."""
NAME_MAX = 256
"""Longest sampler, upscaler, model or runtime name."""
INPUTS_MAX = 16
"""Most input images of one task."""

IdTask = str | Integer


class Extras(BaseModel):
    model_config = ConfigDict(extra="allow")


class OverrideSettings(Extras):
    """A1111 options for this request; ``sd_model_checkpoint`` names the model (v1alpha2)."""

    sd_model_checkpoint: str | None = Field(None, max_length=256)
    CLIP_stop_at_last_layers: Annotated[int, Field(ge=1, le=12), BeforeValidator(integral)] | None = None


class ImageItem(Extras):
    data: str


class A1111Body(Extras):
    """The AUTOMATIC1111 request fields sdfleet reads; any other field is passed to the runtime."""

    prompt: str | None = Field(None, max_length=TEXT_MAX)
    negative_prompt: str | None = Field(None, max_length=TEXT_MAX)
    steps: Annotated[int, Field(ge=1, le=150), BeforeValidator(integral)] | None = None
    width: Annotated[int, Field(ge=8, multiple_of=8), BeforeValidator(integral)] | None = None
    height: Annotated[int, Field(ge=8, multiple_of=8), BeforeValidator(integral)] | None = None
    cfg_scale: Annotated[float, Field(ge=0, le=30)] | None = None
    seed: Annotated[int, Field(ge=-1, lt=2**32), BeforeValidator(integral)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=BATCH_MAX), BeforeValidator(integral)] | None = None
    denoising_strength: Annotated[float, Field(ge=0, le=1)] | None = None
    sampler_name: str | None = Field(None, max_length=NAME_MAX)
    sampler_index: str | None = Field(None, max_length=NAME_MAX)
    init_images: list[str] | None = Field(None, max_length=INPUTS_MAX)
    image: str | None = None
    imageList: list[ImageItem] | None = Field(None, max_length=INPUTS_MAX)
    upscaler_1: str | None = Field(None, max_length=NAME_MAX)
    upscaling_resize: Annotated[float, Field(gt=0, le=8)] | None = None
    override_settings: OverrideSettings | None = None


class AlwaysOnScripts(Extras):
    """The seed's routing keys; other keys are A1111 scripts (ControlNet…), passed through."""

    task: str
    sd_model_checkpoint: str = Field(max_length=256)
    id_task: IdTask
    save_dir: str | None = Field(None, pattern=PREFIX_PATTERN, max_length=1024)
    image_link: str | None = Field(None, pattern=INPUT_URL_PATTERN, max_length=2048)
    uid: str | int | None = None
    sd_vae: str | None = None
    override_settings: OverrideSettings | None = None


class V1alpha1Body(A1111Body):
    """``POST /v1alpha1/``: an A1111 body whose ``alwayson_scripts`` routes it."""

    alwayson_scripts: AlwaysOnScripts


class Metadata(Extras):
    id: IdTask
    runtime: str = Field(min_length=1, max_length=256)
    tasktype: str
    prefix: str | None = Field(None, pattern=PREFIX_PATTERN, max_length=1024)
    context: Any = None


class ContentScripts(Extras):
    """``content.alwayson_scripts`` of v1alpha2: the model, the img2img link, A1111 scripts."""

    sd_model_checkpoint: str | None = Field(None, max_length=256)
    image_link: str | None = Field(None, pattern=INPUT_URL_PATTERN, max_length=2048)


class A1111Content(A1111Body):
    """``content`` of a v1alpha2 task: the A1111 body, or for ``pipeline`` a ComfyUI workflow (whose
    node ids never clash with the A1111 fields)."""

    alwayson_scripts: ContentScripts | None = None


class TaskBody(Extras):
    metadata: Metadata
    content: A1111Content
    """The A1111 body; for ``pipeline`` a ComfyUI workflow (node ids as keys)."""


class V1alpha2Body(Extras):
    """``POST /v1alpha2/``: task metadata beside a runtime-specific content."""

    task: TaskBody


class V1alpha1Answer(BaseModel):
    id_task: str
    sd_model_checkpoint: str | None
    output_location: str


class V1alpha2Answer(BaseModel):
    id: str
    runtime: str | None
    output_location: str


def check_types(body: dict[str, Any], fmt: str) -> None:
    """Hold a seed body (already mapped by ``compat``) to the types its OpenAPI schema declares.
    Raises ``pydantic.ValidationError``."""
    if fmt == "v1alpha1":
        V1alpha1Body.model_validate(body, strict=True)
        return
    V1alpha2Body.model_validate(body, strict=True)


def id_schema() -> dict[str, Any]:
    """``id_task`` / ``metadata.id``: a task id, or a number the seed's clients send."""
    return {
        "anyOf": [
            {"type": "string", "pattern": TASK_ID_PATTERN},
            {"type": "integer", "minimum": 0, "maximum": MAX_INT_ID},
        ]
    }


def v1alpha1_types() -> list[str]:
    return sorted(name for name, kind in TASK_TYPES.items() if kind in ACCEPTED_TYPES)


def v1alpha2_types() -> list[str]:
    return sorted(TASK_TYPES)
