"""Answer a pipeline's repeated execution-device lookups within one call from the first (exact).

diffusers' ``DiffusionPipeline._execution_device`` looks for offloading hooks by walking every
module of every component: about 7 ms for a 28-block DiT on one CPU core. ``DiTPipeline`` asks
three times per call, before the GPU has any work, so at batch 1 the GPU idles through three walks
per generation (a profiler trace of one on an H100 shows them as the three longest host gaps
before the first step). Within one ``pipe(...)`` call the answer cannot change: the hooks and
devices it reads are set between calls (offloading moves weights during a call, never the device
it computes on), so the first answer serves the rest and outputs are bit-identical. Outside a
call every lookup asks diffusers, as before.

Python looks properties and ``__call__`` up on the class, not the instance, so the pipeline's
class is swapped for a subclass of it with the same name and module that adds the memo;
:meth:`DeviceOnce.restore` swaps it back. :func:`~smoothcache.prefetch_timesteps` applies it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

__all__ = ["DeviceOnce", "base_class"]

logger = logging.getLogger(__name__)

_STATE = "_smoothcache_device_once"  # the instance's memo, in its __dict__ while the class is swapped
_UNSET = object()
_SUBCLASSES: dict[type, type] = {}  # one memo subclass per pipeline class, made once


class _CallMemo:
    """How many ``pipe(...)`` calls are running on the instance, and their answer once asked."""

    __slots__ = ("answer", "depth")

    def __init__(self) -> None:
        self.depth = 0
        self.answer: Any = _UNSET


def base_class(cls: type) -> type:
    """The pipeline class a memo subclass was made from (``cls`` itself otherwise)."""
    return cls.__dict__.get("_smoothcache_base_class", cls)


def _memo_subclass(cls: type) -> type:
    made = _SUBCLASSES.get(cls)
    if made is not None:
        return made

    # super() rather than the base's functions as they are now: whatever the base class has at
    # the time of the call is what runs (a patched lookup included)
    def _execution_device(self: Any) -> Any:
        memo = self.__dict__.get(_STATE)
        if memo is None or memo.depth == 0:
            return super(made, self)._execution_device
        if memo.answer is _UNSET:
            memo.answer = super(made, self)._execution_device
        return memo.answer

    @functools.wraps(cls.__call__)  # keeps the signature, which diffusers and users inspect
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        memo = self.__dict__.get(_STATE)
        if memo is None:
            memo = self.__dict__[_STATE] = _CallMemo()
        memo.depth += 1
        try:
            return super(made, self).__call__(*args, **kwargs)
        finally:
            memo.depth -= 1
            if memo.depth == 0:
                memo.answer = _UNSET

    lookup = inspect.getattr_static(cls, "_execution_device")
    made = type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "_execution_device": property(_execution_device, doc=lookup.__doc__), "__call__": __call__,
        "_smoothcache_base_class": cls,
    })
    _SUBCLASSES[cls] = made
    return made


class DeviceOnce:
    """The memo on one pipeline: applied on construction (where the pipeline's class has diffusers'
    ``_execution_device`` property), removed by :meth:`restore`. ``applied`` says whether it took."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        cls = type(pipe)
        lookup = inspect.getattr_static(cls, "_execution_device", None)
        self.applied = isinstance(lookup, property) and lookup.fget is not None and base_class(cls) is cls
        if self.applied:
            pipe.__class__ = _memo_subclass(cls)

    def restore(self) -> None:
        """Give the pipeline its own class back (unless something else changed it since)."""
        if not self.applied:
            return
        self.applied = False
        self.pipe.__dict__.pop(_STATE, None)
        if type(self.pipe) is _SUBCLASSES.get(base_class(type(self.pipe))):
            self.pipe.__class__ = base_class(type(self.pipe))
        else:
            logger.warning("The pipeline's class was changed after prefetch_timesteps; it is left as it is now")
