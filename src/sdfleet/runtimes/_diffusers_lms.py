"""SD WebUI's LMS from a schedule's middle (image-to-image, a hires fix's second pass). Imports
diffusers.

k-diffusion's ``sample_lms`` (SD WebUI's LMS) raises its order with the steps it has taken, one
more a step up to 4, whatever sigma it starts at. diffusers' ``LMSDiscreteScheduler.step`` takes
``min(step_index + 1, 4)`` with ``step_index`` counted from the schedule's start: an
image-to-image call that begins at step 5 weights its one derivative with a fourth-order
coefficient. On SD WebUI's own checkpoint that kept a hires pass's images 2.0 of 255 from SD
WebUI's (the issue note). ``LMSFromItsStart`` counts the steps from the call's first
(``begin_index``); from step 0 it is diffusers' own.
"""

from __future__ import annotations

from typing import Any

from diffusers import LMSDiscreteScheduler


class LMSFromItsStart(LMSDiscreteScheduler):  # type: ignore[misc]
    """diffusers' LMS, its order counted from the call's first step."""

    def step(
        self, model_output: Any, timestep: Any, sample: Any, order: int = 4, return_dict: bool = True
    ) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        order = min(order, self.step_index - (self.begin_index or 0) + 1)
        return super().step(model_output, timestep, sample, order=order, return_dict=return_dict)
