"""Take the pipeline's per-step wait for the GPU out of the denoising loop, outputs unchanged.

Some diffusers pipelines (DiTPipeline among them) keep the scheduler's timesteps on the host and
copy each one to the device inside the loop (``t[None].to(device)``). A copy from host to device
that is not ``non_blocking`` makes the host wait until the GPU has finished everything queued so
far, so at every step the GPU idles while the host prepares the next one. That costs a step that
reuses, being short, a large share of its time, and caps what a cache can gain.

:func:`prefetch_timesteps` copies the whole timestep schedule to the device once, when the
scheduler sets it, and lets the host timesteps carry that copy: the loop's ``.to(device)`` then
returns the value already on the device instead of copying and waiting. The model receives the
same values in a fresh tensor, so outputs are bit-identical; everything else done with the
timesteps (the scheduler's arithmetic on the host) runs as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .device_once import DeviceOnce

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["HostTimesteps", "PairingSetTimesteps", "TimestepPrefetch", "prefetch_timesteps"]

logger = logging.getLogger(__name__)

_SIMPLE_INDEX = (int, slice, type(None), type(Ellipsis))


def _simple_index(index: Any) -> bool:
    """Indexes that select the same elements of a copy on another device without touching the host."""
    if isinstance(index, tuple):
        return all(isinstance(i, _SIMPLE_INDEX) and not isinstance(i, bool) for i in index)
    return isinstance(index, _SIMPLE_INDEX) and not isinstance(index, bool)


class HostTimesteps(torch.Tensor):
    """Host timesteps that carry their copy on the device.

    Indexing and unbinding (iterating) keep the pairing; ``.to(device)`` onto the copy's device returns a fresh tensor made from the copy, on the device, without a blocking
    copy. Every other operation sees a plain host tensor and returns plain tensors, so nothing
    else changes and the type does not spread.
    """

    device_copy: torch.Tensor
    prefetch: TimestepPrefetch | None  # counts what the copy served

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        """A plain host copy: the pairing (and the pipeline it leads to) stays behind."""
        return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled as the plain host tensor it is."""
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    @staticmethod
    def pair(host: torch.Tensor, device_copy: torch.Tensor, prefetch: TimestepPrefetch | None) -> HostTimesteps:
        paired = host.as_subclass(HostTimesteps)
        paired.device_copy = device_copy
        paired.prefetch = prefetch
        return paired

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        this = args[0] if args else None
        if type(this) is HostTimesteps:
            served = this._served(func, args[1:], kwargs)
            if served is not None:
                return served
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def _served(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What ``func(self, *args)`` returns when the device copy can serve it; None otherwise."""
        if func is torch.Tensor.unbind:
            with torch._C.DisableTorchFunctionSubclass():
                hosts = torch.Tensor.unbind(self, *args, **kwargs)
            copies = self.device_copy.unbind(*args, **kwargs)
            return tuple(HostTimesteps.pair(h, c, self.prefetch) for h, c in zip(hosts, copies, strict=True))
        if func is torch.Tensor.__getitem__ and _simple_index(args[0]):
            with torch._C.DisableTorchFunctionSubclass():
                host = torch.Tensor.__getitem__(self, args[0])
            return HostTimesteps.pair(host, self.device_copy[args[0]], self.prefetch)
        if func is torch.Tensor.to:
            return self._moved(args, kwargs)
        return None

    def _moved(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or memory_format is not None or not _same_device(device, self.device_copy.device):
            return None
        if self.prefetch is not None:
            self.prefetch.served += 1
        if dtype is None or dtype == self.device_copy.dtype:
            return self.device_copy.clone()  # a fresh tensor, as a copy would be: the caller may write to it
        return self.device_copy.to(dtype)


def _same_device(asked: torch.device | str | int, held: torch.device) -> bool:
    asked = torch.device(asked)
    if asked.type != held.type:
        return False
    if asked.index is None and held.type != "cpu":
        return held.index == torch.get_device_module(held.type).current_device()
    return asked.index == held.index or held.type == "cpu"


class TimestepPrefetch:
    """Pairs a pipeline scheduler's host timesteps with a device copy each time they are set.

    ``served`` counts the device moves answered from the copy (one per step in DiTPipeline).
    With ``device_once``, the pipeline's execution device is also looked up once per call
    (:mod:`smoothcache.device_once`). ``disable()`` (or leaving the ``with`` block) puts the
    scheduler and the pipeline back as they were.
    """

    def __init__(self, pipe: Any, device: torch.device | str | None = None, *, device_once: bool = False) -> None:
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
            raise TypeError(
                f"{type(pipe).__name__} has no scheduler with set_timesteps(): prefetch_timesteps needs a diffusers pipeline"
            )
        if "set_timesteps" in vars(scheduler):
            raise RuntimeError(
                f"{type(scheduler).__name__}.set_timesteps is already replaced on this scheduler (prefetch_timesteps "
                "applied twice?); disable the first one"
            )
        self.pipe = pipe
        self.scheduler = scheduler
        self.device = None if device is None else torch.device(device)
        self.served = 0
        self.device_once = device_once
        self._device_memo: DeviceOnce | None = None
        self.enabled = False
        self.enable()

    def enable(self) -> TimestepPrefetch:
        if self.enabled:
            return self
        if self.device_once:  # first: if it fails, nothing is left half done
            self._device_memo = DeviceOnce(self.pipe)
        self.scheduler.set_timesteps = PairingSetTimesteps(self.scheduler, self)
        self.enabled = True
        return self

    def pair_timesteps(self, scheduler: Any) -> None:
        """Pair ``scheduler``'s host timesteps with a copy on the device (called as it sets them)."""
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or type(timesteps) is HostTimesteps:
            return
        device = self.device or _execution_device(self.pipe)
        if timesteps.device.type != "cpu" or device is None or (device.type == "cpu" and self.device is None):
            return  # already where the model runs: nothing is copied per step
        logger.debug("timesteps of %s paired with a copy on %s", type(scheduler).__name__, device)
        scheduler.timesteps = HostTimesteps.pair(timesteps, timesteps.to(device), self)

    def disable(self) -> None:
        if not self.enabled:
            return
        vars(self.scheduler).pop("set_timesteps", None)
        timesteps = getattr(self.scheduler, "timesteps", None)
        if type(timesteps) is HostTimesteps:
            self.scheduler.timesteps = timesteps.as_subclass(torch.Tensor)
        if self._device_memo is not None:
            self._device_memo.restore()
            self._device_memo = None
        self.enabled = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()


class PairingSetTimesteps:
    """A scheduler's ``set_timesteps``, as an instance attribute, that pairs the timesteps it sets.

    An object, not a closure: diffusers deep-copies schedulers (LTX-2's audio scheduler), and a
    copy must set and pair its own timesteps, not the original's. It carries the method's
    signature, which pipelines read (``retrieve_timesteps`` looks for ``sigmas``)."""

    def __init__(self, scheduler: Any, prefetch: TimestepPrefetch) -> None:
        self.scheduler, self.prefetch = scheduler, prefetch
        functools.update_wrapper(self, type(scheduler).set_timesteps.__get__(scheduler))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = type(self.scheduler).set_timesteps(self.scheduler, *args, **kwargs)
        self.prefetch.pair_timesteps(self.scheduler)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> PairingSetTimesteps:
        return PairingSetTimesteps(memo.get(id(self.scheduler), self.scheduler), self.prefetch)


def _execution_device(pipe: Any) -> torch.device | None:
    """Where the pipeline runs its model: the denoiser's own device where its weights sit on an
    accelerator, else diffusers' ``_execution_device``, which knows about offloading.

    Asked at every generation, before the GPU has work: diffusers' lookup walks every module of
    every component (milliseconds on a 28-block DiT), one parameter's device does not. A wrong
    answer costs only the prefetch: a move to another device is copied as before. A pipeline
    placed over several devices (``device_map``) asks diffusers."""
    denoisers = () if getattr(pipe, "hf_device_map", None) else ("transformer", "unet")
    for name in denoisers:
        model = getattr(pipe, name, None)
        weight = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        if weight is not None and weight.device.type not in ("cpu", "meta"):
            return weight.device
    device = getattr(pipe, "_execution_device", None)
    if device is None:
        device = getattr(pipe, "device", None)
    return None if device is None else torch.device(device)


def prefetch_timesteps(pipe: Any, device: torch.device | str | None = None, *, device_once: bool = False) -> TimestepPrefetch:
    """Copy the scheduler's timesteps to the device once per generation instead of once per step.

    For pipelines whose loop copies each host timestep to the device (DiTPipeline): that copy makes
    the host wait for the GPU at every step. With this, the loop's copy is answered from a copy
    made when the scheduler sets its timesteps; outputs are bit-identical. Where the timesteps
    already live on the device (most newer pipelines), nothing changes. Apply it after choosing
    the pipeline's scheduler; ``device`` defaults to the pipeline's execution device.

    ``device_once=True`` (opt-in) also answers the pipeline's repeated ``_execution_device``
    lookups within one call from the first: each walks every module of every component, and
    DiTPipeline asks three times per call while the GPU waits. It swaps the pipeline's class for
    a subclass of its own (:mod:`smoothcache.device_once`; outputs bit-identical, undone by
    ``disable()``).

    >>> prefetch = smoothcache.prefetch_timesteps(pipe)  # doctest: +SKIP
    >>> images = pipe(class_labels=[207], num_inference_steps=50).images  # doctest: +SKIP
    >>> prefetch.disable()  # doctest: +SKIP
    """
    return TimestepPrefetch(pipe, device, device_once=device_once)
