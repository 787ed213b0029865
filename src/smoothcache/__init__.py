"""SmoothCache for Diffusion Transformers: calibrate once, then reuse layer outputs across
denoising steps wherever the calibration says they barely change (arXiv 2411.10510)."""

__version__ = "0.1.0"

from .adapters import CacheableLayer, find_layers
from .adapters.diffusers_cache_mixin import (
    SmoothCacheConfig,
    install_if_diffusers_loaded,
)
from .block_residuals import BlockCachingError
from .calibration import CalibrationRecorder, calibration
from .errors import (
    NoCacheableLayersError,
    ProfileError,
    ScheduleError,
    SmoothCacheError,
    StepMismatchError,
)
from .guidance import GuidanceError
from .profile import CalibrationProfile, LayerInfo
from .runtime import CacheHandle, cache
from .schedule import Schedule
from .tuning import TuneResult, tune

__all__ = [
    "BlockCachingError",
    "CacheHandle",
    "CacheableLayer",
    "CalibrationProfile",
    "CalibrationRecorder",
    "GuidanceError",
    "LayerInfo",
    "NoCacheableLayersError",
    "ProfileError",
    "Schedule",
    "ScheduleError",
    "SmoothCacheConfig",
    "SmoothCacheError",
    "StepMismatchError",
    "TuneResult",
    "cache",
    "calibration",
    "find_layers",
    "tune",
]

install_if_diffusers_loaded()
