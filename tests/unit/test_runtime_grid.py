"""SD WebUI 1.10's grid layout (``images.image_grid``), as runtime serve makes it for ``save_images``."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sdfleet.runtime_server import grid
from sdfleet.runtime_server.options import Options


def options(**data: object) -> Options:
    opts = Options()
    opts.data.update(data)
    return opts


@pytest.mark.parametrize(
    ("data", "count", "batch", "rows"),
    [
        ({}, 2, 2, 1),  # round(√2)
        ({}, 3, 3, 2),
        ({}, 8, 4, 3),
        ({"n_rows": 0}, 6, 3, 3),  # the batch size
        ({"n_rows": 4}, 2, 2, 2),  # never more rows than images
        ({"grid_prevent_empty_spots": True}, 6, 6, 2),
        ({"grid_prevent_empty_spots": True}, 5, 5, 1),
    ],
)
def test_rows_as_sd_webui_lays_them_out(data: dict[str, object], count: int, batch: int, rows: int) -> None:
    assert grid.rows(options(**data), count, batch) == rows


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_cells_are_as_large_as_the_largest_image_and_smaller_ones_are_centred() -> None:
    pngs = [png((4, 4), (255, 0, 0)), png((2, 2), (0, 0, 255))]
    made = Image.open(io.BytesIO(grid.make(pngs, options(), 2)))
    assert made.size == (8, 4)  # one row of two 4×4 cells
    assert made.getpixel((0, 0)) == (255, 0, 0) and made.getpixel((5, 1)) == (0, 0, 255)
    assert made.getpixel((4, 0)) == (255, 255, 255)  # around the small one: the background


def test_a_grid_only_for_saved_answers_of_two_images_unless_told() -> None:
    assert grid.wanted(options(), True, 2) and not grid.wanted(options(), False, 2)
    assert not grid.wanted(options(), True, 1) and grid.wanted(options(grid_only_if_multiple=False), True, 1)
    assert not grid.wanted(options(return_grid=False), True, 4) and not grid.wanted(options(), True, 0)
