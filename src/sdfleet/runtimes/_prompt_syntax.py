"""SD WebUI's prompt syntax, read without torch: emphasis, ``BREAK``, and 75-token chunks.

SD WebUI reads ``(words)`` as attention ×1.1, ``(words:1.3)`` as ×1.3, ``[words]`` as ÷1.1 (nested
brackets multiply; an unclosed one counts to the end), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` as the
characters themselves, and ``BREAK`` as the start of a new chunk. A prompt longer than one chunk
(75 tokens) is encoded chunk by chunk, each with its own start and end token, and the embeddings
are put end to end; a chunk that fills up within 20 tokens after a comma is cut after that comma.
diffusers alone cuts every prompt at 77 tokens and reads brackets as text.

What this module gives ``_diffusers_prompts``: the weighted pieces of a prompt (``weighted``) and
the chunks of token ids and weights (``chunk``), for a prompt as one step sees it (prompt editing
and alternation are read before, by ``_prompt_schedule``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdfleet.errors import Reject

CHUNK = 75
"""Prompt tokens in one chunk: CLIP's 77 less its start and end tokens."""
COMMA_BACKTRACK = 20
"""A full chunk is cut after its last comma when that comma is at most this many tokens back."""
UP, DOWN = 1.1, 1 / 1.1
_CLOSES = {")": ("(", UP), "]": ("[", DOWN)}

_PIECE = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: the character itself
    | \\                    # a lone backslash: nothing
    | [(\[]                 # opens
    | :\s*([+-]?[.\d]+)\s*\)  # closes a round bracket with its own weight
    | [)\]]                 # closes
    | [^\\()\[\]:]+         # text
    | :                     # a colon that is not a weight: text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_SYNTAX = re.compile(r"[()\[\]\\]|\bBREAK\b")


@dataclass
class Piece:
    """Text at one weight; ``brk`` marks a BREAK (no text)."""

    text: str
    weight: float
    brk: bool = False


EMPHASIS = ("Original", "No norm", "Ignore", "None")
"""SD WebUI's emphasis modes (``override_settings.emphasis``): weights and the chunk's mean put
back; weights alone; brackets read but their weights left out; brackets, escapes and ``BREAK`` as
the characters themselves."""


def emphasis_of(extra: dict[str, Any]) -> str:
    """A task's emphasis mode: ``override_settings.emphasis``, else SD WebUI's default "Original".
    ``Reject`` (``invalid_params``) for another name (SD WebUI would fall back to "Original")."""
    overrides = extra.get("override_settings")
    mode = overrides.get("emphasis", "Original") if isinstance(overrides, dict) else "Original"
    if mode not in EMPHASIS:
        raise Reject(
            f"override_settings.emphasis must be one of {', '.join(EMPHASIS)}, not {mode!r}",
            code="invalid_params",
        )
    return str(mode)


def emphasis_said(emphasis: str, texts: Sequence[str]) -> bool:
    """Whether SD WebUI's infotext names the emphasis mode: another than "Original", with a
    bracket in one of the prompts."""
    return emphasis != "Original" and any(c in text for text in texts for c in "([")


def plain(prompt: str, emphasis: str = "Original") -> bool:
    """True when SD WebUI reads ``prompt`` as diffusers does (no brackets, escapes or BREAK, or
    emphasis "None"): only its length can still differ."""
    return emphasis == "None" or _SYNTAX.search(prompt) is None


def pieces(prompt: str, emphasis: str = "Original") -> list[Piece]:
    """``prompt``'s pieces as the ``emphasis`` mode reads them (``weighted``, its weights 1 with
    "Ignore", the whole text with "None")."""
    if emphasis == "None":
        return [Piece(prompt, 1.0)]
    found = weighted(prompt)
    if emphasis == "Ignore":
        found = _merged([Piece(p.text, -1.0 if p.brk else 1.0, p.brk) for p in found])
    return found


