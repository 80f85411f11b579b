"""SD WebUI's prompt editing and alternation, read without torch: the prompt each step sees.

``[from:to:when]`` is ``from`` until step ``when`` and ``to`` after it (``when`` with a decimal
point: that fraction of the steps), ``[to:when]`` adds ``to`` at ``when``, ``[from::when]``
removes ``from``; ``[a|b|c]`` takes ``a``, ``b``, ``c`` in turn, step by step. They nest, with each
other and with emphasis (kept as text here, read later by ``_prompt_syntax.weighted``).

``schedule`` gives SD WebUI 1.10's ``get_learned_conditioning_prompt_schedules`` for one prompt
(no hires pass): ``(end_at_step, text)`` pairs, and ``at`` the text of a denoising step the way
its denoiser picks it (a step counts each model evaluation from 0). A prompt this reader cannot
parse while SD WebUI's grammar might is ``Unread``: the runtime refuses it rather than read it
otherwise. Brackets nested deeper than ``NESTING_MAX`` are refused for every runtime that hands
prompts to SD WebUI's reader (``refuse_deep``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sdfleet.errors import Reject
from sdfleet.runtimes._diffusers_lora import text
from sdfleet.runtimes._diffusers_samplers import sampler_key, total_steps
from sdfleet.tasks import TaskParams

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_TEXT = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
"""SD WebUI's ``plain``: anything but brackets, colons and bars, a backslash escaping one character."""
_ESCAPED = re.compile(r"\\.", re.S)
NESTING_MAX = 100
"""Most brackets a prompt may nest. SD WebUI 1.10's reader (lark) slows with the cube of the depth
while it holds the server's queue lock, and fails past about 200 levels: on a 2-core CPU its
server answered 250 levels with 500 ``RecursionError`` after 4 s, 1,000 after 79 s. This reader
recurses once per level too."""
_STRAY = "[]():"
"""Characters SD WebUI's grammar takes as text between prompts, at the top level only. Its
Earley parser may then read the brackets around a stray bracket in more than one way: a prompt
with editing and a stray bracket is not read here (a stray colon is only text)."""


_AND = re.compile(r"\bAND\b")
"""SD WebUI's composable diffusion: ``a AND b`` denoises with both prompts, each with its weight."""
_WEIGHT_AT_END = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")
"""A prompt's own weight, ``a cat :1.5`` at its very end: SD WebUI multiplies its CFG scale by it."""


class Unread(Reject):
    """The prompt has editing syntax this reader does not parse as SD WebUI would
    (``unsupported_option``)."""

    def __init__(self, prompt: str) -> None:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        super().__init__(
            f"prompt editing or alternation it cannot read as SD WebUI's grammar would in {shown!r}"
            " (write a bracket, colon or bar that is text as \\[ \\] \\: \\|)",
            code="unsupported_option",
        )


def composable(prompt: str) -> bool:
    """Whether SD WebUI reads ``prompt`` as several prompts (``AND`` in capitals, as a word)."""
    return _AND.search(prompt) is not None


def own_weight(prompt: str) -> tuple[str, float]:
    """The prompt without its own weight (``:1.5`` at its end), and the weight (1 when none):
    SD WebUI denoises with ``uncond + weight × cfg_scale × (cond − uncond)``."""
    found = _WEIGHT_AT_END.search(prompt)
    if found is None:
        return prompt, 1.0
    return prompt[: found.start()], float(found.group(1))


@dataclass(frozen=True)
class Edits:
    """A prompt's and its negative prompt's schedules (``schedule``) over one task's steps."""

    prompt: list[tuple[int, str]]
    negative: list[tuple[int, str]]

    def at(self, step: int) -> tuple[str, str]:
        """The prompt and negative prompt denoising step ``step`` (from 0) sees."""
        return at(self.prompt, step), at(self.negative, step)

    @property
    def changes(self) -> bool:
        """Whether some step sees another prompt or negative prompt than the first."""
        return len({text for _, text in self.prompt}) > 1 or len({text for _, text in self.negative}) > 1


