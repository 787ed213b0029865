"""Data-parallel calibration and generation on ``torch.distributed``, launched by ``torchrun``.

Each rank runs a contiguous shard of the pipeline calls, so the shards read in rank order are the
calls in their single-process order. Results meet in one object all-gather after the local work,
and that same collective reports faults: a rank whose work raised sends its error instead of a
result, so every rank stops with a message naming it, instead of waiting in a collective for a
peer that will never arrive. A rank that dies outright (killed, out of host memory) is stopped
by torchrun, which then ends the other ranks; without torchrun, the process group's timeout ends
the wait (``SMOOTHCACHE_DIST_TIMEOUT`` seconds, default 10 minutes: it bounds how long a fast rank
waits for a slow one, so a shard of more work than that per rank needs a larger value).

>>> with distributed.session("cuda") as world:                        # doctest: +SKIP
...     def shard():
...         with smoothcache.calibration(pipe) as rec:
...             for seed in world.shard(range(16)):
...                 pipe(class_labels=[207], generator=torch.manual_seed(seed))
...         return rec.profile
...     profile = distributed.merge_rank_profiles(world.run(shard))    # every rank gets the whole profile
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ProfileError, RankFailedError, ScheduleError
from .profile import CalibrationProfile
from .schedule import Schedule

__all__ = [
    "RankFailedError",
    "World",
    "current",
    "init",
    "launched_by_torchrun",
    "merge_rank_profiles",
    "session",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "SMOOTHCACHE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = timedelta(minutes=10)  # torch's own default is 30: a hung rank held the job that long


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun`` (or a launcher setting the same variables)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank, the number of ranks, and its rank on this host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """``"cuda"`` becomes this rank's GPU, ``cuda:LOCAL_RANK``; other devices are kept as given."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device

    def shard_range(self, count: int) -> range:
        """The indices of this rank's share of ``count`` items: contiguous, sizes differ by at most one."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``; the shards of ranks 0, 1, ... concatenated are ``items``."""
        indices = self.shard_range(len(items))
        return list(items[indices.start : indices.stop])

    def run(self, work: Callable[[], T]) -> list[T]:
        """Run ``work`` here and return every rank's result in rank order, on every rank.

        If ``work`` raises on some rank, that rank re-raises its own error and every other rank
        raises :class:`RankFailedError` naming it; no rank is left waiting. With one process
        this is ``[work()]``.
        """
        if self.size == 1:
            return [work()]
        error: Exception | None = None
        try:
            outcome: tuple[bool, Any] = (True, pickle.dumps(work()))  # pickled here, so a bad result is this rank's error
        except Exception as exc:
            error = exc
            outcome = (False, f"{type(exc).__name__}: {exc}")
            logger.debug("rank %d failed", self.rank, exc_info=True)
        outcomes: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(outcomes, outcome)
        except RuntimeError as exc:  # gloo's errors: a peer died, or hung past the timeout
            raise RankFailedError(
                f"rank {self.rank} of {self.size} lost contact with the other ranks while waiting for their results "
                f"(a rank was killed, ran out of memory or hung past the {_timeout().total_seconds():.0f}s timeout; "
                f"see the other ranks' output; set {TIMEOUT_ENV} in seconds to wait longer): {exc}"
            ) from (error or exc)
        failed = {rank: message for rank, (ok, message) in enumerate(outcomes) if not ok}
        if error is not None:
            raise error
        if failed:
            reasons = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
            raise RankFailedError(f"{len(failed)} of {self.size} ranks failed, so every rank stopped. {reasons}", list(failed))
        return [pickle.loads(payload) for _, payload in outcomes]


def current() -> World:
    """This process's world from torchrun's environment variables (one process when not launched by it)."""
    if not launched_by_torchrun():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def _timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {value!r}")
    return timedelta(seconds=seconds)


def init(device: str = "cpu", timeout: timedelta | None = None) -> World:
    """Join torchrun's process group (NCCL for CUDA tensors with gloo for CPU objects, or gloo alone).

    Returns this process's :class:`World`; a single process (not under torchrun) joins nothing.
    An existing process group is reused.
    """
    world = current()
    if world.size == 1:
        return world
    if not dist.is_initialized():
        on_cuda = device.startswith("cuda")
        if on_cuda:
            torch.cuda.set_device(world.device(device))
        # Objects (results, fault reports) go through gloo on the CPU in both cases.
        backend = "cpu:gloo,cuda:nccl" if on_cuda else "gloo"
        dist.init_process_group(backend, timeout=timeout or _timeout())
        logger.debug("rank %d of %d joined a %s process group", world.rank, world.size, backend)
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise RankFailedError(
            f"The process group has rank {dist.get_rank()} of {dist.get_world_size()} but the environment says "
            f"rank {world.rank} of {world.size}; initialise it from torchrun's RANK and WORLD_SIZE"
        )
    return world


@contextmanager
def session(device: str = "cpu", timeout: timedelta | None = None) -> Iterator[World]:
    """:func:`init` for a block of work; leaves the process group it created when the block succeeds.

    After a failure the group is left as is: a peer may be gone, and the process ends next.
    """
    created = launched_by_torchrun() and not dist.is_initialized()
    world = init(device, timeout)
    yield world
    if created and dist.is_initialized():
        dist.destroy_process_group()




def merge_rank_profiles(profiles: Sequence[CalibrationProfile | None]) -> CalibrationProfile:
    """One profile from every rank's profile, in rank order (``None`` for a rank with no calls).

    Runs keep their order, so the result equals a single-process calibration over the same
    calls; metadata and FLOPs come from the first rank, ``seconds`` is the slowest rank's, and
    ``world_size`` records the number of ranks. One profile is returned unchanged.
    """
    present = [p for p in profiles if p is not None]
    if not present:
        raise ProfileError("No rank recorded a calibration run; give at least one pipeline call (--samples)")
    if len(profiles) == 1:
        return present[0]
    merged = CalibrationProfile.merge(present)
    seconds = [p.metadata["seconds"] for p in present if isinstance(p.metadata.get("seconds"), (int, float))]
    merged.metadata["world_size"] = len(profiles)
    if seconds:
        merged.metadata["seconds"] = max(seconds)
    return merged


def check_ranks_agree(schedule: Schedule, where: str) -> None:
    """Under context parallelism every rank must take the same decision at every step; a rank with
    another schedule would wait in the attention collectives until the backend times out (ten
    minutes on NCCL). One all-gather of the schedule's digest turns that hang into an error."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    digest = hashlib.sha256(schedule.to_json().encode()).hexdigest()[:16]
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise ScheduleError(
            f"The ranks of the context-parallel {where} hold different schedules (digests {digests}); "
            "load the same schedule file on every rank"
        )
