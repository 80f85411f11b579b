"""Prompt validation and node order of the ComfyUI test server, after ComfyUI's ``execution.py``.

``validate_prompt`` answers like ComfyUI 0.3.64's: ``(ok, error, good_outputs, node_errors)``. A
node missing ``class_type`` or of an unknown class fails the whole prompt; no output node fails it
(``prompt_no_outputs``); each output node is validated with everything upstream of it, and the
prompt is accepted when at least one output is valid: the invalid ones are reported in
``node_errors`` (keyed by the node that has the error, with ``class_type`` and
``dependent_outputs``) and left out of the run. Nodes downstream of an invalid node are invalid
without errors of their own, as ComfyUI reports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OUTPUT_NODES = {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "VHS_VideoCombine"}
KNOWN_NODES = OUTPUT_NODES | {
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "VAEEncode",
    "LoadImage",
    "RaiseError",  # this server's own: fails when it executes (exception_message, exception_type)
}
REQUIRED = {
    "SaveImage": ["images"],
    "PreviewImage": ["images"],
    "SaveAnimatedWEBP": ["images"],
    "VHS_VideoCombine": ["images"],
    "LoadImage": ["image"],
}

Reason = dict[str, Any]


def _error(kind: str, message: str, details: str) -> Reason:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def links(node: dict[str, Any]) -> list[str]:
    """Ids of the nodes this node takes inputs from (``[node_id, slot]`` values)."""
    inputs = node.get("inputs") or {}
    return [str(v[0]) for v in inputs.values() if isinstance(v, list) and len(v) == 2]


class Validator:
    """One prompt's validation; ``has_input(name)`` says whether ``input/name`` exists."""

    def __init__(
        self, prompt: dict[str, Any], has_input: Callable[[str], bool], checkpoints: set[str] | None
    ) -> None:
        self.prompt = prompt
        self.has_input = has_input
        self.checkpoints = checkpoints
        self.validated: dict[str, tuple[bool, list[Reason]]] = {}

    def node(self, node_id: str) -> bool:
        if node_id in self.validated:
            return self.validated[node_id][0]
        node = self.prompt[node_id]
        reasons = self._reasons(node)
        valid = not reasons
        for upstream in links(node):
            if upstream not in self.prompt:
                reasons.append(_error("bad_linked_input", "Bad linked input", upstream))
                valid = False
            elif not self.node(upstream):
                valid = False
        self.validated[node_id] = (valid, reasons)
        return valid

    def _reasons(self, node: dict[str, Any]) -> list[Reason]:
        kind, inputs = node["class_type"], node.get("inputs") or {}
        missing = [x for x in REQUIRED.get(kind, []) if x not in inputs]
        reasons = [_error("required_input_missing", "Required input is missing", x) for x in missing]
        image = inputs.get("image")
        if kind == "LoadImage" and image is not None and not self.has_input(str(image)):
            details = f"image - Invalid image file: {image}"
            reasons.append(_error("custom_validation_failed", "Custom validation failed for node", details))
        ckpt = inputs.get("ckpt_name")
        if kind == "CheckpointLoaderSimple" and self.checkpoints is not None and ckpt not in self.checkpoints:
            details = f"ckpt_name: '{ckpt}' not in {sorted(self.checkpoints)}"
            reasons.append(_error("value_not_in_list", "Value not in list", details))
        return reasons


def validate_prompt(
    prompt: dict[str, Any], has_input: Callable[[str], bool], checkpoints: set[str] | None = None
) -> tuple[bool, Reason | None, list[str], dict[str, Any]]:
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
        if node["class_type"] not in KNOWN_NODES:
            message = f"Cannot execute because node {node['class_type']} does not exist."
            return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
    outputs = [x for x, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    check = Validator(prompt, has_input, checkpoints)
    good: list[str] = []
    node_errors: dict[str, Any] = {}
    details: list[str] = []
    for out in outputs:
        if check.node(out):
            good.append(out)
            continue
        for node_id, (valid, reasons) in check.validated.items():
            if valid or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {"errors": reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(out)
            details += [f"{r['message']}: {r['details']}" for r in reasons]
    if not good:
        message = "Prompt outputs failed validation"
        return False, _error("prompt_outputs_failed_validation", message, "\n".join(details)), [], node_errors
    return True, None, good, node_errors


def execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    """Every node the ``outputs`` need, each after the nodes it takes inputs from."""
    order: list[str] = []

    def visit(node_id: str) -> None:
        if node_id in order:
            return
        for upstream in links(prompt[node_id]):
            visit(upstream)
        order.append(node_id)

    for out in outputs:
        visit(out)
    return order


def upstream_of(prompt: dict[str, Any], node_id: str, kind: str) -> dict[str, Any] | None:
    """The inputs of the nearest node of class ``kind`` upstream of ``node_id`` (itself included)."""
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        current = todo.pop(0)
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        if prompt[current].get("class_type") == kind:
            inputs: dict[str, Any] = prompt[current].get("inputs") or {}
            return inputs
        todo += links(prompt[current])
    return None
