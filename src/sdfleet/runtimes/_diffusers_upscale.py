"""Extras (``extra-single-image``, ``extra-batch-images``) in the diffusers runtime: SD WebUI's
resizing upscalers and model upscalers from the models folder. Imports torch.

Model upscalers lie where SD WebUI keeps them, under the models folder: ``ESRGAN/`` and
``RealESRGAN/``, as ``.pth``, ``.pt`` or ``.safetensors`` files of any single-image architecture
spandrel reads (ESRGAN, Real-ESRGAN, Compact, SwinIR, DAT, ...). A task names one by file stem,
case-insensitive, or for Real-ESRGAN's releases by SD WebUI's name (``R-ESRGAN 4x+`` is
``RealESRGAN_x4plus.pth``). As in SD WebUI, the model runs until the image is at least the asked
size (at most three passes), then Lanczos resizes it to the exact size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdfleet.errors import Interrupted, Reject
from sdfleet.media import to_png
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes._upscale_models import ModelCache, run_tiled
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.tasks import TaskType

if TYPE_CHECKING:
    from sdfleet.runtimes._extras_plan import Plan

UPSCALER_FOLDERS = ("ESRGAN", "RealESRGAN")
SUFFIXES = (".pth", ".pt", ".safetensors")
RESIZERS = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
"""SD WebUI's upscalers without a model ("None" resizes with Lanczos, as it does there)."""
REALESRGAN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
"""Real-ESRGAN release file stems → the names SD WebUI lists them under."""
MAX_PASSES = 3
OVERLAP = 8
"""Tile context in pixels, SD WebUI's ``ESRGAN_tile_overlap`` default."""


@dataclass(frozen=True)
class ModelUpscaler:
    name: str
    """The name to ask for: SD WebUI's for a Real-ESRGAN release, else the file stem."""
    path: Path


def find_model_upscalers(models_dir: Path) -> list[ModelUpscaler]:
    """The model upscalers under ``models_dir`` (read from disk on every call), sorted by name."""
    found: dict[str, ModelUpscaler] = {}
    for folder in UPSCALER_FOLDERS:
        where = models_dir / folder
        if not where.is_dir():
            continue
        for path in sorted(where.iterdir()):
            if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                name = REALESRGAN_NAMES.get(path.stem, path.stem)
                found.setdefault(name.lower(), ModelUpscaler(name, path))
    return sorted(found.values(), key=lambda u: u.name.lower())


def upscaler_names(models_dir: Path) -> list[str]:
    """Every upscaler a task may name, as SD WebUI lists them: resizers first, then models."""
    return [*RESIZERS, *(u.name for u in find_model_upscalers(models_dir))]


def resolve(name: str | None, models_dir: Path) -> Image.Resampling | ModelUpscaler:
    """The resizer or model upscaler ``name`` stands for (None: Lanczos). Raises ``Reject``."""
    wanted = (name or "None").strip().lower()
    for resizer, method in RESIZERS.items():
        if resizer.lower() == wanted:
            return method
    models = find_model_upscalers(models_dir)
    for upscaler in models:
        if wanted in (upscaler.name.lower(), upscaler.path.stem.lower()):
            return upscaler
    where = ", ".join(str(models_dir / f) for f in UPSCALER_FOLDERS)
    raise Reject(
        f"upscaler {name!r} is not available; available: {', '.join(upscaler_names(models_dir))} "
        f"(model upscalers are .pth/.safetensors files in {where})",
        code="unknown_upscaler",
    )


def target_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def check_pixels(size: tuple[int, int], limit: int, what: str) -> None:
    """Refuse an image of more than ``limit`` pixels before it is made (``Reject`` ``too_large``)."""
    if size[0] * size[1] > limit:
        raise Reject(
            f"{what} would be {size[0]}x{size[1]} ({size[0] * size[1]} pixels), more than the "
            f"{limit} the runtime allows (upscale_max_pixels); use a smaller image or upscaling_resize",
            code="too_large",
        )


