"""The cache handle: at each step, every scheduled layer either computes (and keeps its output) or
returns the output it kept.

The handle attaches the forwards of :mod:`.reuse` to the cached layers and makes the decisions
once per model call, in a forward pre-hook (``steps.attach_step_hooks``): it sets the ``compute``
flag of each :class:`~smoothcache.reuse.Decision` for the step. ``disable()`` puts every module
back exactly.

Outputs are kept per call slot (the n-th model call of a step: conditional and unconditional
calls keep apart). A slot reuses only what it computed itself earlier in the same generation, for
inputs of the same shape; otherwise it computes, whatever the plan says. So a call that appears on
some steps only (SD3's skip-layer guidance), an expert taking over (Wan 2.2), a layer its block
skips, or a batch that changes size all compute before they reuse. A layer its block calls
several times per call (CogView4's ff, on image then text tokens) keeps one output per occurrence.

Under ``torch.compile`` the per-layer path is traced into the compiled graph: dynamo reads the
``compute`` flags as constants, so each distinct compute/reuse pattern is one graph, and the kept
outputs are graph inputs (no graph break, no device sync). Patterns are bounded by the schedule
(:meth:`CacheHandle.decision_patterns`). Nothing the graph reads changes between generations: a
layer's slots are made once (``None`` until a slot keeps something) and emptied, never removed;
the step bookkeeping runs outside any compiled region. So a second generation compiles nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .adapters import CacheableLayer, find_layers
from .block_residuals import BlockCachingError, BlockStreams
from .branch_caching import BranchCaching
from .errors import ScheduleError, StepMismatchError
from .guidance import input_shape
from .reuse import (
    BARRIER_EVERY,
    Decision,
    block_caching_forward,
    block_forecasting_forward,
    caching_forward,
    forecasting_forward,
    repeated_caching_forward,
    shadow_forward,
    stream_barrier_forward,
)
from .schedule import Schedule, layer_type_of, schedule_key_for
from .steps import (
    Experts,
    StepTracker,
    attach_step_hooks,
    resolve_target,
    scheduler_step_index,
    step_anchor,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CacheHandle", "cache"]

logger = logging.getLogger(__name__)


class CacheHandle:
    """SmoothCache attached to one model; a context manager, and ``enable()``/``disable()`` for manual use."""

    def __init__(
        self,
        pipe_or_module: Any,
        schedule: Schedule | dict[str, list[int]],
        *,
        components: Sequence[str] | None = None,
        layers: Sequence[CacheableLayer] | None = None,
        calls_per_step: int | None = None,
        steps_mismatch: Literal["error", "compute"] = "error",
        branches: Sequence[str] | str = "auto",
        forecast: Literal["none", "linear"] = "none",
    ) -> None:
        if not isinstance(schedule, Schedule):
            schedule = Schedule.from_dict(schedule)
        if steps_mismatch not in ("error", "compute"):
            raise ValueError(f"steps_mismatch must be 'error' or 'compute', got {steps_mismatch!r}")
        self.target = resolve_target(pipe_or_module)
        self._branches = BranchCaching(schedule, branches, self.target)  # '@cond'/'@uncond' keys: see branch_caching
        schedule = self._branches.schedule
        self.schedule = schedule
        self.steps_mismatch = steps_mismatch
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        self.forecast = forecast
        if layers is None:
            if components is None:
                components = list(dict.fromkeys(layer_type_of(key) for key in schedule.keys))
            layers = find_layers(self.target.model, components, allow_repeated=True)
        self._plans = self._assign_keys(list(layers))
        covered = {id(layer) for group in self._plans.values() for layer in group}
        # module order: the first of them anchors the step, so it must run before the others
        self.layers = [layer for layer in layers if id(layer) in covered]
        self._branches.bind(self.layers)
        self._tracker = StepTracker(
            schedule.num_steps, self.target.timesteps, calls_per_step, scheduler_step_index(self.target)
        )
        self._decisions: list[tuple[Decision, tuple[bool, ...]]] = []
        self._keeps: list[tuple[bool, ...]] = []  # per decision: whether each step's output must be kept
        self._ratios: list[tuple[float, ...]] = []  # per decision: each step's extrapolation (forecast="linear")
        self._whole_model_compiled = [False]  # read by traced blocks: see reuse.stream_barrier_forward
        self._restore: list[Callable[[], None]] = []
        self._outputs: list[dict[int, Any]] = []  # per layer: call slot -> kept output(s), None if none
        self._slots = 0  # call slots every layer has an entry for
        self._occurrences: list[list[int]] = []  # per repeated layer: its calls in this model call
        self._input_shapes: dict[int, tuple[int, ...] | None] = {}  # per call slot: at its last call
        self._marked_step: int | None = None  # cudagraph trees' step mark, as this generation's start left it
        self._warn_marks = True  # until a mark within a generation has been warned about
        if getattr(self.target.model, "_parallel_config", None) is not None:  # diffusers' context parallelism
            from .distributed import check_ranks_agree

            check_ranks_agree(self.schedule, type(self.target.model).__name__)
        self.enable()

    def _assign_keys(self, layers: list[CacheableLayer]) -> dict[str, list[CacheableLayer]]:
        """Group the layers by the schedule key that governs them; every key must govern some."""
        by_key: dict[str, list[CacheableLayer]] = {}
        for layer in layers:
            key = schedule_key_for(self.schedule.plans, layer.layer_type, layer.block)
            if key is not None:
                by_key.setdefault(key, []).append(layer)
        _check_blocks_apart(by_key)
        unused = [key for key in self.schedule.keys if key not in by_key]
        if unused:
            found = sorted({layer.layer_type for layer in layers})
            raise ScheduleError(
                f"Schedule keys {unused} match no layer of {type(self.target.model).__name__}; "
                f"its cacheable layers answer to {found} (or '<type>-<block>'). "
                "Use a schedule made for this model, or pass components= naming its layers"
            )
        return by_key

    # ---- attach / detach --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._restore)

    def enable(self) -> Self:
        """Attach to the model (idempotent). The next model call starts a new generation."""
        if self.enabled:
            return self
        self._tracker.reset()
        block_decisions: set[int] = set()
        forecasting: set[int] = set()
        reused_plainly: list[str] = []  # with forecast="linear": modules it does not apply to
        block_layer_decisions: dict[str, list[Decision]] = {}  # block path -> decisions of its cached layers
        order = {name: position for position, (name, _) in enumerate(self.target.model.named_modules())}
        first_blocks = _first_of_each_list(
            sorted((layer.name for layer in self.layers if layer.streams is not None), key=order.__getitem__)
        )
        for key, layers in self._plans.items():
            decision = Decision()
            self._decisions.append((decision, tuple(v == 1 for v in self.schedule.plans[key])))
            for layer in layers:
                outputs: dict[int, Any] = {}
                self._outputs.append(outputs)
                governing = [decision]  # the decisions this layer follows (two for guidance halves)
                if layer.streams is None and (self._branches.governs(layer) or layer.repeats > 1):
                    reused_plainly.append(layer.name)
                if layer.streams is not None:
                    streams = BlockStreams.of(layer.module, layer.name, layer.streams)
                    keep_states = layer.name not in first_blocks
                    if self.forecast == "linear":
                        forecasting.add(id(decision))  # keeps every computed residual: no keep flag
                        forward = block_forecasting_forward(layer.module.forward, decision, outputs, streams, keep_states)
                    else:
                        block_decisions.add(id(decision))
                        forward = block_caching_forward(layer.module.forward, decision, outputs, streams, keep_states)
                elif self._branches.governs(layer):
                    forward = self._branches.forward(layer.module.forward, layer, outputs, self._decisions)
                    governing = [d for d, _ in self._decisions[-2:]]  # the two it added
                elif layer.repeats > 1:
                    occurrence = [0]
                    self._occurrences.append(occurrence)
                    forward = repeated_caching_forward(layer.module.forward, decision, outputs, occurrence)
                elif self.forecast == "linear":
                    forecasting.add(id(decision))
                    forward = forecasting_forward(layer.module.forward, decision, outputs)
                else:
                    forward = caching_forward(layer.module.forward, decision, outputs)
                if layer.streams is None:
                    block = _block_path(layer)
                    if block is not None:
                        mine = block_layer_decisions.setdefault(block, [])
                        mine += [d for d in governing if d not in mine]
                self._restore.append(shadow_forward(layer.module, forward))
        self._attach_stream_barriers(sorted(block_layer_decisions.items(), key=lambda item: order[item[0]]))
        if self.forecast == "linear" and reused_plainly:
            logger.warning(
                "forecast='linear' extrapolates layers' outputs and blocks' residuals; %d cached modules (guidance "
                "branches or layers called several times per step, e.g. %s) reuse their kept outputs plainly",
                len(reused_plainly), reused_plainly[0],
            )
        anchor = step_anchor(self.target.model, self.layers[0].name, whole_block=self.layers[0].streams is not None)
        # the step bookkeeping is plain Python state: traced, it would put every counter in a guard
        on_model_call = torch.compiler.disable(self._before_model_call)
        self._restore.extend(attach_step_hooks(self.target.model, anchor, on_model_call, pass_inputs=True))
        logger.debug("SmoothCache enabled on %d layers under %d keys", len(self._outputs), len(self._plans))
        # a block's keep flag matters (and, traced, makes its own graphs); a layer keeps regardless
        self._keeps = [_keeps(plan) if id(d) in block_decisions else (True,) * len(plan) for d, plan in self._decisions]
        self._ratios = [_ratios(plan) if id(d) in forecasting else (0.0,) * len(plan) for d, plan in self._decisions]
        columns = zip(*(plan for _, plan in self._decisions), *self._keeps, *self._ratios, strict=True)
        all_compute = (True,) * 2 * len(self._decisions) + (0.0,) * len(self._decisions)
        self._patterns = len({*columns, all_compute})
        _warn_if_past_recompile_limit(self.target.model, self._patterns)
        return self

    def _attach_stream_barriers(self, blocks: list[tuple[str, list[Decision]]]) -> None:
        """Shadow each block holding cached layers (module order, with their decisions) with
        :func:`stream_barrier_forward`."""
        for position, (block, decisions) in enumerate(blocks):
            module = self.target.model.get_submodule(block)
            after = blocks[position + 1] if position + 1 < len(blocks) else None
            # the next block of the same list (Flux's single-stream blocks follow its double-stream ones)
            following = after[1] if after is not None and _list_of(after[0]) == _list_of(block) else None
            closes_group = position % BARRIER_EVERY == BARRIER_EVERY - 1
            forward = stream_barrier_forward(module.forward, decisions, following, closes_group, self._whole_model_compiled)
            self._restore.append(shadow_forward(module, forward))

    def decision_patterns(self) -> int:
        """How many distinct compute/reuse combinations of the schedule keys the steps use: under
        ``torch.compile`` each is one graph per compiled region and call slot (a whole-model compile
        sees every key; a per-block one only its block's keys, so it may need fewer). A block cached
        whole computes in two ways eagerly, keeping its residual for the next step or not: two
        patterns; traced, it keeps at every computing step, so compiled graphs may be fewer."""
        return self._patterns

    def disable(self) -> None:
        """Detach: the model's modules are exactly as before and every kept output is released."""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        for outputs in self._outputs:
            outputs.clear()
        self._outputs.clear()
        self._slots = 0
        self._occurrences.clear()
        self._input_shapes.clear()
        self._decisions.clear()
        self._keeps.clear()
        self._ratios.clear()
        self._tracker.reset()

    def reset(self) -> None:
        """Start over at step 0 on the next call (e.g. after an interrupted generation)."""
        self._tracker.reset()

    def __enter__(self) -> Self:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # ---- per model call ---------------------------------------------------------------------
    def _before_model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            step, slot, new_generation = self._tracker.advance()
        except StepMismatchError:
            self._tracker.reset()
            raise
        num_steps = self.schedule.num_steps
        if new_generation:
            self._whole_model_compiled[0] = _compiled_whole(self.target.model)  # compiled between generations
            ran = self._tracker.generation_steps
            if ran is not None and ran != num_steps and self.steps_mismatch == "error":
                self._tracker.reset()
                raise StepMismatchError(
                    f"The schedule has {num_steps} steps but the pipeline is running {ran}; "
                    f"calibrate for {ran} steps, call the pipeline with num_inference_steps={num_steps}, "
                    "or pass steps_mismatch='compute' to compute every step the schedule does not cover"
                    f"{self._multistep_hint(ran)}"
                )
            self._forget_outputs()
            self._marked_step = None
            if compiled_anywhere(self.target.model):
                # CUDA graphs (mode="reduce-overhead"): cudagraph trees recycle a replay's outputs when a
                # new generation starts, at every compiled call until this was called once, then only
                # at each call (for every compiled function of the process, from then on). Kept
                # outputs outlive their step, so a generation must span the denoising loop: marked
                # here, at its first model call, never within it.
                torch.compiler.cudagraph_mark_step_begin()
                self._marked_step = _cudagraph_step_mark() if self._warn_marks else None
        elif self._marked_step is not None and _cudagraph_step_mark() != self._marked_step:
            self._marked_step = None
            self._warn_marks = False  # said once
            logger.warning(
                "torch.compiler.cudagraph_mark_step_begin() was called during a generation: under CUDA graphs "
                "(mode='reduce-overhead') that recycles the outputs the cache keeps between steps. Call it at "
                "most once per generation, before the pipeline call, or not at all: the cache marks each "
                "generation's start itself"
            )
        if slot >= self._slots:
            self._slots = slot + 1
            for outputs in self._outputs:
                outputs.setdefault(slot, None)
        self._check_input_shape(slot, args, kwargs)
        self._branches.before_model_call(slot, args, kwargs, new_generation, self._tracker.reset)
        for occurrence in self._occurrences:
            occurrence[0] = 0
        if step >= num_steps:
            if self.steps_mismatch == "error":
                self._tracker.reset()
                raise StepMismatchError(
                    f"The schedule has {num_steps} steps but the model was called for step {step + 1}; "
                    f"calibrate for {step + 1}+ steps, set calls_per_step if the pipeline calls the model "
                    "several times per step, or pass steps_mismatch='compute'"
                )
            for decision, _ in self._decisions:
                decision.compute, decision.keep, decision.ratio, decision.slot = True, False, 0.0, slot
            return
        for (decision, plan), keeps, ratios in zip(self._decisions, self._keeps, self._ratios, strict=True):
            decision.compute, decision.keep, decision.ratio, decision.slot = plan[step], keeps[step], ratios[step], slot

    def _forget_outputs(self, slot: int | None = None) -> None:
        """Drop the kept outputs of one call slot, or all of them (a new generation). The slots stay,
        emptied: a compiled graph guards on them, and must find them as in the last generation."""
        for outputs in self._outputs:
            for kept_slot in outputs if slot is None else (slot,):
                outputs[kept_slot] = None
        if slot is None:
            self._input_shapes.clear()

    def _check_input_shape(self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A slot called with inputs of another shape than at its last call must not reuse."""
        shape = input_shape(args, kwargs)
        if slot in self._input_shapes and self._input_shapes[slot] != shape:
            logger.debug("Call slot %d changed input shape to %s: its layers compute", slot, shape)
            self._forget_outputs(slot)
        self._input_shapes[slot] = shape

    def _multistep_hint(self, ran: int) -> str:
        """Why a pipeline runs more steps than asked, where its solver evaluates the model twice per step."""
        scheduler = getattr(self.target.pipeline, "scheduler", None)
        order = getattr(scheduler, "order", 1)
        if not isinstance(order, int) or order <= 1:
            return ""
        return (
            f". {type(scheduler).__name__} is a solver of order {order}: it evaluates the model several "
            f"times per step and its timesteps list each evaluation ({ran} here), so calibrate with the same "
            f"scheduler and num_inference_steps: its profile then has {ran} steps"
        )


def _cudagraph_step_mark() -> int | None:
    """cudagraph trees' count of ``cudagraph_mark_step_begin()`` calls (private to torch; None where
    it is not there)."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    box = getattr(trees, "MarkStepBox", None)
    return getattr(box, "mark_step_counter", None)


def _compiled_whole(model: nn.Module) -> bool:
    """Whether ``model`` runs as one compiled graph: ``torch.compile(model)``, ``model.compile()`` or
    ``model.forward = torch.compile(model.forward)``; for :class:`~smoothcache.steps.Experts`, whether
    one of its experts does (each is called on its own)."""
    if isinstance(model, Experts):
        return any(_compiled_whole(expert) for expert in model.children())
    return (
        isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        or getattr(model, "_compiled_call_impl", None) is not None
        or hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable")
    )


def compiled_anywhere(model: nn.Module) -> bool:
    """Whether ``model``, or any module in it, runs compiled."""
    return any(_compiled_whole(module) for module in model.modules())


def _check_blocks_apart(by_key: dict[str, list[CacheableLayer]]) -> None:
    """A block cached whole must not also have its layers cached: reusing the block skips them, so
    their kept outputs would go stale."""
    blocks = {layer.name: key for key, layers in by_key.items() for layer in layers if layer.streams is not None}
    for key, layers in by_key.items():
        for layer in layers:
            block = next((name for name in blocks if layer.name.startswith(name + ".")), None)
            if block is not None:
                raise BlockCachingError(
                    f"Schedule keys {blocks[block]!r} and {key!r} both cache {block}: one caches the block whole, "
                    f"the other its layer {layer.name}. Use a schedule of one kind, e.g. "
                    "profile.schedule(..., keys=[...]) with block keys only or layer keys only"
                )


def _ratios(plan: tuple[bool, ...]) -> tuple[float, ...]:
    """Per step: for a reusing step, the steps since the last compute over the gap between the last
    two computes (0 where there is no earlier compute: plain reuse); 0 for computing steps."""
    ratios, last, previous = [], None, None
    for step, compute in enumerate(plan):
        if compute:
            last, previous = step, last
            ratios.append(0.0)
        else:
            ratios.append((step - last) / (last - previous) if last is not None and previous is not None else 0.0)
    return tuple(ratios)


def _keeps(plan: tuple[bool, ...]) -> tuple[bool, ...]:
    """Per step: whether it computes and the next step reuses, so that its output is needed. (A
    reusing step that finds nothing kept computes and keeps regardless.)"""
    return tuple(now and not following for now, following in pairwise(plan)) + (False,)


def _warn_if_past_recompile_limit(model: nn.Module, patterns: int) -> None:
    """Dynamo runs a function eagerly once it has more graphs than its recompile limit: say so up front."""
    compiled = compiled_anywhere(model)
    limit = torch._dynamo.config.recompile_limit
    if compiled and patterns > limit:
        logger.warning(
            "The schedule uses %d compute/reuse patterns, each one graph under torch.compile, but "
            "torch._dynamo.config.recompile_limit is %d: past it the model runs uncompiled. Raise the "
            "limit to at least %d (twice that if the model compiles two variants of a region itself)",
            patterns, limit, patterns,
        )


def _block_path(layer: CacheableLayer) -> str | None:
    """The module path of the block holding a layer: its parent where that is an indexed block
    (``transformer_blocks.3`` for ``transformer_blocks.3.attn1``), else up to the first index in
    its path (``blocks.3`` for a pattern's ``blocks.3.ff.net.0.proj``); None for a layer in no list."""
    parts = layer.name.split(".")
    if layer.block is not None:
        return ".".join(parts[:-1])
    first_index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return None if first_index is None else ".".join(parts[: first_index + 1])


def _first_of_each_list(block_paths: Sequence[str]) -> set[str]:
    """The first of ``block_paths`` (in module order) in each module list."""
    firsts: dict[str, str] = {}
    for path in block_paths:
        firsts.setdefault(_list_of(path), path)
    return set(firsts.values())


def _list_of(block_path: str) -> str:
    """The module list a block sits in (``transformer_blocks`` for ``transformer_blocks.3``)."""
    return block_path.rpartition(".")[0]


def cache(
    pipe_or_module: Any,
    schedule: Schedule | dict[str, list[int]],
    *,
    components: Sequence[str] | None = None,
    calls_per_step: int | None = None,
    steps_mismatch: Literal["error", "compute"] = "error",
    branches: Sequence[str] | str = "auto",
    forecast: Literal["none", "linear"] = "none",
) -> CacheHandle:
    """Cache ``pipe_or_module``'s layers on ``schedule``; returns an enabled :class:`CacheHandle`.

    ``forecast="linear"``: a reusing step extrapolates each layer's output from its last two computed
    outputs instead of handing back the last one (beyond the paper; TaylorSeer's first-order step).
    It keeps two outputs per layer instead of one; whole blocks, guidance halves and layers called
    several times per block call still reuse plainly.

    ``calls_per_step`` is how often the pipeline calls the model per denoising step; by default it
    is read off the scheduler's step index where it has one, and may then vary from step to step
    (skip-layer guidance), else 1 (see ``steps.StepTracker``). A pipeline with two experts (Wan 2.2
    A14B's ``transformer`` for high noise and ``transformer_2`` for low noise) has both cached
    under one schedule over its steps, as calibrating the pipeline gives: a key's plan governs
    whichever expert runs a step, and ``transformer_2`` computes on its first step, having nothing
    of its own to reuse. To give each expert its own schedule, cache each as a module instead.

    Keys ``"<type>@cond"`` / ``"<type>@uncond"`` (from a profile calibrated with ``branches=``)
    give each half of a classifier-free guidance batch its own plan; where one half computes and
    the other reuses, the layer runs on that half's rows only. ``branches`` is the halves' batch
    order, ``"auto"`` for known pipelines (``guidance.branch_order``).

    >>> with smoothcache.cache(pipe, Schedule.load("schedule.json")):   # doctest: +SKIP
    ...     images = pipe(class_labels=[207], num_inference_steps=50).images
    """
    return CacheHandle(
        pipe_or_module,
        schedule,
        components=components,
        calls_per_step=calls_per_step,
        steps_mismatch=steps_mismatch,
        branches=branches,
        forecast=forecast,
    )
