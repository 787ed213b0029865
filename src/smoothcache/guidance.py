"""Classifier-free guidance batches: which half of a model call's batch is which branch, and how
to run a layer on one half (keys that address one branch, ``"attn1@uncond"``: :mod:`.keys`).

Most diffusers pipelines run guidance as one model call on ``2B`` rows: the two branches stacked
along dim 0, both fed the same latents. The order differs by pipeline: ``DiTPipeline`` (and the
demo pipeline) put the conditional half first (class labels, then the null class); PixArt, SD3,
Sana and most text-to-image/video pipelines put the negative prompt first.

A calibration with ``branches=`` records each half's errors under branch keys next to the
whole-batch ones; a schedule with branch keys gives each half its own plan (:mod:`.cache.plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .adapters import guidance_first_half
from .errors import GuidanceError
from .keys import BRANCHES

__all__ = ["branch_order", "check_cfg_batch", "check_layer_rows", "first_tensor", "input_shape", "splice_half", "take_half"]

def branch_order(pipeline: Any | None, branches: Sequence[str] | str) -> tuple[str, str]:
    """The branches in batch order: ``("cond", "uncond")`` or ``("uncond", "cond")``.

    ``branches="auto"`` reads it off the pipeline class (known pipelines only).
    """
    if isinstance(branches, str):
        if branches != "auto":
            raise GuidanceError(f"branches must be 'auto' or the branches in batch order, e.g. ('cond', 'uncond'); got {branches!r}")
        name = type(pipeline).__name__ if pipeline is not None else None
        first = guidance_first_half(name) if name is not None else None  # the family table, verified in diffusers 0.42.1
        if first == "cond":
            return ("cond", "uncond")
        if first == "uncond":
            return ("uncond", "cond")
        what = f"the pipeline class {name}" if name else "a bare module"
        raise GuidanceError(
            f"Cannot tell the order of the guidance batch for {what}; pass branches=('cond', 'uncond') if its "
            "model call stacks the conditional half first, or branches=('uncond', 'cond') if the unconditional "
            "(negative prompt) half comes first"
        )
    order = tuple(branches)
    if sorted(order) != sorted(BRANCHES):
        raise GuidanceError(f"branches must name 'cond' and 'uncond' once each, in batch order; got {order!r}")
    return order  # type: ignore[return-value]


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A call's first tensor argument (positional first): the model's latents, a layer's input."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of a call's first tensor argument: its batch and token layout."""
    first = first_tensor(args, kwargs)
    return None if first is None else tuple(first.shape)


def check_cfg_batch(args: tuple[Any, ...], kwargs: dict[str, Any], *, compare: bool = True) -> int:
    """The batch rows of a model call that batches guidance; raise :class:`GuidanceError` otherwise.

    A guidance batch feeds both halves the same latents, so the first tensor argument has an even
    number of rows and (with ``compare``) equal halves. That is what tells it from a call of B
    independent samples (guidance off, guidance-distilled models, guidance run as separate calls).
    """
    latents = first_tensor(args, kwargs)
    if latents is None or latents.dim() == 0:
        raise GuidanceError("The model call has no batched tensor input, so it has no guidance halves to split")
    rows = latents.shape[0]
    if rows % 2 or (compare and not torch.equal(latents[: rows // 2], latents[rows // 2 :])):
        raise GuidanceError(
            f"The model call's batch of {rows} rows is not a classifier-free guidance batch (two halves fed the same "
            "latents): guidance is off (guidance_scale <= 1), the model is guidance-distilled, or the pipeline runs "
            "the branches as separate calls. Calibrate without branches= and drop the '@cond'/'@uncond' schedule keys"
        )
    return rows


def take_half(value: Any, rows: int, half: int) -> Any:
    """``value`` with every tensor of ``rows`` rows cut to its ``half`` (0: first, 1: second).

    Tensors of another leading size (weights, masks shared by the batch, rotary tables) pass whole.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == rows:
            return value[: rows // 2] if half == 0 else value[rows // 2 :]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(take_half(v, rows, half) for v in value)
    if isinstance(value, dict):
        return {k: take_half(v, rows, half) for k, v in value.items()}
    return value


def splice_half(kept: Any, part: Any, half: int, where: str) -> Any:
    """``kept`` (a whole-batch output) with its ``half`` replaced by ``part`` (that half's new output)."""
    if isinstance(part, torch.Tensor) and isinstance(kept, torch.Tensor):
        if kept.shape[0] != 2 * part.shape[0] or kept.shape[1:] != part.shape[1:]:
            raise GuidanceError(
                f"{where} returned {tuple(part.shape)} for one guidance half, which does not fill half of its whole-batch "
                f"output {tuple(kept.shape)}: its rows do not follow the batch, so it cannot cache one branch; "
                "drop its '@cond'/'@uncond' schedule keys"
            )
        other = kept[part.shape[0] :] if half == 0 else kept[: part.shape[0]]
        return torch.cat([part, other] if half == 0 else [other, part])
    if isinstance(part, (tuple, list)) and isinstance(kept, (tuple, list)) and len(part) == len(kept):
        return type(part)(splice_half(k, p, half, where) for k, p in zip(kept, part, strict=True))
    if part is None and kept is None:
        return None
    raise GuidanceError(
        f"{where} returned a {type(part).__name__} where its whole-batch output was a {type(kept).__name__}; "
        "it cannot cache one guidance branch: drop its '@cond'/'@uncond' schedule keys"
    )


def check_layer_rows(args: tuple[Any, ...], kwargs: dict[str, Any], rows: int, where: str) -> None:
    """Refuse a layer whose input does not carry the model's guidance batch along dim 0.

    Its rows could be tokens or frames folded into the batch (a temporal block's ``B*H*W``), whose
    halves are not the two branches.
    """
    first = first_tensor(args, kwargs)
    if first is None or first.dim() == 0 or first.shape[0] != rows:
        got = "no tensor input" if first is None else f"an input of shape {tuple(first.shape)}"
        raise GuidanceError(
            f"{where} gets {got}, not the {rows} rows of the model's guidance batch, so its rows cannot be split into "
            "the conditional and unconditional halves; drop its '@cond'/'@uncond' schedule keys"
        )
