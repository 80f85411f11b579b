"""Model upscalers (ESRGAN family and whatever else spandrel reads): loading, a small cache, and
tiled inference. Imports torch; imports spandrel when the first model is loaded.

spandrel needs torchvision only for two architectures that are not upscalers (RestoreFormer face
restoration, LaMa inpainting), yet imports it for all of them. A CPU-only torch has no matching
torchvision on PyPI (PyPI's wheels are CUDA builds that fail to import against it), so where no
torchvision is installed spandrel is imported with a stand-in that exists only during that import:
``sys.modules`` is restored afterwards, and those two architectures fail if ever called.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdfleet.errors import ModelLoadError, Reject

log = logging.getLogger(__name__)

_TORCHVISION_USES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_import_lock = threading.Lock()


def import_spandrel() -> Any:
    """The ``spandrel`` module. Raises ``ModelLoadError`` when it is not installed."""
    with _import_lock:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        try:
            if importlib.util.find_spec("torchvision") is not None:
                return importlib.import_module("spandrel")
            return _import_without_torchvision()
        except ImportError as e:
            raise ModelLoadError(
                f"model upscalers need spandrel ({e}): pip install 'sdfleet[upscalers]'"
            ) from e
        except Exception as e:  # e.g. a torchvision built for another torch
            raise ModelLoadError(f"spandrel cannot be imported: {e}") from e


def _import_without_torchvision() -> Any:
    stand_ins = {name: types.ModuleType(name) for name in _TORCHVISION_USES}

    def unavailable(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")

    functional = stand_ins["torchvision.transforms.functional"]
    for attr in ("normalize", "rotate"):
        setattr(functional, attr, unavailable)
    functional.InterpolationMode = type("InterpolationMode", (), {})  # type: ignore[attr-defined]
    before = {name: sys.modules.get(name) for name in _TORCHVISION_USES}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class ModelCache:
    """Loaded upscaler models by file, least recently used out first (a few MB to ~70 MB each)."""

    def __init__(self, device: str, dtype: torch.dtype, max_count: int = 2) -> None:
        self.device = device
        self.dtype = dtype
        self.max_count = max(1, max_count)
        self._models: OrderedDict[tuple[Path, int, int], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def get(self, path: Path) -> Any:
        """The spandrel ``ImageModelDescriptor`` of ``path`` on the device. Raises ``ModelLoadError``."""
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)  # a replaced file is loaded again
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            return model
        model = self._load(path)
        for old in [k for k in self._models if k[0] == path]:
            del self._models[old]
        while len(self._models) >= self.max_count:
            self._models.popitem(last=False)
        self._models[key] = model
        return model

    def clear(self) -> None:
        self._models.clear()

    def _load(self, path: Path) -> Any:
        spandrel = import_spandrel()
        try:
            model = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
        except spandrel.UnsupportedModelError as e:
            raise Reject(f"{path.name} is no model architecture spandrel knows", code="bad_upscaler") from e
        except Exception as e:
            raise ModelLoadError(f"cannot load upscaler {path.name}: {e}") from e
        rgb = (model.input_channels, model.output_channels) == (3, 3)
        if not isinstance(model, spandrel.ImageModelDescriptor) or not rgb:
            raise Reject(
                f"{path.name} is a {model.architecture.name} model, not an RGB image upscaler",
                code="bad_upscaler",
            )
        model.to(self.device, dtype=self._dtype_for(model)).eval()
        name, arch = path.name, model.architecture.name
        log.info("loaded upscaler %s (%s, x%d) on %s", name, arch, model.scale, self.device)
        return model

    def _dtype_for(self, model: Any) -> torch.dtype:
        if self.dtype == torch.float16 and model.supports_half:
            return torch.float16
        if self.dtype == torch.bfloat16 and model.supports_bfloat16:
            return torch.bfloat16
        return torch.float32


def run_tiled(
    model: Any, image: Image.Image, tile: int, overlap: int, on_tile: Callable[[int, int], None]
) -> Image.Image:
    """One pass of ``model`` over ``image``, ``tile`` pixels square at a time (0: whole image).

    Each tile is run with ``overlap`` pixels of its neighbours around it as context and only its
    own part of the output is kept, so seams vanish once the overlap covers the model's receptive
    field. ``on_tile(done, total)`` is called after each tile (it may raise to stop).
    """
    scale = int(model.scale)
    width, height = image.size
    source = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
    out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    step = tile if tile > 0 else max(width, height)
    boxes = [(x, y) for y in range(0, height, step) for x in range(0, width, step)]
    param = next(model.model.parameters())
    for n, (x, y) in enumerate(boxes, start=1):
        w, h = min(step, width - x), min(step, height - y)
        x0, y0 = max(0, x - overlap), max(0, y - overlap)
        x1, y1 = min(width, x + w + overlap), min(height, y + h + overlap)
        part = source[:, :, y0:y1, x0:x1].to(param.device, param.dtype) / 255
        with torch.inference_mode():
            result = model(part)
        top, left = (y - y0) * scale, (x - x0) * scale
        kept = result[0, :, top : top + h * scale, left : left + w * scale]
        pixels = (kept.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out[y * scale : (y + h) * scale, x * scale : (x + w) * scale] = pixels
        on_tile(n, len(boxes))
    return Image.fromarray(out, "RGB")
