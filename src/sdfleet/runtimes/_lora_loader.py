"""LoRA adapters in loaded diffusers pipelines: loaded with diffusers' own LoRA loading (kohya/SD
WebUI and diffusers formats), kept resident per pipeline up to a bound, switched per pipeline call.
Imports torch; peft when the first LoRA is loaded.

A call with LoRAs activates exactly its set with its weights (``set_adapters``); a call without
disables every adapter, so the pipeline computes what the plain model does (peft's disabled layers
run the base layer alone: the images are the plain model's, bit for bit). Least recently used
adapters are deleted once more than ``max_loaded`` are resident in a pipeline.

Text encoders: diffusers injects their LoRA layers through transformers' ``load_adapter``, which in
transformers 5 requires a peft release that PyPI does not have yet; ``_peft_load_adapter`` does what
it does (inject the layers, load their weights) with peft's own functions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sdfleet.errors import Reject
from sdfleet.runtimes import _diffusers_lora as L

log = logging.getLogger(__name__)

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# peft's advice when a second adapter joins a model, and when an active one is deleted: both are
# what this module means to do.
_EXPECTED_WARNINGS = ("Already found a `peft_config` attribute", "Adapter .* was active which is now deleted")
_FileKey = tuple[Path, int, int]


class _Resident:
    """One pipeline's loaded adapters: file → adapter name, least recently used first."""

    def __init__(self) -> None:
        self.adapters: OrderedDict[_FileKey, str] = OrderedDict()


class LoraLoader:
    """Applies a job's LoRA set to a pipeline before its call. Call from the inference thread."""

    def __init__(self, max_loaded: int) -> None:
        self.max_loaded = max(1, max_loaded)
        self._pipes: weakref.WeakKeyDictionary[Any, _Resident] = weakref.WeakKeyDictionary()
        self._ids = itertools.count(1)

    def resident(self, pipe: Any) -> list[str]:
        """Files of the adapters loaded in ``pipe``, least recently used first."""
        state = self._pipes.get(pipe)
        return [key[0].name for key in state.adapters] if state else []

    def apply(self, pipe: Any, chosen: Sequence[tuple[L.LoraUse, Path]]) -> None:
        """Make ``pipe`` compute with exactly the ``chosen`` LoRAs (none: the plain model)."""
        state = self._pipes.setdefault(pipe, _Resident())
        if not chosen:
            if state.adapters:
                pipe.disable_lora()
            return
        keys = [_file_key(path) for _, path in chosen]
        names = [self._ensure(pipe, state, key, keep=set(keys)) for key in keys]
        lists = pipe.get_list_adapters()
        weights = [_weights(lists, name, use) for name, (use, _) in zip(names, chosen, strict=True)]
        pipe.enable_lora()
        pipe.set_adapters(names, weights)

    def _ensure(self, pipe: Any, state: _Resident, key: _FileKey, keep: set[_FileKey]) -> str:
        name = state.adapters.get(key)
        if name is not None:
            state.adapters.move_to_end(key)
            return name
        for old in [k for k in state.adapters if k[0] == key[0]]:  # the file changed: reload
            self._delete(pipe, state, old)
        while len(state.adapters) >= self.max_loaded:
            victim = next((k for k in state.adapters if k not in keep), None)
            if victim is None:
                break  # a job with more LoRAs than max_loaded: they all stay for its call
            self._delete(pipe, state, victim)
        name = f"sdfleet_lora_{next(self._ids)}"
        self._load(pipe, key[0], name)
        state.adapters[key] = name
        return name

    def _load(self, pipe: Any, path: Path, name: str) -> None:
        state_dict = _read(path)
        try:
            with _expected_warnings(), _text_encoders_via_peft(pipe):
                pipe.load_lora_weights(state_dict, adapter_name=name)
        except Exception as e:
            with contextlib.suppress(Exception), _expected_warnings():
                pipe.delete_adapters([name])  # whatever part of it was injected
            if isinstance(e, torch.cuda.OutOfMemoryError | MemoryError):
                raise
            raise Reject(f"LoRA {path.stem} does not fit this model: {e}", code="bad_lora") from e
        log.info("loaded LoRA %s as adapter %s", path.name, name)

    def _delete(self, pipe: Any, state: _Resident, key: _FileKey) -> None:
        name = state.adapters.pop(key)
        with _expected_warnings():
            pipe.delete_adapters([name])
        log.info("unloaded LoRA %s (adapter %s)", key[0].name, name)


def _file_key(path: Path) -> _FileKey:
    stat = path.stat()
    return (path, stat.st_mtime_ns, stat.st_size)


def _weights(lists: dict[str, list[str]], name: str, use: L.LoraUse) -> dict[str, float]:
    """Per-component weights of one adapter: ``unet`` for the UNet, ``te`` for text encoders."""
    return {part: use.unet if part == "unet" else use.te for part, names in lists.items() if name in names}


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Reject(f"LoRA {path.name} is not readable: {e}", code="bad_lora") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise Reject(f"LoRA {path.name} holds no state dict", code="bad_lora")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def _expected_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


@contextlib.contextmanager
def _text_encoders_via_peft(pipe: Any) -> Iterator[None]:
    encoders = [e for e in (getattr(pipe, n, None) for n in _TEXT_ENCODERS) if e is not None]
    # The clip-skip alias (``_diffusers_pipes._clip_skip_compat``) would make diffusers take a
    # flattened transformers 5 CLIPTextModel for an old one and keep the ``text_model.`` prefix of
    # SD WebUI's LoRA keys: hidden while loading.
    aliased = [e for e in encoders if e.__dict__.get("text_model") is e]
    for encoder in encoders:
        encoder.load_adapter = _peft_load_adapter(encoder)  # found before the class's method
    for encoder in aliased:
        del encoder.__dict__["text_model"]
    try:
        yield
    finally:
        for encoder in encoders:
            del encoder.load_adapter
        for encoder in aliased:
            object.__setattr__(encoder, "text_model", encoder)


def _peft_load_adapter(model: Any) -> Any:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    def load_adapter(
        *, adapter_name: str, adapter_state_dict: dict[str, Any], peft_config: Any, **_: Any
    ) -> None:
        inject_adapter_in_model(peft_config, model, adapter_name)  # also sets model.peft_config
        result: Any = set_peft_model_state_dict(model, adapter_state_dict, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f"{len(result.unexpected_keys)} LoRA weights match no layer of the text encoder")
        model._hf_peft_config_loaded = True  # what diffusers reads to list and delete adapters

    return load_adapter
