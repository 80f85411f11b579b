"""The diffusers runtime's cache of loaded pipelines: least recently used out first, bounded by a
memory budget and by a count. Imports torch.

A loaded pipeline's footprint is the bytes of its components' parameters and buffers, measured once
at load. A model not loaded yet is estimated from its weight files (``estimate_footprint``), so that
room is made *before* it loads rather than after.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from sdfleet.models.catalog import ModelInfo

log = logging.getLogger(__name__)

MIB = 2**20
CUDA_FRACTION = 0.85
"""Share of a GPU's total memory the default budget starts from (the rest: CUDA context, others)."""
CUDA_RESERVE_MIN = 2 * 2**30
CUDA_RESERVE_FRACTION = 0.10
"""Working reserve for activations: max(2 GiB, 10 % of the GPU's total memory)."""
CPU_FRACTION = 0.5
"""Share of the machine's available RAM the default budget takes on CPU."""

# Floating dtypes of the safetensors format, by element size: these become the target dtype on load.
_FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})
_NOT_LOADED = frozenset({"safety_checker"})  # the runtime loads pipelines with safety_checker=None
_MAX_HEADER = 100 * MIB

T = TypeVar("T")


def cuda_budget(total: int) -> int:
    """Default budget for a GPU with ``total`` bytes: 85 % of it minus the activation reserve."""
    reserve = max(CUDA_RESERVE_MIN, int(total * CUDA_RESERVE_FRACTION))
    return max(0, int(total * CUDA_FRACTION) - reserve)


def budget_bytes(memory_budget_mb: float | None, device: str) -> int:
    """The ``memory_budget_mb`` option in bytes, or the default for ``device``."""
    if memory_budget_mb is not None:
        return int(memory_budget_mb * MIB)
    return default_budget(device)


def default_budget(device: str) -> int:
    """Default memory budget in bytes for ``device`` (``cuda_budget``, or half the available RAM)."""
    if device.startswith("cuda"):
        return cuda_budget(int(torch.cuda.get_device_properties(torch.device(device)).total_memory))
    return int(available_ram() * CPU_FRACTION)


def available_ram() -> int:
    """Bytes of RAM available to new allocations: psutil when installed, else ``/proc/meminfo``."""
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return meminfo_available()
    return int(psutil.virtual_memory().available)


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; free pages from ``sysconf`` without it."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def measure_footprint(pipe: Any) -> int:
    """Bytes of the parameters and buffers of a pipeline's ``torch.nn.Module`` components."""
    seen: set[int] = set()
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def estimate_footprint(info: ModelInfo, dtype: torch.dtype) -> int:
    """Bytes a model will take once loaded in ``dtype``, from its weight files on disk.

    Safetensors files: each floating tensor's size converted to ``dtype`` (from the file's header),
    other tensors as they are. Pickled files (``.bin``, ``.ckpt``): their size (the dtype inside is
    not known without unpickling them).
    """
    files = [info.path] if info.kind == "single-file" else weight_files(info.path)
    return sum(file_footprint(f, dtype.itemsize) for f in files)


