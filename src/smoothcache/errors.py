"""The exceptions smoothcache raises, one per kind of mistake, so callers can catch them by name.

Every one derives from :class:`SmoothCacheError`, and also from the built-in exception a caller
would expect for that kind (``ValueError`` for bad input, ``OSError`` for missing files).
"""

from __future__ import annotations

from collections.abc import Sequence


class SmoothCacheError(Exception):
    """Base class of every error smoothcache raises on purpose."""


class ScheduleError(SmoothCacheError, ValueError):
    """A schedule is malformed or does not fit the model it is applied to."""


class BlockCachingError(ScheduleError):
    """A block cannot be cached whole: its output does not continue its inputs."""


class ProfileError(SmoothCacheError, ValueError):
    """A calibration profile is malformed, incomplete, or from another model or step count."""


class UnreachableBudgetError(ScheduleError, ProfileError):
    """A compute fraction or speedup that no schedule from this profile meets (the calibration's
    lookahead bounds how long an output may be reused); the message names the reachable end."""


class CalibrationMemoryError(SmoothCacheError, MemoryError):
    """Calibration's history of layer outputs will not fit on the device. Raised after the first
    step, before it runs out, with the ``layer_groups`` or ``lookahead`` that would fit; the model
    is left without calibration hooks."""


class StepMismatchError(SmoothCacheError, RuntimeError):
    """The pipeline ran a different number of steps than the schedule or profile was made for."""


class NoCacheableLayersError(SmoothCacheError, ValueError):
    """No layer of the model matched the components asked for."""


class ModelInUseError(SmoothCacheError, RuntimeError):
    """The model already has a smoothcache user (a cache handle or a calibration), or its forwards
    were changed by someone else while smoothcache had them."""


class GuidanceError(SmoothCacheError, ValueError):
    """A model call or layer cannot be split into the two halves of a classifier-free guidance batch."""


class RankFailedError(SmoothCacheError, RuntimeError):
    """The job stops on this rank because another rank failed, or could not be reached in time.

    ``failed_ranks`` lists the ranks that reported an error; it is empty when a rank was lost
    without a word (killed, hung past the timeout).
    """

    def __init__(self, message: str, failed_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)


class DemoAssetError(SmoothCacheError, OSError):
    """A shipped demo file (model, classifier, statistics) is missing or unreadable."""


class FashionMnistError(SmoothCacheError, OSError):
    """The Fashion-MNIST files are missing or not valid IDX data."""


class GraphCaptureError(SmoothCacheError, RuntimeError):
    """A model call could not be captured as a CUDA graph; step graphs detached themselves."""
