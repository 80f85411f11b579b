"""``hf:<repo>[@revision]``: a diffusers pipeline from the Hugging Face Hub into the models folder.

Only what the diffusers runtime loads is fetched: ``model_index.json`` and, per component it
names (the safety checker excepted: the runtime loads without it), the configs and one set of
weights: the ``variant`` (``fp16`` by default: half the download, upcast on load where the device
needs it) when the repository has it, else the plain safetensors, else ``.bin``. Variant files are
renamed to the plain names, so the folder loads offline with no extra arguments.

The files come through ``huggingface_hub`` (its cache, resumable downloads, ``HF_TOKEN``); with
``HF_HUB_OFFLINE=1`` they come from the local cache only. They are hard-linked from the cache into
``<models>/.sdfleet/partial/<name>/`` when the file system allows (copied otherwise), and the folder
gets its final name in one rename.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sdfleet.errors import ConfigError, NotFound, ValidationFailed
from sdfleet.models.catalog import TINY_MARKER
from sdfleet.models.layout import INDEX, STATE_DIR
from sdfleet.telemetry import adopt_library_logs

PREFIX = "hf:"
SOURCE_FILE = "sdfleet-source.json"
_SKIPPED = frozenset({"safety_checker"})
_WEIGHTS = (".safetensors", ".bin")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubResult:
    name: str
    path: Path
    repo: str
    commit: str
    files: int
    size: int
    seconds: float
    up_to_date: bool = False


def parse(spec: str) -> tuple[str, str]:
    """``hf:owner/name[@revision]`` → (repo, revision); ``ValidationFailed`` for anything else."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo):
        raise ValidationFailed(
            f"{spec!r}: expected hf:<owner>/<name>[@revision], e.g. hf:stabilityai/sd-turbo"
        )
    return repo, revision or "main"


def drop_variant(filename: str, variant: str) -> str:
    """``x.fp16.safetensors`` → ``x.safetensors``; ``x.fp16-00001-of-00002.safetensors`` →
    ``x-00001-of-00002.safetensors``; ``x.safetensors.index.fp16.json`` → ``x.safetensors.index.json``."""
    v = re.escape(variant)
    name = re.sub(rf"\.index\.{v}\.json$", ".index.json", filename)
    return re.sub(rf"\.{v}(?=(-\d+-of-\d+)?\.(safetensors|bin)$)", "", name)


def _has_variant(filename: str, variant: str) -> bool:
    return drop_variant(filename, variant) != filename


_VARIANT = re.compile(r"^[^.]+\.\w+(-\d+-of-\d+)?\.(safetensors|bin)$|\.index\.\w+\.json$")


def _is_variant(path: str) -> bool:
    return bool(_VARIANT.search(path.rsplit("/", 1)[-1]))


def choose(files: list[str], index: dict[str, Any], variant: str | None) -> dict[str, str]:
    """Repository paths to fetch → the path each gets in the model folder."""
    chosen = {INDEX: INDEX}
    if TINY_MARKER in files:  # sdfleet's own tiny test models say so
        chosen[TINY_MARKER] = TINY_MARKER
    for component, spec in index.items():
        if component.startswith("_") or component in _SKIPPED or not isinstance(spec, list):
            continue
        if spec[0] is None:
            continue
        inside = [f for f in files if f.startswith(f"{component}/") and f.count("/") == 1]
        weights = [f for f in inside if f.endswith(_WEIGHTS) or ".index." in f]
        chosen.update({f: f for f in inside if f not in weights})
        chosen.update(_weights(weights, variant))
    return chosen


def _weights(weights: list[str], variant: str | None) -> dict[str, str]:
    if variant:
        picked = [f for f in weights if _has_variant(f, variant) and ".safetensors" in f]
        if picked:
            return {f: drop_variant(f, variant) for f in picked}
    for suffix in (".safetensors", ".bin"):
        plain = [f for f in weights if suffix in f and not _is_variant(f)]
        if any(f.endswith(suffix) for f in plain):
            return {f: f for f in plain}
    return {}


