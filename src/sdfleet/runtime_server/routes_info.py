"""The ``/sdapi/v1`` endpoints that list, configure and watch: options, models, samplers,
schedulers, upscalers, flags, memory, progress, interrupt."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel

from sdfleet.runtime_server import extras, samplers
from sdfleet.runtime_server import schemas as S
from sdfleet.runtime_server.options import cmd_flags_template
from sdfleet.runtime_server.routes import server

router = APIRouter(prefix="/sdapi/v1")


@router.get("/progress", response_model=S.ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    job = server(request).state
    # No live preview: the runtime reports a fraction, not the latents SD WebUI decodes one from.
    return {**job.progress(), "state": job.snapshot(), "current_image": None, "textinfo": None}


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    await server(request).interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> None:
    server(request).state.skipped = True


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    state = server(request)
    title, sha = state.loaded()
    return state.options.listing(title, sha)


@router.post("/options")
async def set_options(request: Request, body: Annotated[dict[str, Any], Body()]) -> None:
    state = server(request)
    state.options.check(body)
    checkpoint = body.pop("sd_model_checkpoint", None)
    if isinstance(checkpoint, str) and checkpoint:
        await state.load(checkpoint)
    state.options.update(body)


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    flags = cmd_flags_template()
    flags.update(request.app.state.cmd_flags)
    return flags


@router.get("/sd-models", response_model=list[S.SDModelItem])
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(server(request).checkpoints.items)


@router.post("/refresh-checkpoints")
async def refresh_checkpoints() -> None:
    return None  # the catalog reads the models folder on every call


@router.get("/sd-vae", response_model=list[S.SDVaeItem])
async def sd_vae() -> list[dict[str, Any]]:
    return []  # no separate VAE files: each model uses its own


@router.get("/samplers", response_model=list[S.SamplerItem])
async def sampler_list() -> list[dict[str, Any]]:
    return samplers.sampler_items()


@router.get("/schedulers", response_model=list[S.SchedulerItem])
async def scheduler_list() -> list[dict[str, Any]]:
    return samplers.schedule_items()


@router.get("/upscalers", response_model=list[S.UpscalerItem])
async def upscalers(request: Request) -> list[dict[str, Any]]:
    # SD WebUI reports its built-in upscalers with scale 4.0; then the model upscalers the runtime
    # found (models/ESRGAN, models/RealESRGAN), by the names extras requests may use.
    built_in = [{"name": name, "scale": 4.0} for name in extras.UPSCALERS]
    models = extras.model_upscalers(server(request).runtime)
    return built_in + [{"name": name, "model_name": name} for name in models]


@router.get("/prompt-styles", response_model=list[S.PromptStyleItem])
async def prompt_styles(request: Request) -> list[dict[str, Any]]:
    """The models folder's ``styles.csv``, as SD WebUI lists its own (a request's ``styles``)."""
    styles = await asyncio.to_thread(server(request).styles.all)
    return [
        {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()
    ]


# Lists of what SD WebUI has and this server does not (hires fix's latent modes, hypernetworks, face
# restoration, selectable scripts): empty, with SD WebUI's item shapes, so a client that reads
# them (webuiapi's get_* helpers) gets a list, not a 404. Model upscalers, RealESRGAN's included,
# are in /upscalers by the names extras requests use.
_NONE_HERE: dict[str, type[BaseModel]] = {
    "/latent-upscale-modes": S.NamedItem,
    "/hypernetworks": S.HypernetworkItem,
    "/face-restorers": S.FaceRestorerItem,
    "/realesrgan-models": S.RealesrganItem,
    "/script-info": S.ScriptInfo,
}


async def _none_here() -> list[dict[str, Any]]:
    return []


for _path, _item in _NONE_HERE.items():  # list[...] of a value: fine at run time, not a static type
    router.add_api_route(_path, _none_here, methods=["GET"], response_model=list[_item])  # type: ignore[valid-type]


@router.post("/unload-checkpoint")
async def unload_checkpoint(request: Request) -> dict[str, Any]:
    await server(request).unload()
    return {}


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request) -> dict[str, Any]:
    await server(request).reload()
    return {}


@router.post("/refresh-vae")
async def refresh_vae() -> None:
    return None  # no separate VAE files (sd-vae is empty)


@router.get("/embeddings", response_model=S.EmbeddingsResponse)
async def embeddings(request: Request) -> dict[str, Any]:
    """The models folder's ``embeddings/``, as SD WebUI lists its own: those made for the loaded
    model, and the others (another model family's, skipped); none with a runtime without them."""
    lists = getattr(server(request).runtime, "embeddings", None)
    loaded, skipped = lists() if callable(lists) else ([], [])

    def items(found: list[Any]) -> dict[str, dict[str, Any]]:
        keys = ("step", "sd_checkpoint", "sd_checkpoint_name", "shape")
        return {e.name: {**{k: getattr(e, k) for k in keys}, "vectors": e.count} for e in found}

    return {"loaded": items(loaded), "skipped": items(skipped)}


@router.post("/refresh-embeddings")
async def refresh_embeddings() -> None:
    return None  # the runtime reads <models>/embeddings/ again whenever its files change


@router.get("/scripts", response_model=S.ScriptsList)
async def scripts() -> dict[str, Any]:
    return {"txt2img": [], "img2img": []}


@router.get("/memory", response_model=S.MemoryResponse)
async def memory() -> dict[str, Any]:
    return {"ram": _ram(), "cuda": _cuda()}


def _ram() -> dict[str, Any]:
    """As SD WebUI reports it: this process's resident memory and the machine's total."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = float(page * os.sysconf("SC_PHYS_PAGES"))
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page
    except OSError:
        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"free": total - used, "used": used, "total": total}


def _cuda() -> dict[str, Any]:
    torch: Any = sys.modules.get("torch")  # imported by the diffusers runtime, not by this module
    if torch is None or not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)},
    }
