"""LoRA in SD WebUI's prompt syntax for the diffusers runtime.

``<lora:name>``, ``<lora:name:weight>``, ``<lora:name:te_weight:unet_weight>`` or named
``<lora:name:te=0.5:unet=0.8>`` (``lyco`` is taken for ``lora``), as SD WebUI reads them. Every
``<type:...>`` tag is removed from the text the text encoder sees; the prompt in the result's info
keeps them, as SD WebUI's does. Unlike SD WebUI 1.10 (which reads tags from the prompt only and
leaves them as text in the negative prompt), tags in the negative prompt are applied too: a LoRA
changes the model, for both sides. The same LoRA twice adds its weights.

Files: ``<models>/Lora/`` and ``<models>/LyCORIS/`` (sub-folders included), ``.safetensors``,
``.pt`` or ``.ckpt``, in the kohya/SD WebUI format or diffusers' own; named by file stem,
case-insensitive. Parsing here imports nothing heavy; ``_lora_loader`` loads them into pipelines.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdfleet.errors import Reject
from sdfleet.models.network_hashes import SHORT, lora_hash
from sdfleet.runtimes._model_files import files_under
from sdfleet.runtimes.base import Job

log = logging.getLogger(__name__)

TAG = re.compile(r"<(\w+):([^>]+)>")
"""SD WebUI's extra-network tag (``modules/extra_networks.py``)."""
NETWORKS = frozenset({"lora", "lyco"})
LORA_FOLDERS = ("Lora", "LyCORIS")
SUFFIXES = (".safetensors", ".pt", ".ckpt")
_SYMBOLS = str.maketrans("", "", ":,")
"""What SD WebUI takes out of a LoRA's name in its ``Lora hashes`` (the infotext's separators)."""


@dataclass(frozen=True)
class LoraUse:
    name: str
    te: float = 1.0
    """Text encoder weight."""
    unet: float = 1.0
    """UNet weight."""


def text(prompt: str) -> str:
    """The prompt as the text encoder sees it: every extra-network tag removed."""
    return TAG.sub("", prompt)


def parse(prompt: str, *, lenient: bool = False) -> list[LoraUse]:
    """The LoRA tags of a prompt. Raises ``Reject`` for a bad weight, and for another network type
    unless ``lenient`` (then it is left out, as SD WebUI skips the networks it cannot find)."""
    return [_use(kind, args) for kind, args in TAG.findall(prompt) if not lenient or _is_lora(kind)]


def _is_lora(kind: str) -> bool:
    return kind.lower() in NETWORKS


def _use(kind: str, args: str) -> LoraUse:
    if not _is_lora(kind):
        raise Reject(
            f"<{kind}:...> is not supported by the diffusers runtime (it reads <lora:name:weight>)",
            code="invalid_params",
        )
    items = args.split(":")
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    if not positional or not positional[0].strip():
        raise Reject(f"<{kind}:{args}> names no LoRA", code="invalid_params")
    te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), args)
    unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else str(te)), args)
    return LoraUse(positional[0].strip(), te, unet)


def _weight(value: str, args: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise Reject(f"<lora:{args}>: {value!r} is not a weight", code="invalid_params")
    return weight


def uses(job: Job, *, lenient: bool = False) -> list[LoraUse]:
    """The LoRAs of a job (prompt and negative prompt), one per name, in order of first use; none
    with SD WebUI's ``disable_extra_networks`` (its tags are still taken out of the text)."""
    if job.params.extra.get("disable_extra_networks") is True:
        return []
    merged: dict[str, LoraUse] = {}
    for use in parse(job.params.prompt, lenient=lenient) + parse(job.params.negative_prompt, lenient=lenient):
        seen = merged.get(use.name.lower())
        if seen is not None:
            use = LoraUse(seen.name, seen.te + use.te, seen.unet + use.unet)
        merged[use.name.lower()] = use
    return list(merged.values())


def key(job: Job) -> tuple[tuple[str, float, float], ...] | None:
    """The job's LoRA set for ``batch_key`` (empty: none); None when its tags are invalid."""
    try:
        return tuple(sorted((u.name.lower(), u.te, u.unet) for u in uses(job)))
    except Reject:
        return None


def find(models_dir: Path) -> dict[str, Path]:
    """LoRA files under ``models_dir`` by lower-case stem (read from disk on every call)."""
    found: dict[str, Path] = {}
    for folder in LORA_FOLDERS:
        for path in files_under(models_dir / folder, SUFFIXES):
            if not path.name.startswith("."):
                found.setdefault(path.stem.lower(), path)
    return found


def names(models_dir: Path) -> list[str]:
    """The LoRA names a prompt may use, sorted."""
    return sorted((p.stem for p in find(models_dir).values()), key=str.lower)


def resolve(job: Job, models_dir: Path, *, skip_missing: bool = False) -> list[tuple[LoraUse, Path]]:
    """The job's LoRAs and their files. Raises ``Reject`` for a bad tag or an unknown name; with
    ``skip_missing`` an unknown name, and a tag of another network kind (``<hypernet:...>``), is
    left out instead (logged), as SD WebUI 1.10 leaves what it cannot find."""
    chosen, missing = _located(uses(job, lenient=skip_missing), models_dir)
    if skip_missing:
        others = [
            f"<{kind}:{args}>"
            for text in (job.params.prompt, job.params.negative_prompt)
            for kind, args in TAG.findall(text)
            if not _is_lora(kind)
        ]
        if missing or others:
            log.warning("task %s: not found, left out: %s", job.task_id, ", ".join(missing + others))
    elif missing:
        where = ", ".join(str(models_dir / f) for f in LORA_FOLDERS)
        raise Reject(
            f"LoRA {', '.join(missing)} not found; available: {', '.join(names(models_dir)) or 'none'} "
            f"(.safetensors/.pt/.ckpt files in {where})",
            code="unknown_lora",
        )
    return chosen


def _located(wanted: list[LoraUse], models_dir: Path) -> tuple[list[tuple[LoraUse, Path]], list[str]]:
    """The LoRAs found in ``models_dir`` with their files, and the names of those not found."""
    files = find(models_dir) if wanted else {}
    chosen = [(u, files[u.name.lower()]) for u in wanted if u.name.lower() in files]
    return chosen, [u.name for u in wanted if u.name.lower() not in files]


def hashes_said(chosen: Sequence[tuple[LoraUse, Path]]) -> str | None:
    """SD WebUI's ``Lora hashes`` infotext value for the LoRAs a call applied: each as its tag
    names it (``:`` and ``,`` taken out) with its short hash (``models.network_hashes``), in order
    of first use; None without any. Blocking: reads a file not hashed before."""
    said = {use.name.translate(_SYMBOLS): lora_hash(path)[:SHORT] for use, path in chosen}
    return ", ".join(f"{name}: {short}" for name, short in said.items()) or None
