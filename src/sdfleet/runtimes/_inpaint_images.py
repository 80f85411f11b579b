"""Inpainting's image work before and after the pipeline, as SD WebUI 1.10 does it
(``modules/processing.py``'s ``StableDiffusionProcessingImg2Img.init`` and ``apply_overlay``,
``modules/masking.py``): the mask read, inverted and blurred; the input cropped to the mask's
region ("Only masked") or brought to the task's size, its masked area filled; and the result
pasted back and laid under the input where the mask keeps it (``sdfleet.inpaint`` reads the
task's fields, torch-free, for the API)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from sdfleet.errors import Reject
from sdfleet.inpaint import Inpaint
from sdfleet.runtimes._diffusers_pipes import fit

Box = tuple[int, int, int, int]


@dataclass
class Canvas:
    """One input image made ready for the inpainting pipeline, and what puts its result back."""

    image: Image.Image
    """What the pipeline starts from, at the task's size: the input (or its region), filled."""
    mask: Image.Image
    """White where the pipeline repaints, at the task's size (``latent_mask``)."""
    overlay: Image.Image | None
    """RGBA: the input where the mask keeps it, transparent where it is repainted; None: all is."""
    paste: Box | None
    """"Only masked": where the result goes in the input (x, y, width, height)."""


@dataclass
class Mask:
    """A task's mask, read and shaped once for all its images."""

    for_latents: Image.Image | None
    """The pipeline's mask at the task's size; None: nothing to repaint ("Only masked" with a blank
    mask, where SD WebUI runs plain image-to-image)."""
    for_overlay: Image.Image | None
    region: Box | None
    """"Only masked": the input's region (x1, y1, x2, y2) made at the task's size."""
    rounded: bool = True
    """``mask_round``: the latents' mask rounded to repaint or keep."""


def read_mask(data: bytes, rounded: bool = True) -> Image.Image:
    """SD WebUI's ``create_binary_mask``: a mask with transparency is its alpha channel (with
    ``mask_round``, ``rounded``, made black and white); any other image, its luminance."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise Reject(f"mask is not a readable image: {e}", code="invalid_image") from e
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda x: 255 if x > 128 else 0) if rounded else alpha
    return image.convert("L")


def blur(mask: Image.Image, x: int, y: int) -> Image.Image:
    """OpenCV's ``GaussianBlur`` as SD WebUI calls it, across then down: a kernel of
    ``2 * int(2.5 * blur + 0.5) + 1`` taps, sigma ``blur``, edges mirrored without repeating the
    edge pixel (OpenCV's default border), in OpenCV's bit-exact integer arithmetic for 8-bit
    images (``_fixed_point_kernel``), so the same mask blurs to the same bytes."""
    a = np.asarray(mask, dtype=np.int64)
    for sigma, axis in ((x, 1), (y, 0)):
        if sigma > 0:
            taps = 2 * int(2.5 * sigma + 0.5) + 1
            weights = _fixed_point_kernel(taps, sigma).astype(np.float64)  # sums exact in float64
            total = ndimage.correlate1d(a.astype(np.float64), weights, axis=axis, mode="mirror")
            a = (total.astype(np.int64) + 128) >> 8  # eight fraction bits, rounded half up
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _fixed_point_kernel(taps: int, sigma: float) -> np.ndarray:
    """OpenCV's Gaussian kernel for 8-bit images (``getGaussianKernelFixedPoint_ED``): the exact
    kernel in units of 1/256, each side rounded with the error carried on to the next tap, the
    centre taking what makes the sum 256."""
    half = taps // 2
    values = np.exp(np.array([(x * x) * (-0.125 / (sigma * sigma)) for x in range(1 - taps, 0, 2)]))
    exact = values / (2 * values.sum() + 1)
    out = np.zeros(taps, dtype=np.int64)
    err = 0.0
    for i in range(half):
        adjusted = exact[i] * 256 + err
        out[i] = out[taps - 1 - i] = int(np.rint(adjusted))
        err = adjusted - out[i]
    out[half] = 256 - 2 * out[:half].sum()
    return out


def shape_mask(data: bytes, spec: Inpaint, size: tuple[int, int], resize_mode: int) -> Mask:
    """The task's mask for images made at ``size`` (width, height)."""
    mask = read_mask(data, spec.round)
    if spec.invert:
        mask = ImageOps.invert(mask)
    mask = blur(mask, spec.blur_x, spec.blur_y)
    if not spec.full_res:
        at_size = fit(mask, size, resize_mode)
        doubled = np.clip(np.asarray(at_size.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        return Mask(at_size, Image.fromarray(doubled, "L"), None, spec.round)
    found = mask.getbbox()
    if not found:
        return Mask(None, None, None)
    region = expand_region(_padded(found, spec.padding, mask.size), size, mask.size)
    return Mask(fit(mask.crop(region), size, 2), mask, region, spec.round)


def _padded(box: Box, pad: int, size: tuple[int, int]) -> Box:
    """SD WebUI's ``get_crop_region_v2``: the mask's bounding box, ``pad`` pixels wider each side."""
    if not pad:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, size[0]), min(y2 + pad, size[1])


def expand_region(box: Box, size: tuple[int, int], image: tuple[int, int]) -> Box:
    """SD WebUI's ``expand_crop_region``: ``box`` widened (or heightened), centred, to the aspect
    ratio of ``size``, moved back inside ``image`` where it would leave it."""
    x1, y1, x2, y2 = box
    ratio = size[0] / size[1]
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image[1])
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image[0])
    return x1, y1, x2, y2


