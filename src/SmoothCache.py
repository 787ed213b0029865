"""Drop-in for the reference package ``dit-smoothcache``: ``from SmoothCache import DiffuserCacheHelper``.

A module rather than a package, so it cannot collide with ``smoothcache/`` on case-insensitive file
systems; the reference's submodule paths are registered as aliases of the shims.
"""

import sys as _sys

from smoothcache import compat as _compat
from smoothcache.compat import (
    CalibrationHelper,
    DiffuserCacheHelper,
    DiffuserCalibrationHelper,
    DiTCacheHelper,
    SmoothCacheHelper,
)

__all__ = ["CalibrationHelper", "DiTCacheHelper", "DiffuserCacheHelper", "DiffuserCalibrationHelper", "SmoothCacheHelper"]
__path__: list = []  # lets `import SmoothCache.calibration` resolve through the aliases below

for _name in (
    "smooth_cache_helper",
    "diffuser_cache_helper",
    "dit_cache_helper",
    "calibration",
    "calibration.calibration_helper",
    "calibration.diffuser_calibration_helper",
):
    _sys.modules[f"{__name__}.{_name}"] = _compat
