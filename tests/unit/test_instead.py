"""``runtimes._instead.instead``: the one way the diffusers runtime's parts swap an attribute of a
cached pipeline (its UNet, its scheduler's ``add_noise``, its VAE's ``encode``) for one call."""

from __future__ import annotations

from typing import Any

import pytest

from sdfleet.runtimes._instead import instead


class Watched:
    """Records every attribute set, as a diffusers pipeline's ``__setattr__`` updates its config."""

    def step(self) -> str:
        return "class's"

    def __init__(self) -> None:
        self.set: list[tuple[str, Any]] = []
        self.unet = "unet"

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "set":
            self.set.append((name, value))
        super().__setattr__(name, value)


def test_an_own_attribute_comes_back_after_the_block_and_after_a_failing_one() -> None:
    obj = Watched()
    with instead(obj, "unet", "stand-in"):
        assert obj.unet == "stand-in"
    assert obj.unet == "unet"
    with pytest.raises(RuntimeError), instead(obj, "unet", "stand-in"):
        raise RuntimeError("the call failed")
    assert obj.unet == "unet"
    # set through the object each time (a pipeline's config follows its modules)
    assert obj.set == [("unet", "unet")] + [("unet", "stand-in"), ("unet", "unet")] * 2


def test_a_method_of_the_class_is_the_classs_again_not_a_copy_left_on_the_object() -> None:
    obj = Watched()
    with instead(obj, "step", lambda: "swapped"):
        assert obj.step() == "swapped"
    assert obj.step() == "class's"
    assert "step" not in vars(obj)
