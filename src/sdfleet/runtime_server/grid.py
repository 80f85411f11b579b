"""The grid SD WebUI puts first in an answer that saves its images (``save_images``).

SD WebUI 1.10's ``images.image_grid``: rows from ``n_rows`` (-1: about the square root of the
count, or with ``grid_prevent_empty_spots`` the largest divisor up to it; 0: the batch size), as
many columns as needed, each image centred in a cell as large as the largest image, on
``grid_background_color``.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageColor

from sdfleet.runtime_server.options import Options


def wanted(options: Options, save_images: bool, count: int) -> bool:
    """Whether the answer starts with a grid: SD WebUI makes one only for requests that save their
    images (the API sets ``do_not_save_grid`` from ``save_images``), returns it with ``return_grid``,
    and with ``grid_only_if_multiple`` only for two images or more."""
    if not save_images or not options["return_grid"] or count == 0:
        return False
    return count >= 2 or not options["grid_only_if_multiple"]


def rows(options: Options, count: int, batch_size: int) -> int:
    n_rows = int(options["n_rows"])
    if n_rows > 0:
        r = n_rows
    elif n_rows == 0:
        r = batch_size
    elif options["grid_prevent_empty_spots"]:
        r = math.floor(math.sqrt(count))
        while count % r != 0:
            r -= 1
    else:
        r = round(math.sqrt(count))
    return max(1, min(r, count))


def make(pngs: list[bytes], options: Options, batch_size: int) -> bytes:
    """The grid of ``pngs`` as a PNG."""
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    r = rows(options, len(images), batch_size)
    cols = math.ceil(len(images) / r)
    w, h = (max(sizes) for sizes in zip(*(im.size for im in images), strict=True))
    try:
        color = ImageColor.getcolor(str(options["grid_background_color"]), "RGB")
    except ValueError:
        color = (255, 255, 255)
    grid = Image.new("RGB", (cols * w, r * h), color=color)
    for i, im in enumerate(images):
        dx, dy = (w - im.width) // 2, (h - im.height) // 2
        grid.paste(im, (i % cols * w + dx, i // cols * h + dy))
    out = io.BytesIO()
    grid.save(out, format="PNG")
    return out.getvalue()
