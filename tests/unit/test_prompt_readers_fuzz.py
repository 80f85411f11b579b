"""What the API asks of a diffusers or a1111 queue (``unsupported.refuse``) and the readers behind
it (emphasis, chunks, LoRA tags, prompt schedules, hires fix, variation seeds, inpainting) answer any prompt
and any JSON a message may hold with ``Reject`` or not at all: anything else is a 500 at the API
and an internal error in the agent. A random search found a deep-bracket ``RecursionError``, a
``scheduler`` that is no string (``AttributeError``) and editing at ``1e999`` (``OverflowError``);
this keeps the search going, bounded and derandomized."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdfleet import hires, inpaint, variation
from sdfleet.errors import Reject
from sdfleet.runtimes import _diffusers_lora as L
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes import _prompt_syntax as S
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType

ATOMS = [
    *"ab ()[]:|\\,.-+0123456789eE<>=\n",
    "cat",
    "BREAK",
    "AND",
    "1.5",
    "1e999",
    "nan",
    "inf",
    "<lora:x:",
    "<lyco:y:0.5>",
    "<lora:z:te=1:unet=nan>",
    ":1e308",
    "\u200b",
    "\x00",
    "[a:b:-1e999]",
    "[a|",
    "|]",
]
FIELDS = [
    "enable_hr",
    "hr_scale",
    "hr_resize_x",
    "hr_second_pass_steps",
    "hr_upscaler",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "subseed",
    "subseed_strength",
    "seed_resize_from_w",
    "seed_resize_from_h",
    "n_iter",
    "scheduler",
    "tiling",
    "s_noise",
    "eta",
    "override_settings",
    "emphasis",
    "resize_mode",
    "disable_extra_networks",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "mask_round",
    "latent_mask",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(ATOMS),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["emphasis", "a"]), inner, max_size=2)
    ),
    max_leaves=6,
)
PROMPTS = st.lists(st.sampled_from(ATOMS), max_size=30).map("".join)


def answers(call: Callable[[], Any]) -> None:
    try:
        call()
    except Reject:
        pass


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=PROMPTS,
    negative=PROMPTS,
    steps=st.integers(1, 150),
    sampler=st.sampled_from([None, "Euler", "Euler a", "DPM++ 2M", "x"]),
    extra=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
    kind=st.sampled_from([TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE]),
)
def test_the_prompt_readers_answer_anything_with_reject_or_not_at_all(
    prompt: str, negative: str, steps: int, sampler: str | None, extra: dict[str, Any], kind: TaskType
) -> None:
    params = TaskParams(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler, extra=extra)
    answers(lambda: refuse("diffusers", kind, params))
    answers(lambda: refuse("a1111", kind, params))
    for mode in S.EMPHASIS:
        answers(
            lambda mode=mode: S.chunk(S.pieces(prompt, mode), lambda t: [ord(c) for c in t], ord(","), None)
        )
    answers(lambda: L.parse(prompt, lenient=True))
    answers(lambda: PS.of_task(L.text(prompt), L.text(negative), steps))
    answers(lambda: hires.plan(kind, params))
    answers(lambda: variation.read(params))
    answers(lambda: inpaint.read(kind, params))
