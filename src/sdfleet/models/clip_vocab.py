"""CLIP tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) written offline.

CLIP's vocabulary is every byte, every byte as a word end, then one token per merge, then the two
special tokens, in that order (openai/CLIP ``simple_tokenizer.py``). With the real merges (shipped
in ``data/``) that is the 49,408-token vocabulary of every SD 1.x, 2.x and SDXL text encoder; with
the tiny test models' six merges it is their 520-token one.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"
TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>"))
TINY_VOCAB_SIZE = 2 * 256 + len(TINY_MERGES) + 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable character table (every byte gets a one-character token)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def clip_merges() -> list[tuple[str, str]]:
    """The 48,894 merges of CLIP's vocabulary."""
    data = resources.files("sdfleet.models").joinpath("data/clip_bpe_merges.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    return [(a, b) for a, b in (line.split(" ") for line in lines if line)]


def merges_for(vocab_size: int) -> tuple[tuple[str, str], ...]:
    """The merges of a CLIP vocabulary of ``vocab_size`` tokens; ``ValueError`` for another size."""
    if vocab_size == CLIP_VOCAB_SIZE:
        return tuple(clip_merges())
    if vocab_size == TINY_VOCAB_SIZE:
        return TINY_MERGES
    raise ValueError(
        f"no CLIP vocabulary of {vocab_size} tokens (known: {CLIP_VOCAB_SIZE}, and {TINY_VOCAB_SIZE} "
        "of the tiny test models)"
    )


def write_vocab(dest: Path, merges: tuple[tuple[str, str], ...] = TINY_MERGES) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of the CLIP vocabulary made of ``merges``."""
    dest.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), START, END]
    vocab_file, merges_file = dest / "vocab.json", dest / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def write_tokenizer(dest: Path, vocab_size: int, pad_token: str, max_length: int = 77) -> None:
    """A ``CLIPTokenizer`` folder for a text encoder of ``vocab_size`` tokens."""
    write_vocab(dest, merges_for(vocab_size))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
