"""An attribute replaced for a block: how the diffusers runtime's parts change one pipeline call
(a stand-in UNet, a scheduler's ``add_noise``, a VAE's ``encode``) and leave the cached pipeline
as they found it, whatever the call raised. Torch-free."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def instead(obj: Any, name: str, replacement: Any) -> Iterator[None]:
    """``obj.name`` is ``replacement`` for the block, then what it was (its class's again where the
    object had none of its own). Set with ``setattr``, so an object that watches its attributes (a
    diffusers pipeline's registered modules and their config) sees both changes."""
    own = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)
