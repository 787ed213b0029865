"""Answer a pipeline's repeated execution-device lookups within one call from the first (exact).

diffusers' ``DiffusionPipeline._execution_device`` looks for offloading hooks by walking every
module of every component: about 7 ms for a 28-block DiT on one CPU core. ``DiTPipeline`` asks
three times per call, before the GPU has any work, so at batch 1 the GPU idles through three walks
per generation (a profiler trace of one on an H100 shows them as the three longest host gaps
before the first step). Within one ``pipe(...)`` call of diffusers' pipelines the answer does not
change: the hooks and devices it reads are set between calls (offloading moves weights during a
call, never the device it computes on), so the first answer serves the rest and outputs are
bit-identical. Code of your own that moves the pipeline during a call (in a step callback) would
get the old answer. Outside a call every lookup asks diffusers, as before.

Python looks properties and ``__call__`` up on the class, not the instance, so the pipeline's
class is swapped for a subclass of its own, made for this one pipeline, with the same name and
module, that adds the memo; :meth:`DeviceOnce.restore` swaps it back. Libraries that patch "the
pipeline's class" (cache-dit wraps ``type(pipe).__call__``) then patch that subclass, which
concerns this pipeline alone, as they meant; a subclass patched so is kept at ``restore()``, with
the memo off, since swapping it back would drop their patch. A class cache-dit wrapped first is
left alone (its ``disable_cache`` must find its wrapper on the pipeline's own class); undo such
patches in the reverse order of applying them. A pickled or deep-copied pipeline is its own class
again. Calls of one pipeline from several threads at once share its memo (the same answer, and
diffusers' pipelines are not made for that anyway). Opt-in:
``smoothcache.prefetch_timesteps(pipe, device_once=True)``.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
import logging
from typing import Any

__all__ = ["DeviceOnce", "base_class"]

logger = logging.getLogger(__name__)

_STATE = "_smoothcache_device_once"  # the instance's memo, in its __dict__
_BASE = "_smoothcache_base_class"  # on a memo subclass: the class it was made from
_UNSET = object()


class _CallMemo:
    """How many ``pipe(...)`` calls are running on the instance, their answer once asked, and
    whether the memo is on."""

    __slots__ = ("answer", "depth", "on")

    def __init__(self) -> None:
        self.depth = 0
        self.answer: Any = _UNSET
        self.on = True

    def __deepcopy__(self, memo: dict[int, Any]) -> _CallMemo:
        """A copied pipeline (``copy.deepcopy(pipe)``) starts with no call running."""
        fresh = _CallMemo()
        fresh.on = self.on
        return fresh

    def __copy__(self) -> _CallMemo:
        return self.__deepcopy__({})


def base_class(cls: type) -> type:
    """The pipeline class a memo subclass was made from (``cls`` itself otherwise)."""
    return vars(cls).get(_BASE, cls)


def _memo_subclass(cls: type) -> type:
    """A subclass of ``cls`` for one pipeline: its ``_execution_device`` answers from the running
    call's memo; its ``__call__`` opens and closes the memo around the class's own."""

    # super() rather than the base's functions as they are now: whatever the base class has at
    # the time of the call is what runs (a patched lookup included)
    def _execution_device(self: Any) -> Any:
        memo = self.__dict__.get(_STATE)
        if memo is None or memo.depth == 0 or not memo.on:
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

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        """Pickled and deep-copied as the pipeline class it was made from, without the memo (the
        subclass cannot be found by name, and a copy is not this pipeline)."""
        state = {k: v for k, v in self.__dict__.items() if k != _STATE}
        return copyreg._reconstructor, (cls, object, None), state

    lookup = inspect.getattr_static(cls, "_execution_device")
    made = type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "_execution_device": property(_execution_device, doc=lookup.__doc__), "__call__": __call__,
        "__reduce_ex__": __reduce_ex__, _BASE: cls,
    })
    made._smoothcache_pristine = dict(vars(made))  # type: ignore[attr-defined]  # what restore() compares with
    return made


class DeviceOnce:
    """The memo on one pipeline: applied on construction (where the pipeline's class has diffusers'
    ``_execution_device`` property), removed by :meth:`restore`. ``applied`` says whether it took."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        cls = type(pipe)
        self._made: type | None = None
        if base_class(cls) is not cls:  # a memo subclass: on again if an earlier restore() kept it
            if not self._memo().on:
                self._made = cls
                self._memo().on = True
        else:
            lookup = inspect.getattr_static(cls, "_execution_device", None)
            if "_original_call" in vars(cls):  # cache-dit wrapped this class's __call__ first: its disable_cache must find it
                logger.warning("The pipeline's class is wrapped by cache-dit (enable_cache came first); the "
                               "execution-device memo is not applied")
            elif isinstance(lookup, property) and lookup.fget is not None:
                self._made = _memo_subclass(cls)
                pipe.__class__ = self._made
                self._memo().on = True

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the memo subclass, which cannot be found by name (a pickled pipeline is
        its base class's)."""
        return {**self.__dict__, "_made": None}

    @property
    def applied(self) -> bool:
        return self._made is not None

    def _memo(self) -> _CallMemo:
        memo = self.pipe.__dict__.get(_STATE)
        if memo is None:
            memo = self.pipe.__dict__[_STATE] = _CallMemo()
        return memo

    def restore(self) -> None:
        """Give the pipeline its own class back. Where the memo subclass was patched since (or
        the pipeline's class changed), it is kept as it is, with the memo off."""
        made, self._made = self._made, None
        if made is None:
            return
        memo = self.pipe.__dict__.get(_STATE)
        # as made, whatever restored it since (copyreg caches __slotnames__ on a class it copies)
        pristine = vars(made)["_smoothcache_pristine"]
        now = {name: value for name, value in vars(made).items() if name not in ("__slotnames__", "_smoothcache_pristine")}
        untouched = type(self.pipe) is made and now.keys() == pristine.keys() and all(
            now[name] is value for name, value in pristine.items())
        if untouched and (memo is None or memo.depth == 0):
            self.pipe.__dict__.pop(_STATE, None)
            self.pipe.__class__ = base_class(made)
            return
        if memo is not None:
            memo.on = False
        if untouched:  # disabled from inside a pipe(...) call (a callback)
            logger.warning("The execution-device memo was turned off during a pipe(...) call; the pipeline keeps "
                           "the memo's subclass, with the memo off")
            return
        logger.warning(
            "The pipeline's class was changed or patched after prefetch_timesteps (%s); it is kept as it is, "
            "with the execution-device memo off", type(self.pipe).__qualname__)
