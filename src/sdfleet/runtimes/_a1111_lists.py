"""What an SD WebUI offers (checkpoints, samplers, schedule types), read once and kept.

SD WebUI answers an unknown sampler or scheduler with 200 and an image made with its default
(DPM++ 2M, Automatic), so names are checked here first. SD WebUI 1.10 takes a sampler by its exact
name, optionally followed by a schedule label ("DPM++ 2M Karras"); an alias or a name in other
case is sent as SD WebUI's own name. Lists are fetched again once before a name is refused, in
case SD WebUI gained it since (an extension, a new checkpoint). A server that lists no samplers
(``/samplers`` answers 404: not SD WebUI itself) gets names as the task gives them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from sdfleet.errors import Reject

Get = Callable[[str], Awaitable[Any]]


def _bare(title: str) -> str:
    return title.rsplit(" [", 1)[0] if title.endswith("]") else title


def same_checkpoint(a: str | None, b: str | None) -> bool:
    """Two titles of one checkpoint: SD WebUI adds the hash to a title once it has read the file."""
    return a is not None and b is not None and _bare(a) == _bare(b)


def _model_matches(name: str, item: Mapping[str, Any]) -> bool:
    bare = _bare(name)
    filename = Path(str(item.get("filename", ""))).name
    candidates = {str(item.get("title", "")), str(item.get("model_name", "")), filename, Path(filename).stem}
    return name in candidates or bare in candidates or Path(bare).stem in candidates


class Lists:
    """SD WebUI's checkpoints, samplers and schedulers, fetched with ``get`` when first needed."""

    def __init__(self, get: Get) -> None:
        self._get = get
        self._models: list[dict[str, Any]] | None = None
        self._samplers: dict[str, str] | None = None
        """Lower-case name or alias → SD WebUI's name."""
        self._schedules: dict[str, str] | None = None
        """Lower-case name, label or alias → label (empty when SD WebUI predates /schedulers)."""
        self._unlisted = False
        """The server lists no samplers: names cannot be checked."""

    async def title(self, model: str) -> str:
        """The checkpoint title SD WebUI knows ``model`` by (file name, stem or title)."""
        for refresh in (False, True):
            if refresh or self._models is None:
                self._models = list(await self._get("/sdapi/v1/sd-models"))
            found = next((m for m in self._models if _model_matches(model, m)), None)
            if found is not None:
                return str(found["title"])
        raise Reject(f"SD WebUI has no checkpoint {model!r}", code="unknown_model")

    async def _load_samplers(self) -> None:
        samplers: dict[str, str] = {}
        try:
            listed = await self._get("/sdapi/v1/samplers")
        except Reject:
            listed, self._unlisted = [], True
        for item in listed:
            for name in (item["name"], *(item.get("aliases") or [])):
                samplers[str(name).lower()] = str(item["name"])
        schedules: dict[str, str] = {}
        try:
            items = await self._get("/sdapi/v1/schedulers")
        except Reject:  # SD WebUI before 1.9 has no schedulers (the names carry the schedule)
            items = []
        for item in items:
            for name in (item["name"], item["label"], *(item.get("aliases") or [])):
                schedules[str(name).lower()] = str(item["label"])
        self._samplers, self._schedules = samplers, schedules

    def _split(self, name: str) -> tuple[str, str | None]:
        assert self._samplers is not None and self._schedules is not None
        lowered = name.strip().lower()
        if lowered in self._samplers:
            return self._samplers[lowered], None
        for schedule, label in self._schedules.items():
            base = lowered.removesuffix(" " + schedule)
            if base != lowered and base in self._samplers:
                return self._samplers[base], label
        raise KeyError(name)

    async def sampler(self, name: str) -> str:
        """SD WebUI's spelling of sampler ``name``; ``Reject`` (unknown_sampler) with the list."""
        for refresh in (False, True):
            if refresh or self._samplers is None:
                await self._load_samplers()
            if self._unlisted:
                return name
            try:
                base, schedule = self._split(name)
            except KeyError:
                continue
            return f"{base} {schedule}" if schedule else base
        known = sorted(set((self._samplers or {}).values()))
        raise Reject(f"SD WebUI has no sampler {name!r}; it has: {', '.join(known)}", code="unknown_sampler")

    async def scheduler(self, name: str) -> str:
        """SD WebUI's label of schedule type ``name``; ``Reject`` (unknown_scheduler) with the list."""
        for refresh in (False, True):
            if refresh or self._schedules is None:
                await self._load_samplers()
            assert self._schedules is not None
            if self._unlisted:
                return name
            label = self._schedules.get(name.strip().lower())
            if label is not None:
                return label
        known = sorted(set((self._schedules or {}).values()))
        raise Reject(
            f"SD WebUI has no schedule type {name!r}; it has: {', '.join(known) or 'none'}",
            code="unknown_scheduler",
        )