class HubPull:
    """One ``hf:`` pull into ``root``."""

    def __init__(self, root: Path, spec: str, *, name: str | None, variant: str | None, bars: bool) -> None:
        try:
            import huggingface_hub
            import huggingface_hub.utils.logging  # gives its logger a handler as it loads: undone below
        except ImportError as e:  # pragma: no cover - comes with the diffusers extra
            raise ConfigError("hf: pulls need huggingface_hub: pip install 'sdfleet[diffusers]'") from e
        adopt_library_logs("huggingface_hub")  # its retries' warnings, once each
        self.hub: Any = huggingface_hub
        self.root = root
        self.repo, self.revision = parse(spec)
        self.name = name or self.repo.split("/")[-1]
        self.variant = variant
        self.bars = bars

    def run(self) -> HubResult:
        """Blocking (call it in a thread, or from the CLI)."""
        started = time.monotonic()
        final = self.root / self.name
        if final.exists() and _source(final).get("repo") != self.repo:  # updated in place, or not at all
            raise ConfigError(
                f"{final} exists and was not pulled from hf:{self.repo}; "
                "give --name another name, or remove it first"
            )
        index_path = Path(self._call(self.hub.hf_hub_download, self.repo, INDEX, revision=self.revision))
        commit = index_path.parent.name
        if _source(final).get("commit") == commit:
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            return HubResult(self.name, final, self.repo, commit, 0, size, 0.0, up_to_date=True)
        index = json.loads(index_path.read_text())
        files = self._list_files(index_path.parent)
        chosen = choose(files, index, self.variant)
        snapshot = Path(
            self._call(
                self.hub.snapshot_download,
                self.repo,
                revision=commit,
                allow_patterns=sorted(chosen),
                tqdm_class=_bar_class() if self.bars else None,
            )
        )
        missing = [f for f in chosen if not (snapshot / f).is_file()]
        if missing:
            raise NotFound(
                f"{self.repo}@{commit[:12]}: {', '.join(missing[:3])} missing from the local cache"
            )
        size = self._place(snapshot, chosen, commit, final)
        return HubResult(self.name, final, self.repo, commit, len(chosen), size, time.monotonic() - started)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        errors = self.hub.errors
        try:
            return fn(*args, **kwargs)
        except errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is one
            raise NotFound(
                f"hf:{self.repo}@{self.revision} is not in the local Hugging Face cache and the hub cannot "
                f"be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
            ) from e
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
            raise NotFound(f"hf:{self.repo}@{self.revision}: {type(e).__name__}: {e}") from e
        except errors.HfHubHTTPError as e:
            raise ConfigError(f"hf:{self.repo}: the hub refused ({e}); gated models need HF_TOKEN") from e

    def _list_files(self, snapshot: Path) -> list[str]:
        """The repository's files: from the hub, or from the cached snapshot when offline."""
        try:
            return list(self.hub.HfApi().list_repo_files(self.repo, revision=snapshot.name))
        except Exception as e:  # offline, or the hub unreachable: hub and HTTP libraries vary
            if isinstance(e, self.hub.errors.HfHubHTTPError):
                raise
            if not snapshot.is_dir():
                raise NotFound(f"hf:{self.repo}: cannot list its files offline") from e
            return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]

    def _place(self, snapshot: Path, chosen: dict[str, str], commit: str, final: Path) -> int:
        staging = self.root / STATE_DIR / "partial" / self.name
        shutil.rmtree(staging, ignore_errors=True)
        size = 0
        for src, dst in chosen.items():
            target = staging / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            real = (snapshot / src).resolve()
            if dst.endswith(".index.json") and self.variant:
                _rewrite_index(real, target, self.variant)
            else:
                _link_or_copy(real, target)
            size += target.stat().st_size
        source = {"source": "hf", "repo": self.repo, "revision": self.revision, "commit": commit}
        (staging / SOURCE_FILE).write_text(json.dumps({**source, "variant": self.variant}, indent=1))
        if final.exists():
            old = self.root / STATE_DIR / "trash" / f"{self.name}-{time.time_ns()}"
            old.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, final)
        return size


def _source(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and (folder / INDEX).is_file() else {}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _rewrite_index(src: Path, dst: Path, variant: str) -> None:
    index = json.loads(src.read_text())
    weight_map = index.get("weight_map", {})
    index["weight_map"] = {k: drop_variant(PurePosixPath(v).name, variant) for k, v in weight_map.items()}
    dst.write_text(json.dumps(index, indent=2))


def _bar_class() -> Any:
    tqdm: Any = importlib.import_module("tqdm.auto").tqdm  # comes with huggingface_hub

    class Bar(tqdm):  # type: ignore[misc]
        """tqdm on stderr, quiet when stderr is not a terminal."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("disable", not sys.stderr.isatty())
            super().__init__(*args, **kwargs)

    return Bar
