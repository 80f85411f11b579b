"""Outputs are stored under their real type: sniffed from their first bytes, as the seed's agent does."""

from __future__ import annotations

import re

import pytest

from fakes.runtimes import media_samples
from sdfleet.agent.parts import output_keys
from sdfleet.media import UNKNOWN, sniff
from sdfleet.tasks import Task


def test_sniffs_what_runtimes_make() -> None:
    assert [sniff(d) for d in media_samples()] == [
        ("png", "image/png"),
        ("gif", "image/gif"),
        ("webp", "image/webp"),
        ("mp4", "video/mp4"),
    ]
    assert sniff(b"\xff\xd8\xff\xe0rest") == ("jpg", "image/jpeg")
    assert sniff(b"\x1a\x45\xdf\xa3....") == ("webm", "video/webm")
    assert sniff(b'  {"a": 1}') == ("json", "application/json")
    assert sniff(b"") == UNKNOWN and sniff(b"hello") == UNKNOWN


@pytest.mark.parametrize(
    ("task", "prefix"),
    [
        (Task(id="t1", tenant="acme"), "acme/t1/t1"),
        (Task(id="t2", output_prefix="outputs"), "outputs/t2/t2"),
    ],
)
def test_output_keys_follow_the_seeds_layout(task: Task, prefix: str) -> None:
    keys, out = output_keys(task, media_samples())
    tag = re.fullmatch(rf"{prefix}-([0-9a-f]{{4}})-1\.png", keys[0])
    assert tag is not None, keys[0]
    t = tag.group(1)
    assert keys == [
        f"{prefix}-{t}-1.png",
        f"{prefix}-{t}-2.gif",
        f"{prefix}-{t}-3.webp",
        f"{prefix}-{t}-4.mp4",
    ]
    assert out == f"{prefix}-{t}.out"
    tags = {output_keys(task, [b""])[1] for _ in range(20)}
    assert len(tags) > 1  # a new tag per run, so a re-used id never overwrites earlier results
