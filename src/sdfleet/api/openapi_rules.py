"""The constraints the server checks beyond its pydantic models, written into the OpenAPI schemas:
the largest size, input image fields, webhook URLs, the fleet's queue names, the task types its
runtimes run, and what each task type cannot run without (an ``anyOf`` of the cases that run,
which fuzzers generate from better than from ``if``/``then``). ``tighten`` edits the components
in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Any

from sdfleet.api.openapi import IMAGE_FORMAT
from sdfleet.api.seed_schemas import (
    INPUTS_MAX,
    NAME_MAX,
    TEXT_MAX,
    URL_PATTERN,
    id_schema,
    v1alpha1_types,
    v1alpha2_types,
)
from sdfleet.compat._common import TASK_TYPES
from sdfleet.errors import worded
from sdfleet.runtimes.unsupported import images_max, runnable
from sdfleet.settings import ApiSettings, FleetConfig
from sdfleet.tasks import TaskType

Schema = dict[str, Any]
IMAGE: Schema = {
    "type": "string",
    "format": IMAGE_FORMAT,
    "description": "An http(s) or s3:// URL, a data: URL or base64 of an image",
}
UPSCALES = ["extra-single-image", "extra-batch-images", "extra-batch-image"]
_SPACE = "".join(
    f"\\u{c:04x}" for c in (*range(0x9, 0xE), *range(0x1C, 0x21), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                           0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
)  # fmt: skip
NON_BLANK: Schema = {"type": "string", "pattern": worded(f"[^{_SPACE}]", "text besides white space")}
"""Something besides white space, as ``str.strip`` (the server's check) sees it: ECMA's ``\\S``
takes U+001C..U+001F and U+0085 for text, so a prompt of those passed the schema and was refused."""


def _value(prop: Schema) -> Schema:
    """The non-null branch of an optional property (pydantic writes ``anyOf: [T, null]``)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return dict(branch)  # the caller writes it back (a copy: branches may be shared)
    return prop


def _set(props: Schema, name: str, **constraints: Any) -> None:
    prop = props[name]
    if "anyOf" in prop:
        branches = [b if b.get("type") == "null" else {**b, **constraints} for b in prop["anyOf"]]
        props[name] = {**prop, "anyOf": branches}
    else:
        prop.update(constraints)


def _is(value: Any) -> Schema:
    return {"const": value} if isinstance(value, str) else {"enum": list(value)}


def _has(name: str, schema: Schema) -> Schema:
    """An object with ``name``, which is ``schema`` (``required`` alone holds for a null)."""
    return {"type": "object", "required": [name], "properties": {name: schema}}


IMAGES = {"type": "array", "minItems": 1}


def a1111_variants(
    type_of: Callable[[Schema], Schema], runs: Collection[str] = tuple(TASK_TYPES)
) -> list[Schema]:
    """The A1111 bodies that run, one schema per case (``anyOf`` them): what each task type
    cannot run without. ``type_of(cond)`` places the condition on the task type; only the task
    type names in ``runs`` (what the fleet's runtimes run) have cases."""

    def case(kind: Any, *needs: Schema) -> Schema | None:
        names = [n for n in ([kind] if isinstance(kind, str) else kind) if n in runs]
        if not names:
            return None
        return {"allOf": [type_of(_is(names[0] if isinstance(kind, str) else names)), *needs]}

    batch = ["extra-batch-images", "extra-batch-image"]
    cases = [
        case("text-to-image", _has("prompt", NON_BLANK)),
        case("image-to-image", _has("alwayson_scripts", _has("image_link", {"type": "string"}))),
        case("image-to-image", _has("init_images", IMAGES)),
        case("extra-single-image", _has("image", {"type": "string"})),
        case("extra-single-image", _has("init_images", IMAGES)),
        case(batch, _has("imageList", IMAGES)),
        # without a list in imageList, the seed takes init_images
        case(batch, {"properties": {"imageList": {"type": "null"}}}, _has("init_images", IMAGES)),
    ]
    return [c for c in cases if c is not None]


def _v1_variants(runs: Collection[str]) -> list[Schema]:
    def typed(kind: Any) -> Schema:
        return {"required": ["type"], "properties": {"type": _is(kind)}}

    variants = []
    if "text-to-image" in runs:  # no ``type`` is text-to-image: this case does not require it
        text = {"properties": {"type": _is("text-to-image")}}
        variants.append({"allOf": [text, _has("params", _has("prompt", NON_BLANK))]})
    inputs = [k for k in ("image-to-image", "extra-single-image", "extra-batch-images") if k in runs]
    if inputs:
        variants.append({"allOf": [typed(inputs), _has("params", _has("init_images", IMAGES))]})
    if "pipeline" in runs:
        flow = _has("workflow", {"type": "object", "minProperties": 1})
        variants.append({"allOf": [typed("pipeline"), _has("params", flow)]})
    return variants


def _tighten_a1111(c: Schema, settings: ApiSettings, runs: Collection[str], images: int) -> None:
    for name in ("V1alpha1Body", "A1111Content"):  # A1111Content: v1alpha2's content
        props = c[name]["properties"]
        _set(props, "batch_size", maximum=images)
        _set(props, "width", maximum=settings.max_width)
        _set(props, "height", maximum=settings.max_height)
        _set(props, "image", **IMAGE)
        _set(props, "init_images", items=IMAGE)
    c["ImageItem"]["properties"]["data"] = IMAGE
    scripts = c["AlwaysOnScripts"]["properties"]
    scripts["task"]["enum"] = [n for n in v1alpha1_types() if n in runs] or v1alpha1_types()
    scripts["id_task"] = id_schema()

    def in_scripts(cond: Schema) -> Schema:
        return _has("alwayson_scripts", {"required": ["task"], "properties": {"task": cond}})

    c["V1alpha1Body"]["anyOf"] = a1111_variants(in_scripts, runs) or a1111_variants(in_scripts)
    meta = c["Metadata"]["properties"]
    meta["id"] = id_schema()
    meta["tasktype"]["enum"] = [n for n in v1alpha2_types() if n in runs]

    def in_meta(cond: Schema) -> Schema:
        return _has("metadata", {"required": ["tasktype"], "properties": {"tasktype": cond}})

    def content(case: Schema) -> Schema:
        condition, *needs = case["allOf"]
        return {"allOf": [condition, *(_has("content", n) for n in needs)]}

    pipeline = {"allOf": [in_meta(_is("pipeline")), _has("content", {"type": "object", "minProperties": 1})]}
    flows = [pipeline] if "pipeline" in runs else []
    c["TaskBody"]["anyOf"] = [*(content(case) for case in a1111_variants(in_meta, runs)), *flows]


def _inline(c: Schema, owner: str, *path: str) -> None:
    """Replace the ``$ref`` at ``owner.properties.<path...>`` by a copy of what it points to: the
    cases constrain fields inside it, and generators merge ``anyOf`` cases with inline schemas
    better than with references."""
    holder = c[owner]
    for name in path[:-1]:
        holder = holder["properties"][name]
    props = holder["properties"]
    ref = props[path[-1]].get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        props[path[-1]] = copy.deepcopy(c[ref.rsplit("/", 1)[-1]])


def tighten(c: Schema, settings: ApiSettings, fleet: FleetConfig) -> None:
    """Write the server's further constraints into the components ``c``."""
    params = c["TaskParams"]["properties"]
    params["width"].update(multipleOf=8, maximum=settings.max_width)
    params["height"].update(multipleOf=8, maximum=settings.max_height)
    params["init_images"]["items"] = IMAGE
    params["init_images"]["maxItems"] = INPUTS_MAX  # TaskRequest's own bounds (records are not held to them)
    for name in ("prompt", "negative_prompt"):
        params[name]["maxLength"] = TEXT_MAX
    for name in ("sampler", "upscaler"):
        params[name]["anyOf"][0].update(minLength=1, maxLength=NAME_MAX)
    c["Webhook"]["properties"]["url"].update(pattern=URL_PATTERN, maxLength=2048)
    request = c["TaskRequest"]
    request["properties"]["queue"] = {
        "anyOf": [{"type": "string", "enum": [q.name for q in fleet.queues]}, {"type": "null"}],
        "description": "A queue of the fleet whose filter accepts the task; default the first that does",
    }
    # Only the task types some queue's runtime runs: a schema-valid request is one the fleet runs.
    kinds = runnable(q.runtime for q in fleet.queues)
    runs = [name for name, kind in TASK_TYPES.items() if kind in kinds]
    request["anyOf"] = _v1_variants(runs)
    # as many images as the fleet's most generous runtime makes (a diffusers-only fleet: its own)
    images = max(images_max(q.runtime) for q in fleet.queues)
    params["batch_size"]["maximum"] = images
    _tighten_a1111(c, settings, runs, images)
    for owner, *path in (
        ("TaskRequest", "type"),
        ("TaskRequest", "params"),
        ("V1alpha1Body", "alwayson_scripts"),
        ("TaskBody", "metadata"),
        ("TaskBody", "content"),
        ("V1alpha2Body", "task"),
    ):
        _inline(c, owner, *path)
    # inlined above (a copy): the TaskType component stays whole for the answers that use it
    request["properties"]["type"]["enum"] = [k.value for k in TaskType if k in kinds]
