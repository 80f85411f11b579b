"""Inpainting with SD WebUI's timestep samplers (``_diffusers_blend``): before each evaluation the
model is given the input's un-noised latents where the mask keeps the image, as SD WebUI's
``CFGDenoiserTimesteps`` (``mask_before_denoising``) gives them; its k-diffusion samplers keep
diffusers' (the kept latents on their noised path, which is SD WebUI's for them)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_inpainting_batched import batching, noise, square

from fakes.tiny import no_progress
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

pytestmark = pytest.mark.timeout(600)
BOXES = [(16, 16, 48, 48), (0, 0, 32, 64)]
"""Two masks (64² images): a square in the middle, the left half."""


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return batching(tmp_path_factory.mktemp("models"))


def masked(task_id: str, seed: int, box: tuple[int, int, int, int], sampler: str) -> Job:
    """A 64² image-to-image task of 8 ``sampler`` steps at 0.75, repainting ``box``."""
    p = TaskParams.model_validate(
        {
            "prompt": f"a cat {task_id}",
            "sampler": sampler,
            "steps": 8,
            "width": 64,
            "height": 64,
            "seed": seed,
            "denoising_strength": 0.75,
            "extra": {"mask": "m"},
        }
    )
    return Job(
        task_id, TaskType.IMAGE_TO_IMAGE, "tiny-a", p, init_images=[noise(seed)], mask=square(box, (64, 64))
    )


@pytest.fixture
def inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The model's input at each evaluation."""
    given: list[torch.Tensor] = []
    forward = UNet2DConditionModel.forward

    def spy(self: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        given.append(sample.detach().clone())
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return given


def regions(sample: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[slice, ...]:
    """A latent corner the mask ``box`` keeps, and the latent middle of what it repaints."""
    scale = 64 // sample.shape[-1]
    left, top, right, bottom = (v // scale for v in box)
    kept = (
        (slice(None), slice(0, 2), slice(-2, None)) if left == 0 else (slice(None), slice(0, 2), slice(0, 2))
    )
    middle = (slice(None), slice((top + bottom) // 2 - 1, (top + bottom) // 2 + 1))
    middle += (slice((left + right) // 2 - 1, (left + right) // 2 + 1),)
    return kept, middle


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
async def test_the_kept_latents_reach_the_model_un_noised(
    runtime: DiffusersRuntime, inputs: list[torch.Tensor], sampler: str
) -> None:
    """Batched, each task's rows of the model's input: where its mask keeps the image the same
    at every evaluation (its input's latents, not noised), where it repaints changing."""
    jobs = [masked(f"t{n}", 10 + n, box, sampler=sampler) for n, box in enumerate(BOXES)]
    made = await runtime.run_batch(jobs, [no_progress] * len(jobs))
    assert all(isinstance(m, RuntimeResult) and m.info["batch_tasks"] == 2 for m in made)
    assert all(m.info["sampler_name"] == sampler for m in made if isinstance(m, RuntimeResult))
    assert len(inputs) >= 3 and all(sample.shape[0] == 4 for sample in inputs)  # CFG: 2 rows a task
    for row, box in enumerate(BOXES):
        kept, middle = regions(inputs[0], box)
        for rows in (row, row + 2):  # the negative prompt's row and the prompt's
            first = inputs[0][rows]
            for later in inputs[1:]:
                assert torch.equal(later[rows][kept], first[kept]), (sampler, row)
            assert not torch.equal(inputs[-1][rows][middle], first[middle]), (sampler, row)


async def test_k_diffusion_samplers_keep_diffusers_noised_path(
    runtime: DiffusersRuntime, inputs: list[torch.Tensor]
) -> None:
    """Euler's kept latents reach the model noised to each step's level (SD WebUI blends its
    denoised output, which keeps them there), so they change from one evaluation to the next."""
    made = await runtime.run(masked("e", 3, BOXES[0], "Euler"), no_progress)
    assert made.info["sampler_name"] == "Euler"
    kept, _ = regions(inputs[0], BOXES[0])
    assert not torch.equal(inputs[-1][0][kept], inputs[0][0][kept])
