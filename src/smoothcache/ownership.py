"""One smoothcache user per model at a time: a cache handle or a calibration recorder.

Two handles on one model would each shadow the same forwards, and a handle disabled out of order
would leave the other's forwards behind; a calibration of a cached model would measure the
cache's reused outputs (zero error). So a handle or recorder claims the model's denoisers while
it is attached, and a second one is refused with what to do. :func:`disable` ends whichever one
holds a model, for the handle that was lost (a notebook cell run twice).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ModelInUseError
from .steps import Experts, resolve_target

__all__ = ["Claim", "claim", "disable", "holder", "release"]


@dataclass(frozen=True)
class Claim:
    """Who holds a model: the handle or recorder, what it is doing, and how to end it."""

    owner: Any
    doing: str  # "cached by a smoothcache handle (keys attn1, ff)", "being calibrated"
    end: Callable[[], None]
    how_to_end: str  # said in the error of a second claim


_claims: weakref.WeakKeyDictionary[nn.Module, Claim] = weakref.WeakKeyDictionary()


def _denoisers(model: nn.Module) -> list[nn.Module]:
    return list(model.children()) if isinstance(model, Experts) else [model]


def claim(model: nn.Module, new: Claim) -> None:
    """Mark ``model`` as held by ``new.owner``; raise :class:`ModelInUseError` if another holds it."""
    for denoiser in _denoisers(model):
        held = _claims.get(denoiser)
        if held is not None and held.owner is not new.owner:
            raise ModelInUseError(
                f"{type(denoiser).__name__} is already {held.doing}, so it cannot also be {new.doing}. "
                f"{held.how_to_end}; or call smoothcache.disable(pipe) if you no longer hold it "
                "(e.g. a notebook cell run twice)"
            )
    for denoiser in _denoisers(model):
        _claims[denoiser] = new


def holder(model: nn.Module) -> Any | None:
    """Whoever holds ``model`` now (a cache handle, a recorder), or None."""
    held = _claims.get(model)
    return None if held is None else held.owner


def release(model: nn.Module, owner: Any) -> None:
    for denoiser in _denoisers(model):
        if (held := _claims.get(denoiser)) is not None and held.owner is owner:
            del _claims[denoiser]


def disable(pipe_or_module: Any) -> bool:
    """End whatever smoothcache handle or calibration holds this pipeline's (or module's) model:
    the model is left as before it. Returns whether anything held it. A calibration ended so
    records nothing."""
    model = resolve_target(pipe_or_module).model
    ended = False
    for denoiser in _denoisers(model):
        held = _claims.get(denoiser)
        if held is not None:
            held.end()
            release(denoiser, held.owner)
            ended = True
    return ended