def weighted(prompt: str) -> list[Piece]:
    """``prompt`` as text pieces and their weights, neighbours of equal weight merged, as SD WebUI
    1.10 reads it. ``Reject`` (``invalid_params``) for a weight that is not a number (``(a:1.2.3)``,
    on which SD WebUI fails with a server error). Tags (``<lora:name:0.8>``) read as text."""
    pieces: list[Piece] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each bracket still open began

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece.weight *= factor

    for m in _PIECE.finditer(prompt):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append(Piece(token[1:], 1.0))
        elif token in opened:
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _number(weight))
        elif token in _CLOSES and opened[_CLOSES[token][0]]:
            bracket, factor = _CLOSES[token]
            scale(opened[bracket].pop(), factor)
        else:  # text, and a closing bracket or weight with nothing open: text as well
            pieces += _text(token)
    for bracket, factor in _CLOSES.values():  # unclosed: to the end, round ones first
        for start in opened[bracket]:
            scale(start, factor)
    return _merged(pieces or [Piece("", 1.0)])


def _text(token: str) -> list[Piece]:
    pieces = []
    for i, part in enumerate(_BREAK.split(token)):
        if i:
            pieces.append(Piece("", -1.0, brk=True))
        pieces.append(Piece(part, 1.0))
    return pieces


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Neighbours of equal weight as one piece (BREAKs stay)."""
    merged: list[Piece] = []
    for piece in pieces:
        if merged and not piece.brk and not merged[-1].brk and merged[-1].weight == piece.weight:
            merged[-1].text += piece.text
        else:
            merged.append(piece)
    return merged


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Reject(
            f"prompt weight {text!r} is not a number (emphasis is written (words:1.2))",
            code="invalid_params",
        ) from None


@dataclass
class Chunk:
    """Up to ``CHUNK`` prompt tokens and their weights (no start, end or padding); ``slots``: where
    a textual inversion embedding's vectors go, as (offset, what ``Find`` named), its tokens 0."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    slots: list[tuple[int, Any]] = field(default_factory=list)


Find = Callable[[list[int], int], "tuple[Any, int, int] | None"]
"""An embedding whose name's tokens start at a position of a piece's tokens: (the embedding, its
vectors, its name's tokens), or None (SD WebUI's ``find_embedding_at_position``)."""


def chunk(
    pieces: Sequence[Piece],
    tokenize: Callable[[str], list[int]],
    comma: int | None,
    find: Find | None = None,
) -> list[Chunk]:
    """The chunks of a weighted prompt: a new one at every BREAK and when one is full (cut after
    a comma within ``COMMA_BACKTRACK`` tokens); at least one. An embedding ``find`` finds takes
    as many places as it has vectors, in one chunk (a new one when they would not fit)."""
    chunker = _Chunker(comma)
    for piece in pieces:
        if piece.brk:
            chunker.close()
            continue
        tokens = tokenize(piece.text) if piece.text else []
        position = 0
        while position < len(tokens):
            chunker.make_room(tokens[position])
            found = find(tokens, position) if find is not None else None
            if found is None:
                chunker.add([tokens[position]], piece.weight)
                position += 1
                continue
            embedding, vectors, name_tokens = found
            chunker.add([0] * vectors, piece.weight, embedding)
            position += name_tokens
    return chunker.finish()


class _Chunker:
    """SD WebUI's ``tokenize_line``: the chunk being filled, and those done."""

    def __init__(self, comma: int | None) -> None:
        self.comma = comma
        self.done: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        self.done.append(self.current)
        self.current, self.last_comma = Chunk(), -1

    def make_room(self, token: int) -> None:
        """Before ``token``: note a comma; a full chunk moves what follows its last comma (within
        ``COMMA_BACKTRACK``) to the next, or is closed."""
        current = self.current
        if token == self.comma:
            self.last_comma = len(current.ids)
        elif (
            len(current.ids) == CHUNK and self.last_comma != -1 and CHUNK - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved = Chunk(
                current.ids[cut:],
                current.weights[cut:],
                [(at - cut, e) for at, e in current.slots if at >= cut],
            )
            current.slots = [(at, e) for at, e in current.slots if at < cut]
            del current.ids[cut:], current.weights[cut:]
            self.close()
            self.current = moved
        if len(self.current.ids) == CHUNK:
            self.close()

    def add(self, ids: list[int], weight: float, embedding: Any = None) -> None:
        """Tokens at ``weight``; an ``embedding``'s places all in one chunk."""
        if embedding is not None:
            if len(self.current.ids) + len(ids) > CHUNK:
                self.close()
            self.current.slots.append((len(self.current.ids), embedding))
        self.current.ids += ids
        self.current.weights += [weight] * len(ids)

    def finish(self) -> list[Chunk]:
        if self.current.ids or not self.done:
            self.close()
        return self.done