def weight_files(folder: Path) -> list[Path]:
    """The weight files a diffusers folder loads: per component folder, safetensors over pickles,
    and files without a variant (``x.fp16.safetensors``) over variants."""
    chosen: list[Path] = []
    parents = {p.parent for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()}
    for sub in sorted(parents):
        parts = sub.relative_to(folder).parts
        if any(p.startswith(".") for p in parts) or (parts and parts[0] in _NOT_LOADED):
            continue
        files = sorted(p for p in sub.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        files = [p for p in files if p.suffix == ".safetensors"] or files
        chosen += [p for p in files if "." not in p.stem] or files
    return chosen


def file_footprint(path: Path, itemsize: int) -> int:
    """Bytes the tensors of one weight file take in memory at ``itemsize`` bytes per float."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return size
    try:
        header = _safetensors_header(path)
        total = 0
        for key, tensor in header.items():
            if key == "__metadata__":
                continue
            start, end = tensor["data_offsets"]
            float_size = _FLOAT_SIZES.get(tensor["dtype"])
            total += end - start if float_size is None else (end - start) // float_size * itemsize
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.debug("cannot read the safetensors header of %s (%s): counting its size", path, e)
        return size


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


@dataclass
class _Entry(Generic[T]):
    value: T
    footprint: int


class PipelineCache(Generic[T]):
    """Loaded pipelines by model name, least recently used first.

    ``make_room`` before a load evicts until the cache's footprints plus the new model's estimate fit
    ``budget`` and the count stays within ``max_count``; a model larger than the whole budget is
    loaded alone, with a warning. ``make_room_beside`` makes room for a model that a job needs next
    to the one it runs (a hires pass on another checkpoint) without evicting that one. ``release``
    runs after evictions (garbage collection, CUDA cache).
    """

    def __init__(self, *, budget: int, max_count: int, release: Callable[[], None]) -> None:
        self.budget = budget
        self.max_count = max(1, max_count)
        self._release = release
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        log.info("pipeline cache: memory budget %s, %d model(s) at most", mib(budget), self.max_count)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used(self) -> int:
        """Sum of the cached pipelines' footprints, in bytes."""
        return sum(e.footprint for e in self._entries.values())

    def footprints(self) -> dict[str, int]:
        """Model name → footprint in bytes, least recently used first."""
        return {name: e.footprint for name, e in self._entries.items()}

    def get(self, name: str) -> T | None:
        """The cached pipeline (now the most recently used), or None."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        self._entries.move_to_end(name)
        return entry.value

    def make_room(self, name: str, estimate: int) -> None:
        """Evict least recently used pipelines so that ``name`` (``estimate`` bytes) fits."""
        self._make_room(name, estimate, ())
        if estimate > self.budget:
            log.warning(
                "model %s (estimated %s) is larger than the memory budget %s: loading it alone",
                name,
                mib(estimate),
                mib(self.budget),
            )

    def make_room_beside(self, keep: Collection[str], name: str, estimate: int) -> bool:
        """Evict least recently used pipelines, never those of ``keep``, so that ``name``
        (``estimate`` bytes) fits beside them; False, evicting nothing, where it cannot
        (``max_count`` too small, or they are over the budget together)."""
        kept = [self._entries[k].footprint for k in keep if k in self._entries]
        if self.max_count < len(kept) + 1 or sum(kept) + estimate > self.budget:
            return False
        self._make_room(name, estimate, keep)
        return True

    def _make_room(self, name: str, estimate: int, keep: Collection[str]) -> None:
        evicted = False
        while self._others(keep) and len(self._entries) >= self.max_count:
            self._evict(self._others(keep)[0], f"cache_size {self.max_count} reached, to load {name}")
            evicted = True
        while self._others(keep) and self.used + estimate > self.budget:
            reason = (
                f"to load {name} (estimated {mib(estimate)}): {mib(self.used)} cached + "
                f"{mib(estimate)} > memory budget {mib(self.budget)}"
            )
            self._evict(self._others(keep)[0], reason)
            evicted = True
        if evicted:
            self._release()

    def _others(self, keep: Collection[str]) -> list[str]:
        """Cached names but ``keep``'s, least recently used first."""
        return [n for n in self._entries if n not in keep]

    def put(self, name: str, value: T, footprint: int, *, keep: Collection[str] = ()) -> None:
        """Cache a loaded pipeline; evicts older ones (never ``keep``'s) if its measured footprint
        broke the budget."""
        self._entries[name] = _Entry(value, footprint)
        self._entries.move_to_end(name)
        evicted = False
        while len(self._others(keep)) > 1 and self.used > self.budget:
            reason = f"{name} measured {mib(footprint)}: cache over memory budget {mib(self.budget)}"
            self._evict(self._others(keep)[0], reason)
            evicted = True
        if evicted:
            self._release()
        log.info(
            "cached model %s (%s); %d model(s), %s of %s",
            name,
            mib(footprint),
            len(self._entries),
            mib(self.used),
            mib(self.budget),
        )

    def evict_all_but(self, keep: str, reason: str) -> bool:
        """Evict every pipeline but ``keep``; True when any was evicted."""
        others = [name for name in self._entries if name != keep]
        for name in others:
            self._evict(name, reason)
        if others:
            self._release()
        return bool(others)

    def clear(self, *, release: bool = True) -> None:
        self._entries.clear()
        if release:
            self._release()

    def _evict(self, name: str, reason: str) -> None:
        footprint = self._entries.pop(name).footprint  # the last reference: freed at release()
        log.info("evicted model %s (%s) from the pipeline cache: %s", name, mib(footprint), reason)
