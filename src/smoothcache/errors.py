"""The exceptions smoothcache raises, one per kind of mistake, so callers can catch them by name."""

from __future__ import annotations


class SmoothCacheError(Exception):
    """Base class of every error smoothcache raises on purpose."""


class ScheduleError(SmoothCacheError, ValueError):
    """A schedule is malformed or does not fit the model it is applied to."""


class ProfileError(SmoothCacheError, ValueError):
    """A calibration profile is malformed, incomplete, or from another model or step count."""


class StepMismatchError(SmoothCacheError, RuntimeError):
    """The pipeline ran a different number of steps than the schedule or profile was made for."""


class NoCacheableLayersError(SmoothCacheError, ValueError):
    """No layer of the model matched the components asked for."""
