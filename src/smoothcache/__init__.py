"""SmoothCache for Diffusion Transformers: calibrate once, then reuse layer outputs across
denoising steps wherever the calibration says they barely change (arXiv 2411.10510).

The public names load on first use (PEP 562), so that ``import smoothcache`` and the command
line's ``--help`` do not import torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .errors import (
    BlockCachingError,
    CalibrationMemoryError,
    GraphCaptureError,
    GuidanceError,
    ModelInUseError,
    NoCacheableLayersError,
    ProfileError,
    ScheduleError,
    SmoothCacheError,
    StepMismatchError,
    UnreachableBudgetError,
)
from .version import __version__

if TYPE_CHECKING:
    from .adapters import CacheableLayer, find_layers
    from .cache_mixin import SmoothCacheConfig
    from .graph_replay import GraphStats, StepGraphs, step_graphs
    from .ownership import disable
    from .prefetch import TimestepPrefetch, prefetch_timesteps
    from .profile import CalibrationProfile, LayerInfo
    from .recorder import CalibrationRecorder, calibration
    from .runtime import CacheHandle, cache
    from .schedule import Schedule
    from .step_split import StepSplit, split_steps
    from .tuning import TuneResult, tune

# public name -> the module that defines it
_LAZY = {
    "CacheableLayer": ".adapters", "find_layers": ".adapters",
    "SmoothCacheConfig": ".cache_mixin",
    "disable": ".ownership",
    "TimestepPrefetch": ".prefetch", "prefetch_timesteps": ".prefetch",
    "CalibrationProfile": ".profile", "LayerInfo": ".profile",
    "CalibrationRecorder": ".recorder", "calibration": ".recorder",
    "CacheHandle": ".runtime", "cache": ".runtime",
    "Schedule": ".schedule",
    "StepSplit": ".step_split", "split_steps": ".step_split",
    "GraphStats": ".graph_replay", "StepGraphs": ".graph_replay", "step_graphs": ".graph_replay",
    "TuneResult": ".tuning", "tune": ".tuning",
}

__all__ = [
    "BlockCachingError",
    "CacheHandle",
    "CacheableLayer",
    "CalibrationMemoryError",
    "CalibrationProfile",
    "CalibrationRecorder",
    "GraphCaptureError",
    "GraphStats",
    "GuidanceError",
    "LayerInfo",
    "ModelInUseError",
    "NoCacheableLayersError",
    "ProfileError",
    "Schedule",
    "ScheduleError",
    "SmoothCacheConfig",
    "SmoothCacheError",
    "StepGraphs",
    "StepMismatchError",
    "StepSplit",
    "TimestepPrefetch",
    "TuneResult",
    "UnreachableBudgetError",
    "__version__",
    "cache",
    "calibration",
    "disable",
    "find_layers",
    "prefetch_timesteps",
    "split_steps",
    "step_graphs",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'smoothcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# diffusers' enable_cache learns SmoothCacheConfig when diffusers is already imported (and with it
# torch); otherwise the first SmoothCacheConfig teaches it (cache_mixin.py says why both).
if "diffusers" in sys.modules:
    from .cache_mixin import install_if_diffusers_loaded

    install_if_diffusers_loaded()
