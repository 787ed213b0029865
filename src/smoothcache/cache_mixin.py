"""SmoothCache through diffusers' own caching entry point:
``pipe.transformer.enable_cache(SmoothCacheConfig(schedule))``, next to FirstBlockCache & co.

diffusers' ``CacheMixin.enable_cache`` dispatches on a fixed list of config classes, so it is
taught one more: ``enable_cache``/``disable_cache`` are wrapped once, handing every other config to
the original methods unchanged. That happens when ``smoothcache`` is imported after diffusers, or
else when the first :class:`SmoothCacheConfig` is created — so create the config before calling
``enable_cache`` (Python looks the method up before it evaluates the argument).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .runtime import CacheHandle, cache
from .schedule import Schedule

__all__ = ["SmoothCacheConfig", "install_if_diffusers_loaded"]

_handles: weakref.WeakKeyDictionary[Any, CacheHandle] = weakref.WeakKeyDictionary()
_installed = False


@dataclass
class SmoothCacheConfig:
    """A SmoothCache schedule for ``ModelMixin.enable_cache`` (models with diffusers' ``CacheMixin``).

    ``schedule`` is a :class:`~smoothcache.Schedule`, its dict, or a path to its JSON file. The
    model alone gives no scheduler, so a generation is taken to end after the schedule's steps.

    >>> pipe.transformer.enable_cache(SmoothCacheConfig("schedule.json"))   # doctest: +SKIP
    """

    schedule: Schedule | dict[str, list[int]] | str | Path
    components: list[str] | None = None
    calls_per_step: int | None = None
    steps_mismatch: Literal["error", "compute"] = "error"

    def __post_init__(self) -> None:
        if isinstance(self.schedule, (str, Path)):
            self.schedule = Schedule.load(self.schedule)
        elif not isinstance(self.schedule, Schedule):
            self.schedule = Schedule.from_dict(self.schedule)
        _install()


def install_if_diffusers_loaded() -> None:
    """Teach ``enable_cache`` now if diffusers is already imported (importing it costs seconds)."""
    if "diffusers" in sys.modules:
        _install()


def _install() -> None:
    """Wrap ``CacheMixin.enable_cache``/``disable_cache`` once (no-op without diffusers)."""
    global _installed
    if _installed:
        return
    try:
        from diffusers.models.cache_utils import CacheMixin
    except ImportError:
        return
    original_enable, original_disable = CacheMixin.enable_cache, CacheMixin.disable_cache

    def enable_cache(self: Any, config: Any) -> None:
        if not isinstance(config, SmoothCacheConfig):
            return original_enable(self, config)
        if self.is_cache_enabled:
            raise ValueError(
                f"Caching has already been enabled with {type(self._cache_config).__name__}; call disable_cache() first"
            )
        assert isinstance(config.schedule, Schedule)
        _handles[self] = cache(
            self, config.schedule, components=config.components,
            calls_per_step=config.calls_per_step, steps_mismatch=config.steps_mismatch,
        )
        self._cache_config = config

    def disable_cache(self: Any) -> None:
        if not isinstance(self._cache_config, SmoothCacheConfig):
            return original_disable(self)
        _handles.pop(self).disable()
        self.__dict__.pop("_cache_config", None)  # back to the class default, as before enable_cache

    enable_cache.__doc__, disable_cache.__doc__ = original_enable.__doc__, original_disable.__doc__
    CacheMixin.enable_cache, CacheMixin.disable_cache = enable_cache, disable_cache
    _installed = True
