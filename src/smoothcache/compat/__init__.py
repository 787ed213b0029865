"""The reference package's (``dit-smoothcache``) helper classes as thin shims over smoothcache.

Same constructor arguments and ``enable()``/``disable()`` as the reference, so its README examples
run unchanged, minus its bugs: nothing is printed, step counters restart with every generation,
and calibration over several pipeline calls averages per call instead of running on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..adapters import find_layers
from ..errors import StepMismatchError
from ..profile import CalibrationProfile
from ..recorder import CalibrationRecorder
from ..runtime import CacheHandle
from ..schedule import Schedule

__all__ = [
    "CalibrationHelper",
    "DiTCacheHelper",
    "DiffuserCacheHelper",
    "DiffuserCalibrationHelper",
    "SmoothCacheHelper",
]

BlockClasses = type | str | Sequence[type | str]


def _block_types(model: nn.Module, block_classes: BlockClasses) -> list[type]:
    """Classes given as types, or by class name (how the original DiT's ``DiTBlock`` is found
    without importing its repository)."""
    wanted = block_classes if isinstance(block_classes, (list, tuple)) else [block_classes]
    types: list[type] = []
    for entry in wanted:
        if isinstance(entry, type):
            types.append(entry)
        else:
            types.extend({type(m) for m in model.modules() if type(m).__name__ == entry})
    return types


class SmoothCacheHelper:
    """Caches ``components_to_wrap`` inside every block of ``block_classes`` on ``schedule``."""

    def __init__(
        self,
        model: nn.Module,
        block_classes: BlockClasses,
        components_to_wrap: list[str],
        schedule: dict[str, list[int]],
    ) -> None:
        self.model = model
        self.block_classes = block_classes if isinstance(block_classes, list) else [block_classes]
        self.components_to_wrap = components_to_wrap
        self.schedule = schedule
        self._handle: CacheHandle | None = None

    def enable(self) -> None:
        """Start caching; every model call from here on is one step, and a new generation starts
        after the schedule's last step."""
        if self._handle is None:
            schedule = Schedule.from_dict(self.schedule)
            layers = find_layers(self.model, self.components_to_wrap, _block_types(self.model, self.block_classes))
            self._handle = CacheHandle(self.model, schedule, layers=layers)
        else:
            self._handle.enable()

    def disable(self) -> None:
        """Stop caching and restore the model exactly."""
        if self._handle is not None:
            self._handle.disable()

    def reset_state(self) -> None:
        """Restart step counting at step 0."""
        if self._handle is not None:
            self._handle.reset()


class DiffuserCacheHelper(SmoothCacheHelper):
    """diffusers' ``BasicTransformerBlock`` (DiT, PixArt), self-attention ``attn1`` as in the reference."""

    def __init__(self, model: nn.Module, schedule: dict[str, list[int]]) -> None:
        super().__init__(model, "BasicTransformerBlock", ["attn1"], schedule)


class DiTCacheHelper(SmoothCacheHelper):
    """facebookresearch/DiT's ``DiTBlock`` (``attn`` and ``mlp``), found by class name."""

    def __init__(self, model: nn.Module, schedule: dict[str, list[int]]) -> None:
        super().__init__(model, "DiTBlock", ["attn", "mlp"], schedule)


class CalibrationHelper:
    """Records error curves between ``enable()`` and ``disable()``; ``disable()`` writes the greedy
    schedule at ``calibration_threshold`` to ``log_file``. The full profile is kept in ``.profile``."""

    def __init__(
        self,
        model: nn.Module,
        block_classes: BlockClasses,
        components_to_wrap: list[str],
        calibration_lookahead: int = 3,
        calibration_threshold: float = 0.0,
        schedule_length: int = 50,
        log_file: str = "calibration_schedule.json",
    ) -> None:
        if calibration_lookahead <= 0:
            raise ValueError("calibration_lookahead must be greater than 0.")
        self.model = model
        self.block_classes = block_classes if isinstance(block_classes, list) else [block_classes]
        self.components_to_wrap = components_to_wrap
        self.calibration_lookahead = calibration_lookahead
        self.calibration_threshold = calibration_threshold
        self.schedule_length = schedule_length
        self.log_file = log_file
        self.enabled = False
        self.profile: CalibrationProfile | None = None
        self._recorder: CalibrationRecorder | None = None

    def enable(self) -> None:
        if self.enabled:
            return
        layers = find_layers(self.model, self.components_to_wrap, _block_types(self.model, self.block_classes))
        self._recorder = CalibrationRecorder(
            self.model, layers, lookahead=self.calibration_lookahead, steps=self.schedule_length
        ).start()
        self.enabled = True

    def disable(self) -> None:
        if not self.enabled or self._recorder is None:
            return
        self.enabled = False
        self.profile = self._recorder.stop()
        self._recorder = None
        if self.profile.num_steps != self.schedule_length:
            raise StepMismatchError(
                f"schedule_length={self.schedule_length} but calibration ran {self.profile.num_steps} steps"
            )
        self.generate_schedule().save(Path(self.log_file))

    def generate_schedule(self) -> Schedule:
        """The greedy schedule at ``calibration_threshold`` from the last calibration, in the reference's
        file layout (plans only: no ``"_planned"`` record)."""
        if self.profile is None:
            raise RuntimeError("Run enable(), the pipeline, then disable() before generating a schedule")
        return dataclasses.replace(self.profile.schedule(alpha=self.calibration_threshold), planned=None)


class DiffuserCalibrationHelper(CalibrationHelper):
    """:class:`CalibrationHelper` for diffusers' ``BasicTransformerBlock``; ``attn1`` by default."""

    def __init__(
        self,
        model: nn.Module,
        calibration_lookahead: int = 3,
        calibration_threshold: float = 0.0,
        schedule_length: int = 50,
        log_file: str = "calibration_schedule.json",
        components_to_wrap: list[str] | None = None,
    ) -> None:
        super().__init__(
            model,
            "BasicTransformerBlock",
            components_to_wrap if components_to_wrap is not None else ["attn1"],
            calibration_lookahead,
            calibration_threshold,
            schedule_length,
            log_file,
        )