def of_task(prompt: str, negative: str, steps: int, first: int | None = None) -> tuple[Edits, float]:
    """A task's prompts (given without their extra-network tags) as SD WebUI reads them before
    encoding: the prompt's own weight taken off, then both scheduled over ``steps`` (``first``:
    for a second pass, as ``schedule``; ``Unread`` as there); and that weight (1 for a prompt of
    several, whose parts each have their own: ``parts``)."""
    prompt, weight = (prompt, 1.0) if composable(prompt) else own_weight(prompt)
    return Edits(schedule(prompt, steps, first), schedule(negative, steps, first)), weight


def parts(prompt: str, steps: int, first: int | None = None) -> list[tuple[list[tuple[int, str]], float]]:
    """SD WebUI's composable diffusion (``get_multicond_prompt_list``): the prompt (without its
    extra-network tags) cut at each ``AND``, each part scheduled over ``steps`` as a prompt is
    (``schedule``; ``first``: a second pass's) with its own weight (``own_weight``, 1 without)."""
    found = []
    for part in _AND.split(prompt):
        text, weight = own_weight(part)
        found.append((schedule(text.rstrip(), steps, first), weight))
    return found


def of_params(params: TaskParams) -> tuple[Edits, float]:
    """``of_task`` for a task's prompts as sent: their extra-network tags taken out, scheduled
    over the passes SD WebUI's sampler counts (``_diffusers_samplers.total_steps``)."""
    steps = total_steps(sampler_key(params.sampler, params.extra.get("scheduler")), params.steps)
    return of_task(text(params.prompt), text(params.negative_prompt), steps)


@dataclass
class _Scheduled:
    before: list[_Node] | None
    after: list[_Node]
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list[_Node]]


@dataclass
class _Group:
    """Emphasis, kept as written: its brackets and colons around what it holds."""

    parts: list[str | list[_Node]] = field(default_factory=list)


_Node = str | _Scheduled | _Alternate | _Group


def nesting(prompt: str) -> int:
    """How deep the prompt's brackets nest (escaped ones are text; an unclosed one nests to the end)."""
    depth = deepest = 0
    for char in _ESCAPED.sub("", prompt):
        if char in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]":
            depth = max(depth - 1, 0)
    return deepest


def refuse_deep(prompt: str) -> None:
    """``Reject`` (``invalid_params``) for brackets nested deeper than ``NESTING_MAX``."""
    depth = nesting(prompt)
    if depth > NESTING_MAX:
        raise Reject(
            f"the prompt's brackets nest {depth} deep: at most {NESTING_MAX} (SD WebUI's prompt "
            "reader fails past about 200, after seconds to minutes)",
            code="invalid_params",
        )


def schedule(prompt: str, steps: int, first: int | None = None) -> list[tuple[int, str]]:
    """``(end_at_step, text)`` pairs, by step; one pair for a prompt without editing. ``first``:
    the schedule of a hires fix's second pass, whose first pass had ``first`` steps (SD WebUI
    offsets its steps: ``[a:b:1.5]`` changes halfway through it, ``[a:b:0.5]`` before it starts,
    ``[a:b:12]`` at its step 12 - ``first``). ``Unread`` when the prompt has editing syntax that
    SD WebUI's grammar might read otherwise, ``Reject`` for one nested too deep (``refuse_deep``)."""
    if not _maybe_editing(prompt):
        return [(steps, prompt)]  # what SD WebUI's reader gives back for it, read or not
    refuse_deep(prompt)
    try:
        nodes, stray = _top(prompt)
    except _Fail:
        stray = True
    if stray:  # where SD WebUI's parser may find another reading, or fail
        if _maybe_editing(prompt):
            raise Unread(prompt)
        return [(steps, prompt)]  # nothing it could change during sampling
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            value = float(node.number)
            if not math.isfinite(value):  # SD WebUI's reader fails on it (OverflowError: a 500)
                number = node.number
                raise Reject(f"prompt editing at step {number!r}: not a finite number", code="invalid_params")
            offset = (0.0, 0) if first is None else (1.0, first)  # SD WebUI's flt_ and int_offset
            fraction = "." in node.number
            node.when = min(steps, int((value - offset[0]) * steps if fraction else value - offset[1]))
            if node.when >= 1:
                ends.add(node.when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(nodes, end)) for end in sorted(ends)]