def open_image(data: bytes, limit: int) -> Image.Image:
    """An input image, its size checked against ``limit`` before its pixels are decoded."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Exception as e:
        raise Reject(f"input image is not a readable image: {e}", code="invalid_image") from e
    check_pixels(image.size, limit, "the input image")
    return P.decode_image(data)


class Extras:
    """Runs extras jobs by their ``_extras_plan.Plan``; model upscalers run on the runtime's device
    (the caller holds its lock)."""

    def __init__(self, models_dir: Path, device: str, dtype: Any, *, tile: int, max_pixels: int) -> None:
        self.models_dir = models_dir
        self.tile = tile
        self.max_pixels = max_pixels
        self.models = ModelCache(device, dtype)

    def run(
        self, job: Job, plan: Plan, stop: Callable[[], bool], report: Callable[[float], None]
    ) -> RuntimeResult:
        """Upscale the job's input(s); raises ``Interrupted`` once ``stop()`` is true."""
        inputs = job.init_images if job.type is TaskType.EXTRA_BATCH_IMAGES else job.init_images[:1]
        if not inputs:
            raise Reject(f"{job.type.value} needs at least one input image", code="invalid_params")
        out: list[bytes] = []
        for n, data in enumerate(inputs):

            def on_tile(done: int, total: int, n: int = n) -> None:
                if stop():
                    raise Interrupted(f"task {job.task_id} interrupted")
                report(min(0.99, (n + done / total) / len(inputs)))

            out.append(to_png(self._one(open_image(data, self.max_pixels), plan, on_tile)))
            on_tile(1, 1)
        return RuntimeResult(images=out, info=plan.info())

    def _one(self, image: Image.Image, plan: Plan, on_tile: Callable[[int, int], None]) -> Image.Image:
        size = plan.target(image.size)
        check_pixels(size, self.max_pixels, "the upscaled image")
        result = self._upscale(image, plan.first, size, on_tile)
        if plan.second is not None:  # SD WebUI's second upscaler, blended in
            other = self._upscale(image, plan.second, size, on_tile)
            result = Image.blend(result, other, plan.visibility)
        if plan.to is not None and plan.crop and result.size != plan.to:
            cropped = Image.new("RGB", plan.to)  # centred, as SD WebUI crops
            cropped.paste(result, (plan.to[0] // 2 - result.width // 2, plan.to[1] // 2 - result.height // 2))
            result = cropped
        return result

    def upscale_to(self, image: Image.Image, name: str, size: tuple[int, int]) -> Image.Image:
        """``image`` at ``size`` by the upscaler ``name`` (a hires fix's image upscaler)."""
        check_pixels(size, self.max_pixels, "the upscaled image")
        return self._upscale(image, resolve(name, self.models_dir), size, lambda done, total: None)

    def _upscale(
        self,
        image: Image.Image,
        upscaler: Image.Resampling | ModelUpscaler,
        size: tuple[int, int],
        on_tile: Callable[[int, int], None],
    ) -> Image.Image:
        if isinstance(upscaler, ModelUpscaler):
            image = self._with_model(upscaler, image, size, on_tile)
            upscaler = Image.Resampling.LANCZOS  # to the exact size, as SD WebUI does
        return image if image.size == size else image.resize(size, upscaler)

    def _with_model(
        self,
        upscaler: ModelUpscaler,
        image: Image.Image,
        size: tuple[int, int],
        on_tile: Callable[[int, int], None],
    ) -> Image.Image:
        model = self.models.get(upscaler.path)
        for _ in range(MAX_PASSES):
            if image.width >= size[0] and image.height >= size[1]:
                break
            check_pixels(
                (image.width * model.scale, image.height * model.scale), self.max_pixels, "a model pass"
            )
            before = image.size
            image = run_tiled(model, image, self.tile, OVERLAP, on_tile)
            if image.size == before:  # a 1x model: more passes change nothing
                break
        return image
