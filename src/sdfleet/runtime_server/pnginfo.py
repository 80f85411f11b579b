"""PNG text chunks (SD WebUI keeps its infotext in ``parameters``) and ``/png-info``'s parsing of them.

``parse`` reads an infotext the way SD WebUI 1.10's ``parse_generation_parameters`` does: prompt,
``Negative prompt:``, the ``key: value`` line (``Size: 64x64`` → ``Size-1``/``Size-2``), then the
defaults SD WebUI fills in for keys an infotext leaves out.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-(\d+))?")
# What SD WebUI assumes for a key an infotext does not mention.
_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}
# Keys of PIL's ``Image.info`` that SD WebUI does not report as items.
IGNORED_INFO_KEYS = frozenset(
    {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp"}
    | {"duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # as PIL does: international text goes in an uncompressed iTXt
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with its text chunks replaced by ``text``, written before the image data."""
    if not png.startswith(_SIGNATURE):
        raise ValueError("not a PNG")
    out, pos, written = [_SIGNATURE], len(_SIGNATURE), False
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        end = pos + 12 + length
        if kind == b"IDAT" and not written:
            out.extend(_text_chunk(k, v) for k, v in text.items())
            written = True
        if kind not in _TEXT_CHUNKS:
            out.append(png[pos:end])
        pos = end
    return b"".join(out)


def text_items(info: Mapping[Any, Any]) -> dict[str, str]:
    """The text entries of a PIL ``Image.info`` (what SD WebUI writes back into a PNG it re-encodes)."""
    return {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)}


def _unquote(text: str) -> Any:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split(text: str) -> tuple[str, str, str]:
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in (x.strip() for x in lines):
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), last


def _backcompat(res: dict[str, Any]) -> None:
    m = _VERSION.match(str(res.get("Version", "")))
    if m is None:
        return
    ver = tuple(int(x or 0) for x in m.groups())
    if ver < (1, 6, 0, 0) and "[" in str(res.get("Prompt", "")):
        res["Old prompt editing timelines"] = True
    if ver < (1, 6, 0, 0) and res.get("Sampler") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < (1, 7, 0, 225):
        res["Downcast alphas_cumprod"] = True
    if ver < (1, 8, 0, 0) and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse(text: str) -> dict[str, Any]:
    """An infotext as ``/png-info``'s ``parameters``."""
    prompt, negative, last = _split(text)
    res: dict[str, Any] = {}
    for key, raw in _PARAM.findall(last):
        value = _unquote(raw) if raw[:1] == '"' and raw[-1:] == '"' else raw
        size = _SIZE.match(str(value))
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in _DEFAULTS.items():
        res.setdefault(key, value)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    if re.search(r"(?<!\\)[(\[]", prompt + negative):
        res.setdefault("Emphasis", "Original")
    res.setdefault("Refiner switch by sampling steps", False)
    _backcompat(res)
    return res