def _widen(a: int, b: int, more: int, limit: int) -> tuple[int, int]:
    a -= more // 2
    b += more - more // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def canvas(image: Image.Image, mask: Mask, fill: int, size: tuple[int, int], resize_mode: int) -> Canvas:
    """One RGB input made ready, its masked area started as ``fill`` says (``inpaint.FILLS``).
    A blank mask with "Only masked" repaints all of it, as plain image-to-image (SD WebUI's)."""
    if mask.for_latents is None or mask.for_overlay is None:
        return Canvas(fit(image, size, resize_mode), Image.new("L", size, 255), None, None)
    if mask.region is None:
        image = fit(image, size, resize_mode)
    overlay_mask = mask.for_overlay
    if overlay_mask.size != image.size:
        overlay_mask = fit(overlay_mask, image.size, resize_mode).convert("L")
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    paste = None
    if mask.region is not None:
        x1, y1, x2, y2 = mask.region
        image = fit(image.crop(mask.region), size, 2)
        paste = (x1, y1, x2 - x1, y2 - y1)
    if fill != 1:
        image = filled(image, mask.for_latents)
    return Canvas(image, latent_mask(mask.for_latents, mask.rounded), kept.convert("RGBA"), paste)


def latent_mask(mask: Image.Image, rounded: bool = True, scale: int = 8) -> Image.Image:
    """SD WebUI's mask of the latents (the mask shrunk bicubically; with ``mask_round``,
    ``rounded``, each latent pixel repainted or kept), drawn back at the image's size: the
    inpainting pipeline, which samples its mask at every ``scale``-th pixel (and binarizes it at
    0.5 unless told not to: ``_diffusers_inpaint.round_masks``), then blends the same latent pixels
    as SD WebUI's sampler, by the same amounts."""
    small = mask.convert("RGB").resize((mask.width // scale, mask.height // scale), Image.Resampling.BICUBIC)
    values = np.asarray(small, dtype=np.float32)[..., 0] / 255
    if rounded:
        values = np.around(values)
    latent = Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
    return latent.resize(mask.size, Image.Resampling.NEAREST)


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """SD WebUI's ``masking.fill`` ("fill"): the masked area painted with the kept area's colours,
    blurred at shrinking radii."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def composite(made: Image.Image, canvas: Canvas) -> Image.Image:
    """SD WebUI's ``apply_overlay``: the made image back in the input's frame ("Only masked"), the
    input laid over it where the mask keeps it."""
    if canvas.overlay is None:
        return made
    image = made
    if canvas.paste is not None:
        x, y, w, h = canvas.paste
        base = Image.new("RGBA", canvas.overlay.size)
        base.paste(fit(made, (w, h), 1), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(canvas.overlay)
    return image.convert("RGB")
