"""The OpenAPI document's rules say what the server's own checks accept (schemathesis holds the
server to the document: a body the schema allows must not be refused)."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from sdfleet.api.openapi_rules import NON_BLANK


def test_non_blank_is_what_str_strip_leaves_something_of() -> None:
    """``check_task`` refuses a prompt that ``str.strip`` empties; ECMA's ``\\S`` let U+001D through."""
    pattern = re.compile(NON_BLANK["pattern"])
    disagree = [
        hex(i)
        for i in range(sys.maxunicode + 1)
        if not 0xD800 <= i < 0xE000 and bool(pattern.search(chr(i))) == chr(i).isspace()
    ]
    assert disagree == []


def _document(*runtimes: str) -> dict[str, Any]:
    from sdfleet.api.app import build_app
    from sdfleet.settings import FleetConfig, QueueConfig, Settings

    queues = [QueueConfig(name=f"q{n}", runtime=r, filter={"runtime": [r]}) for n, r in enumerate(runtimes)]
    queues[-1].filter = {}  # the last takes the rest
    fleet = FleetConfig(queues=queues)
    app = build_app(Settings().api, fleet, None)  # type: ignore[arg-type]  # no lifespan: not served
    return app.openapi()["components"]["schemas"]  # type: ignore[no-any-return]


def test_the_document_offers_only_the_task_types_the_fleets_runtimes_run() -> None:
    """A pipeline on a fleet without comfyui is refused at submit (422 unsupported_task): the
    document does not offer one, so what it allows is what the fleet runs."""
    c = _document("diffusers")
    assert "pipeline" not in c["TaskRequest"]["properties"]["type"]["enum"]
    assert "pipeline" not in c["Metadata"]["properties"]["tasktype"]["enum"]
    assert "pipeline" not in json.dumps(c["TaskBody"]["anyOf"]) + json.dumps(c["TaskRequest"]["anyOf"])
    c = _document("comfyui")
    assert c["TaskRequest"]["properties"]["type"]["enum"] == ["pipeline"]
    assert c["Metadata"]["properties"]["tasktype"]["enum"] == ["pipeline"]
    c = _document("diffusers", "comfyui")
    assert len(c["TaskRequest"]["properties"]["type"]["enum"]) == 5
    assert "extra-batch-image" in c["Metadata"]["properties"]["tasktype"]["enum"]
    c = _document("my.pkg:Runtime")  # a runtime of one's own: it decides, every type is offered
    assert "pipeline" in c["TaskRequest"]["properties"]["type"]["enum"]
