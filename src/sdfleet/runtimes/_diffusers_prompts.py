"""Prompt embeddings as SD WebUI makes them, for prompts diffusers would read otherwise. Imports torch.

A prompt with emphasis, escapes or ``BREAK``, or longer than 75 tokens (``_prompt_syntax``), is
encoded here chunk by chunk with the pipeline's own text encoders, in the same way diffusers'
``encode_prompt`` encodes one chunk (hidden states, clip skip, SDXL's pooled output from the first
chunk); each token's embedding is scaled by its weight and the chunk's mean put back (SD WebUI's
"Original" emphasis). The pipeline then gets ``prompt_embeds`` instead of text. Every other prompt
still goes to the pipeline as text: the embeddings of a plain prompt of ≤ 75 tokens are the ones
the pipeline makes itself (a test holds the images equal), so such a prompt can share a call
with the others.

The prompt and its negative prompt are made the same length by adding chunks of the empty
prompt (SD WebUI's "pad prompt/negative prompt" option; SD WebUI by default runs the two apart
instead, which diffusers cannot). As diffusers does, clip skip applies to the prompt only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes._textual_inversion import SHORT, Embedding, Embeddings, placed

_WIDTH = S.CHUNK + 2  # a chunk's tokens with its start and end tokens


@dataclass(frozen=True)
class Reading:
    """How a job's prompts are read: SD WebUI's emphasis mode, and the textual inversion
    embeddings their words may name (``_textual_inversion``)."""

    emphasis: str = "Original"
    embeddings: Embeddings | None = None
    _found: dict[int, list[S.Find | None]] = field(default_factory=dict, compare=False, repr=False)

    def finders(self, pipe: Any) -> list[S.Find | None]:
        """Each text encoder's embedding finder (``_prompt_syntax.chunk``'s ``find``), made once
        per pipeline for this reading (a job's: its prompts are counted, then encoded)."""
        pairs = _encoders(pipe)
        if self.embeddings is None:
            return [None] * len(pairs)
        if id(pipe) not in self._found:
            encoders = text_encoders(pipe)
            self._found[id(pipe)] = [
                self.embeddings.finder(encoders, i, partial(_ids, tokenizer))
                for i, (tokenizer, _) in enumerate(pairs)
            ]
        return self._found[id(pipe)]


_PLAIN = Reading()


@dataclass
class Embeds:
    """One prompt's and its negative prompt's embeddings, ``chunks`` × 77 tokens each.
    ``negative`` None: SDXL's zeros for no negative prompt (``force_zeros_for_empty_prompt``)."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return int(self.prompt.shape[1]) // _WIDTH


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))]
    pairs.append((getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)))
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def text_encoders(pipe: Any) -> list[Any]:
    """The pipeline's text encoders, in order (SDXL: two)."""
    return [encoder for _, encoder in _encoders(pipe)]


def xl(pipe: Any) -> bool:
    """Whether ``pipe`` is SDXL's (two text encoders, pooled embeddings)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def _ids(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return ids


def _comma(tokenizer: Any) -> int | None:
    """The id of the comma token (``,</w>``), where chunks may be cut; None if the vocabulary has
    none. By lookup: ``get_vocab()`` copies the whole vocabulary (about 20 ms for CLIP's)."""
    found = tokenizer.convert_tokens_to_ids(",</w>")
    return None if found is None or found == tokenizer.unk_token_id else int(found)


def chunk_count(pipe: Any, prompt: str, negative: str, reading: Reading = _PLAIN) -> tuple[int, bool]:
    """How many chunks the job's embeddings have, and whether the pipeline reads its text as SD
    WebUI does (plain prompts of at most one chunk that name no embedding: then it is given the
    text)."""
    tokenizer = _encoders(pipe)[0][0]
    find = reading.finders(pipe)[0]
    plain = S.plain(prompt, reading.emphasis) and S.plain(negative, reading.emphasis)
    if plain and find is None:
        longest = max(len(_ids(tokenizer, prompt)), len(_ids(tokenizer, negative)))
        if longest <= S.CHUNK:
            return 1, True
    comma = _comma(tokenizer)
    chunks = [
        S.chunk(S.pieces(text, reading.emphasis), partial(_ids, tokenizer), comma, find)
        for text in (prompt, negative)
    ]
    named = any(c.slots for each in chunks for c in each)
    count = max(len(each) for each in chunks)
    return count, plain and count == 1 and not named


def conditioning_said(pipe: Any, edits: PS.Edits, reading: Reading = _PLAIN) -> dict[str, str]:
    """The infotext words SD WebUI's text-encoder calls write, in the order they first write
    them (its ``model_hijack.extra_generation_params``): one call per text encoder for the
    negative prompt's texts (every text of its schedule), then for the prompt's. ``TI hashes``:
    each call's embeddings (by name, ``:`` and ``,`` taken out, with ``SHORT`` hex digits of their
    file's hash), put in front of what the calls before said; ``Emphasis``: a mode other than
    Original, with a bracket in that call's texts."""
    said: dict[str, str] = {}
    finders = reading.finders(pipe)
    for schedule in (edits.negative, edits.prompt):
        texts = list(dict.fromkeys(text for _, text in schedule))
        for (tokenizer, _), find in zip(_encoders(pipe), finders, strict=True):
            used = _embeddings_in(texts, tokenizer, find, reading.emphasis) if find is not None else []
            hashes = [f"{e.name.replace(':', '').replace(',', '')}: {e.hash[:SHORT]}" for e in used if e.hash]
            if hashes:
                said["TI hashes"] = ", ".join([*hashes, *filter(None, [said.get("TI hashes")])])
            if S.emphasis_said(reading.emphasis, texts):
                said.setdefault("Emphasis", reading.emphasis)
    return said


def _embeddings_in(texts: list[str], tokenizer: Any, find: S.Find, emphasis: str) -> list[Embedding]:
    """The embeddings ``find`` finds in ``texts``, each once, in the order they come."""
    found: dict[str, Embedding] = {}
    for text in texts:
        for c in S.chunk(S.pieces(text, emphasis), partial(_ids, tokenizer), _comma(tokenizer), find):
            for _, slot in c.slots:
                found.setdefault(slot.embedding.name, slot.embedding)
    return list(found.values())


def encode(
    pipe: Any, prompt: str, negative: str | None, clip_skip: int | None, reading: Reading = _PLAIN
) -> Embeds:
    """The embeddings of one job (``negative`` None: it has none), padded to equal length.
    ``clip_skip`` is diffusers' (0 = the last layer), as the pipeline's argument."""
    pos, pooled = encode_text(pipe, prompt, clip_skip, reading)
    if negative is None and xl(pipe) and pipe.config.force_zeros_for_empty_prompt:
        return Embeds(pos, None, pooled, None)  # the pipeline makes them zeros, of pos's length
    # with clip skip, as SD WebUI reads both (diffusers' own encoding reads the negative prompt
    # without it: a job with clip skip is never handed to the pipeline as text, _calls)
    neg, neg_pooled = encode_text(pipe, negative or "", clip_skip, reading)
    chunks = max(pos.shape[1], neg.shape[1]) // _WIDTH
    return Embeds(_pad(pipe, pos, chunks), _pad(pipe, neg, chunks), pooled, neg_pooled)


def encode_text(
    pipe: Any, text: str, clip_skip: int | None, reading: Reading
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text's embeddings (its chunks side by side), and SDXL's pooled ones (else None)."""
    pieces = S.pieces(text, reading.emphasis)
    norm = reading.emphasis != "No norm"
    per_encoder: list[torch.Tensor] = []
    pooled = None
    for (tokenizer, encoder), find in zip(_encoders(pipe), reading.finders(pipe), strict=True):
        chunks = S.chunk(pieces, partial(_ids, tokenizer), _comma(tokenizer), find)
        zs = []
        for i, c in enumerate(chunks):
            z, pool = _encode_chunk(pipe, tokenizer, encoder, c, clip_skip, norm)
            if i == 0 and pool is not None and pooled is None:
                pooled = pool  # SDXL's pooled output: the first chunk's, as SD WebUI takes it
            zs.append(z)
        per_encoder.append(torch.cat(zs, dim=1))
    longest = max(z.shape[1] for z in per_encoder) // _WIDTH
    per_encoder = [_pad_with(z, partial(_empty, pipe, i), longest) for i, z in enumerate(per_encoder)]
    return torch.cat(per_encoder, dim=-1), pooled


def _encode_chunk(
    pipe: Any, tokenizer: Any, encoder: Any, c: S.Chunk, clip_skip: int | None, norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk through one text encoder, as diffusers' ``encode_prompt`` does one prompt, its
    tokens scaled by their weights (and, with ``norm``, the chunk's mean put back)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    filler = S.CHUNK - len(c.ids)
    ids = torch.tensor([[tokenizer.bos_token_id, *c.ids, tokenizer.eos_token_id, *[pad] * filler]])
    device = encoder.device
    ids = ids.to(device)
    with placed(encoder, c.slots):
        z, pooled = _hidden(pipe, encoder, ids, c, filler, clip_skip)
    weights = [1.0, *c.weights, *[1.0] * (filler + 1)]
    if any(w != 1.0 for w in weights):
        mean = z.mean()
        z = z * torch.tensor(weights, device=z.device, dtype=z.dtype).reshape(1, -1, 1)
        if norm:
            z = z * (mean / z.mean())
    return z, pooled


def _hidden(
    pipe: Any, encoder: Any, ids: torch.Tensor, c: S.Chunk, filler: int, clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's hidden states for a chunk's ids (and SDXL's pooled output)."""
    device = ids.device
    pooled = None
    if xl(pipe):
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        z = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
    else:
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = torch.tensor([[1] * (len(c.ids) + 2) + [0] * filler], device=device)
        if clip_skip is None:
            z = encoder(ids, attention_mask=mask)[0]
        else:
            out = encoder(ids, attention_mask=mask, output_hidden_states=True)
            z = encoder.text_model.final_layer_norm(out[-1][-(clip_skip + 1)])
    return z, pooled


def _empty(pipe: Any, index: int) -> torch.Tensor:
    """The empty prompt's chunk from the ``index``-th text encoder (padding)."""
    tokenizer, encoder = _encoders(pipe)[index]
    z, _ = _encode_chunk(pipe, tokenizer, encoder, S.Chunk(), None)
    return z


def _pad(pipe: Any, z: torch.Tensor, chunks: int) -> torch.Tensor:
    def empty() -> torch.Tensor:  # every encoder's, side by side, as ``z`` is
        return torch.cat([_empty(pipe, i) for i in range(len(_encoders(pipe)))], dim=-1)

    return _pad_with(z, empty, chunks)


def _pad_with(z: torch.Tensor, empty: Callable[[], torch.Tensor], chunks: int) -> torch.Tensor:
    """``z`` made ``chunks`` long with empty-prompt chunks, encoded only when some are missing."""
    missing = chunks - z.shape[1] // _WIDTH
    return torch.cat([z, *[empty()] * missing], dim=1) if missing > 0 else z


def call_embeds(pipe: Any, embeds: list[Embeds], repeats: list[int]) -> dict[str, Any]:
    """The pipeline's embedding arguments for jobs of equal length (``repeats``: images of each)."""
    dtype = (pipe.text_encoder_2 if xl(pipe) else pipe.text_encoder).dtype

    def rows(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if any(t is None for t in tensors):
            return None
        each = [t.repeat_interleave(n, dim=0) for t, n in zip(tensors, repeats, strict=True) if t is not None]
        return torch.cat(each).to(dtype)

    kwargs: dict[str, Any] = {
        "prompt_embeds": rows([e.prompt for e in embeds]),
        "negative_prompt_embeds": rows([e.negative for e in embeds]),
    }
    if xl(pipe):
        kwargs["pooled_prompt_embeds"] = rows([e.pooled for e in embeds])
        kwargs["negative_pooled_prompt_embeds"] = rows([e.negative_pooled for e in embeds])
    return kwargs