def at(pairs: Sequence[tuple[int, str]], step: int) -> str:
    """The text denoising step ``step`` (from 0) sees: the first pair that ends at or after it,
    else the first pair (SD WebUI's rule, for samplers with more evaluations than steps)."""
    return next((text for end, text in pairs if step <= end), pairs[0][1])


def _maybe_editing(prompt: str) -> bool:
    """Whether ``prompt`` has an unescaped square bracket and a colon or bar."""
    bare = _ESCAPED.sub("", prompt)
    return "[" in bare and ("|" in bare or ":" in bare)


class _Fail(Exception):
    pass


def _top(s: str) -> tuple[list[_Node], bool]:
    """``start: (prompt | /[][():]/+)*``: prompts, and stray brackets or colons as text; and
    whether there were any."""
    nodes: list[_Node] = []
    i, stray = 0, False
    while i < len(s):
        part, i = _prompt(s, i)
        nodes += part
        if i < len(s):
            if s[i] not in _STRAY:
                raise _Fail  # a bar outside brackets, a lone backslash: SD WebUI's parser fails
            nodes.append(s[i])
            stray = stray or s[i] != ":"  # a colon outside brackets is only text
            i += 1
    return nodes, stray


def _prompt(s: str, i: int) -> tuple[list[_Node], int]:
    """Text, emphasis, editing and alternation up to the first character that none of them
    starts with (a closing bracket, a colon, a bar) or the end."""
    nodes: list[_Node] = []
    while i < len(s):
        text = _TEXT.match(s, i)
        if text:
            nodes.append(text.group(0))
            i = text.end()
        elif s[i] in "([":
            try:
                node, i = (_round if s[i] == "(" else _square)(s, i)
            except _Fail:
                return nodes, i  # not a construct: the caller takes the bracket as stray, or fails
            nodes.append(node)
        else:
            break
    return nodes, i


def _expect(s: str, i: int, char: str) -> int:
    if i >= len(s) or s[i] != char:
        raise _Fail
    return i + 1


def _round(s: str, i: int) -> tuple[_Group, int]:
    """``"(" prompt ")"`` or ``"(" prompt ":" prompt ")"``."""
    first, i = _prompt(s, i + 1)
    group = _Group(["(", first])
    if i < len(s) and s[i] == ":":
        second, i = _prompt(s, i + 1)
        group.parts += [":", second]
    i = _expect(s, i, ")")
    group.parts.append(")")
    return group, i


def _square(s: str, i: int) -> tuple[_Node, int]:
    """``"[" prompt "]"``, ``"[" [prompt ":"] prompt ":" NUMBER "]"`` or ``"[" prompt ("|" prompt)+ "]"``."""
    first, i = _prompt(s, i + 1)
    if i < len(s) and s[i] == "]":
        return _Group(["[", first, "]"]), i + 1
    if i < len(s) and s[i] == "|":
        options = [first]
        while i < len(s) and s[i] == "|":
            option, i = _prompt(s, i + 1)
            options.append(option)
        return _Alternate(options), _expect(s, i, "]")
    i = _expect(s, i, ":")
    number = _NUMBER.match(s, i)
    if number and s.startswith("]", number.end()):  # [to:when]
        return _Scheduled(None, first, number.group(1)), number.end() + 1
    second, i = _prompt(s, i)
    i = _expect(s, i, ":")
    number = _NUMBER.match(s, i)
    if not number or not s.startswith("]", number.end()):
        raise _Fail
    return _Scheduled(first, second, number.group(1)), number.end() + 1


def _walk(nodes: list[_Node]) -> list[_Node]:
    found: list[_Node] = []
    for node in nodes:
        found.append(node)
        if isinstance(node, _Scheduled):
            found += _walk(node.before or []) + _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                found += _walk(option)
        elif isinstance(node, _Group):
            for part in node.parts:
                if isinstance(part, list):
                    found += _walk(part)
    return found


def _render(nodes: list[_Node], step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_render(node.before or [], step) if step <= node.when else _render(node.after, step))
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
        else:
            out += [part if isinstance(part, str) else _render(part, step) for part in node.parts]
    return "".join(out)
