"""SmoothCache for Diffusion Transformers: calibrate once, then reuse layer outputs across
denoising steps wherever the calibration says they barely change (arXiv 2411.10510)."""

from .adapters import CacheableLayer, find_layers
from .cache_mixin import (
    SmoothCacheConfig,
    install_if_diffusers_loaded,
)
from .calibration import CalibrationRecorder, calibration
from .errors import (
    BlockCachingError,
    GuidanceError,
    ModelInUseError,
    NoCacheableLayersError,
    ProfileError,
    ScheduleError,
    SmoothCacheError,
    StepMismatchError,
    UnreachableBudgetError,
)
from .ownership import disable
from .profile import CalibrationProfile, LayerInfo
from .runtime import CacheHandle, cache
from .schedule import Schedule
from .tuning import TuneResult, tune
from .version import __version__

__all__ = [
    "BlockCachingError",
    "CacheHandle",
    "CacheableLayer",
    "CalibrationProfile",
    "CalibrationRecorder",
    "GuidanceError",
    "LayerInfo",
    "ModelInUseError",
    "NoCacheableLayersError",
    "ProfileError",
    "Schedule",
    "ScheduleError",
    "SmoothCacheConfig",
    "SmoothCacheError",
    "StepMismatchError",
    "TuneResult",
    "UnreachableBudgetError",
    "__version__",
    "cache",
    "calibration",
    "disable",
    "find_layers",
    "tune",
]

install_if_diffusers_loaded()
