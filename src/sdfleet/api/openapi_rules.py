"""The constraints the server checks beyond its pydantic models, written into the OpenAPI schemas:
the largest size, input image fields, webhook URLs, the fleet's queue names, and what each task
type cannot run without (``if``/``then`` on the type). ``tighten`` edits the components in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdfleet.api.openapi import IMAGE_FORMAT
from sdfleet.api.seed_schemas import URL_PATTERN, id_schema, v1alpha1_types, v1alpha2_types
from sdfleet.settings import ApiSettings, FleetConfig

Schema = dict[str, Any]
IMAGE: Schema = {
    "type": "string",
    "format": IMAGE_FORMAT,
    "description": "An http(s) URL, a data: URL or base64 of an image",
}
UPSCALES = ["extra-single-image", "extra-batch-images", "extra-batch-image"]
NON_BLANK: Schema = {"type": "string", "pattern": r"\S"}


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


def _when(cond: Schema, then: Schema) -> Schema:
    return {"if": cond, "then": then}


def _is(value: Any) -> Schema:
    return {"const": value} if isinstance(value, str) else {"enum": list(value)}


def _needs(*alternatives: Schema) -> Schema:
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": list(alternatives)}


def _has(name: str, schema: Schema) -> Schema:
    return {"required": [name], "properties": {name: schema}}


IMAGES = {"type": "array", "minItems": 1}


def a1111_rules(type_of: Callable[[Schema], Schema]) -> list[Schema]:
    """What an A1111 body needs per task type; ``type_of(cond)`` places the type condition."""
    scripts_link = _has("alwayson_scripts", _has("image_link", {"type": "string"}))
    no_list = {"not": _has("imageList", {"type": "array"})}
    return [
        _when(type_of(_is("text-to-image")), _has("prompt", NON_BLANK)),
        _when(type_of(_is("image-to-image")), _needs(scripts_link, _has("init_images", IMAGES))),
        _when(
            type_of(_is("extra-single-image")),
            _needs(_has("image", {"type": "string"}), _has("init_images", IMAGES)),
        ),
        _when(
            type_of(_is(["extra-batch-images", "extra-batch-image"])),
            _needs(_has("imageList", IMAGES), {"allOf": [no_list, _has("init_images", IMAGES)]}),
        ),
    ]


def _v1_rules() -> list[Schema]:
    def typed(cond: Schema) -> Schema:
        return {"required": ["type"], "properties": {"type": cond}}

    params = "params"
    return [
        # no ``type`` means text-to-image: the condition holds when it is absent too
        _when({"properties": {"type": _is("text-to-image")}}, _has(params, _has("prompt", NON_BLANK))),
        _when(
            typed(_is(["image-to-image", "extra-single-image", "extra-batch-images"])),
            _has(params, _has("init_images", IMAGES)),
        ),
        _when(typed(_is("pipeline")), _has(params, _has("workflow", {"type": "object", "minProperties": 1}))),
    ]


def _tighten_a1111(c: Schema, settings: ApiSettings) -> None:
    for name in ("V1alpha1Body", "A1111Content"):
        props = c[name]["properties"]
        _set(props, "width", maximum=settings.max_width)
        _set(props, "height", maximum=settings.max_height)
        _set(props, "image", **IMAGE)
        _set(props, "init_images", items=IMAGE)
    c["ImageItem"]["properties"]["data"] = IMAGE
    scripts = c["AlwaysOnScripts"]["properties"]
    scripts["task"]["enum"] = v1alpha1_types()
    scripts["id_task"] = id_schema()

    def in_scripts(cond: Schema) -> Schema:
        return _has("alwayson_scripts", {"required": ["task"], "properties": {"task": cond}})

    c["V1alpha1Body"]["allOf"] = a1111_rules(in_scripts)
    meta = c["Metadata"]["properties"]
    meta["id"] = id_schema()
    meta["tasktype"]["enum"] = v1alpha2_types()

    def in_meta(cond: Schema) -> Schema:
        return _has("metadata", {"required": ["tasktype"], "properties": {"tasktype": cond}})

    pipeline = in_meta(_is("pipeline"))
    c["TaskBody"]["allOf"] = [
        {
            "if": pipeline,
            "then": _has("content", {"type": "object", "minProperties": 1}),
            "else": _has("content", {"$ref": "#/components/schemas/A1111Content"}),
        },
        *({"if": rule["if"], "then": _has("content", rule["then"])} for rule in a1111_rules(in_meta)),
    ]


def tighten(c: Schema, settings: ApiSettings, fleet: FleetConfig) -> None:
    """Write the server's further constraints into the components ``c``."""
    params = c["TaskParams"]["properties"]
    params["width"].update(multipleOf=8, maximum=settings.max_width)
    params["height"].update(multipleOf=8, maximum=settings.max_height)
    params["init_images"]["items"] = IMAGE
    c["Webhook"]["properties"]["url"].update(pattern=URL_PATTERN, maxLength=2048)
    request = c["TaskRequest"]
    request["properties"]["queue"] = {
        "anyOf": [{"type": "string", "enum": [q.name for q in fleet.queues]}, {"type": "null"}],
        "description": "A queue of the fleet whose filter accepts the task; default the first that does",
    }
    request["allOf"] = _v1_rules()
    _tighten_a1111(c, settings)
