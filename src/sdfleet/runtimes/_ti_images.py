"""Textual inversion embeddings stored in images (``.png``, ``.webp``, ``.avif``), as SD WebUI
1.10 reads them (``modules/textual_inversion/image_embedding.py``): its training saves each
embedding as a picture that carries it twice, in a PNG text chunk ``sd-ti-embedding`` (base64 of
JSON, tensors as ``{"TORCHTENSOR": [[...]]}``) and drawn into two strips at the picture's sides
(zlib-compressed JSON, four bits a channel, masked with a fixed pseudo-random sequence). An image
without either is no embedding (a preview), and ``<name>.preview.png`` is never read. The
embedding's name is the one inside (its file's stem where it has none).

Torch-free apart from the tensors it hands back; never unpickles (JSON only).
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

SUFFIXES = (".png", ".webp", ".avif")
"""SD WebUI reads ``.jxl`` too, with a plugin that Pillow does not have."""
CHUNK = "sd-ti-embedding"
DATA_MAX = 64 * 2**20
"""Most bytes of JSON an image's strips may unpack to: SD WebUI's largest is a few hundred KB."""
STRIP_MAX = 2**22
"""Most values of a strip (four bits each): 2 MB of compressed data, far past any embedding."""


def is_preview(path: Path) -> bool:
    """``<name>.preview.png`` is the picture of an embedding beside it, never one itself."""
    return path.suffix.lower() in SUFFIXES and Path(path.stem).suffix.lower() == ".preview"


def read(path: Path) -> dict[str, Any] | None:
    """The embedding's data stored in the image ``path``, its tensors as torch tensors; None for an
    image that holds none. Raises for one whose data does not read."""
    with Image.open(path) as image:
        text = getattr(image, "text", None)  # PNG's text chunks (not all formats have them)
        if isinstance(text, dict) and CHUNK in text:
            return _decoded(base64.b64decode(text[CHUNK]))
        return _drawn(image)


def _drawn(image: Image.Image) -> dict[str, Any] | None:
    """SD WebUI's ``extract_image_data_embed``: the strips at the image's sides, black between."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black = np.where(pixels.sum(axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        return None  # a picture without data: a preview, not an embedding
    low, high = pixels[:, : black.min(), :], pixels[:, black.max() + 1 :, :]
    if low.shape != high.shape:
        raise ValueError("the image's two data strips differ in size")
    if low.size > STRIP_MAX:
        raise ValueError(f"the image's data strips hold more than {STRIP_MAX} values")
    low, high = _unmasked(low), _unmasked(high)
    packed = ((high << 4) | low).flatten().tobytes()
    unpack = zlib.decompressobj()
    data = unpack.decompress(packed, DATA_MAX)
    if unpack.unconsumed_tail:
        raise ValueError(f"the image's embedding data unpacks to more than {DATA_MAX} bytes")
    return _decoded(data)


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """The image without its all-black border rows and columns (SD WebUI's ``crop_black``)."""
    lit: np.ndarray = np.all(pixels > 0, axis=2)
    cols, rows = np.any(lit, axis=0), np.any(lit, axis=1)
    col_start, col_end = cols.argmax(), lit.shape[1] - cols[::-1].argmax()
    row_start, row_end = rows.argmax(), lit.shape[0] - rows[::-1].argmax()
    return pixels[row_start:row_end, col_start:col_end]


def _unmasked(block: np.ndarray) -> np.ndarray:
    """SD WebUI's ``xor_block``: each value xor the low four bits of its place in the sequence of
    a linear congruential generator (m 2³², a 1664525, c 1013904223, from 0), modulo 255."""
    mask: np.ndarray = _sequence(block.size).reshape(block.shape) & 0x0F
    out: np.ndarray = np.bitwise_xor(block.astype(np.uint8), mask)
    return out


def _sequence(n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):  # a few thousand values for an embedding of a few vectors
        seed = (1664525 * seed + 1013904223) % 2**32
        out[i] = seed % 255
    return out


def _decoded(data: bytes) -> dict[str, Any]:
    """SD WebUI's ``EmbeddingDecoder``: JSON whose ``TORCHTENSOR`` objects are tensors."""
    value = json.loads(data, object_hook=_tensor)
    if not isinstance(value, dict):
        raise ValueError("the image's embedding data is not an object")
    return value


def _tensor(d: dict[str, Any]) -> Any:
    if "TORCHTENSOR" not in d:
        return d
    array = np.array(d["TORCHTENSOR"])
    if array.dtype.kind not in "fiu":
        raise ValueError("a tensor in the image's embedding data holds no numbers")
    return torch.from_numpy(array)
