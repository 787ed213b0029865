"""The cache handle: attaches the forwards a plan asks for, and at each model call sets every
decision to the step's entry of its column.

Data walks one way: ``Schedule`` -> :func:`.plan.plan_cache` (pure: one plan per layer) -> this
handle (attach, advance the step) -> :mod:`.forwards` (compute or reuse). Kept outputs and the
per-call bookkeeping live in one :class:`.state.CacheState`. ``disable()`` puts every module back
exactly.

A call slot (the n-th model call of a step) reuses only what it computed itself earlier in the
same generation, for inputs of the same shape; otherwise it computes, whatever the plan says. So
a call that appears on some steps only (SD3's skip-layer guidance), an expert taking over
(Wan 2.2), a layer its block skips, or a batch that changes size all compute before they reuse. A
layer its block calls several times per call (CogView4's ff, on image then text tokens) keeps one
output per occurrence.

Under ``torch.compile`` the per-layer path is traced into the compiled graph: dynamo reads the
``compute`` flags as constants, so each distinct compute/reuse pattern is one graph, and the kept
outputs are graph inputs (no graph break, no device sync). Patterns are bounded by the schedule
(:meth:`CacheHandle.decision_patterns`); the step bookkeeping runs outside any compiled region, and
nothing the graphs read changes between generations (:mod:`.state`), so a second generation
compiles nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..adapters import CacheableLayer, find_layers
from ..errors import GuidanceError, ModelInUseError, ScheduleError, StepMismatchError
from ..guidance import branch_order, check_cfg_batch, input_shape
from ..keys import Key
from ..ownership import Claim, claim, release
from ..schedule import Schedule
from ..steps import (
    StepTracker,
    attach_step_hooks,
    resolve_target,
    scheduler_step_index,
    step_anchor,
)
from .compile import (
    compiled_anywhere,
    compiled_whole,
    cudagraph_step_mark,
    launches_each_kernel,
    warn_if_past_recompile_limit,
)
from .forwards import (
    Decision,
    KeptForm,
    ShadowedForward,
    block_caching_forward,
    block_forecasting_forward,
    branch_caching_forward,
    caching_forward,
    chained_block_forward,
    forecasting_forward,
    repeated_caching_forward,
    shadow_forward,
    stored_block_caching_forward,
    stored_caching_forward,
    stream_barrier_forward,
)
from .plan import CachePlan, LayerPlan, plan_cache, split_branches
from .regional import ChainedBlock, route_chains, unwrap_compiled_calls
from .state import CacheState
from .streams import BlockChain, BlockStreams, RunKept

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CacheHandle", "cache"]

logger = logging.getLogger(__name__)


# One plan column's kept entries of one kind: (its decision, refilled at every computing call, the entries)
EntryGroup = tuple[Decision, bool, list[dict[int, Any]]]


def _group_of(groups: list[EntryGroup], decision: Decision, refilled: bool) -> list[dict[int, Any]]:
    """The entries of ``groups`` under ``decision`` and ``refilled``, a new group where there is none
    (at enable: a handful of columns)."""
    for known, known_refilled, entries in groups:
        if known is decision and known_refilled == refilled:
            return entries
    entries: list[dict[int, Any]] = []
    groups.append((decision, refilled, entries))
    return entries


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
        kept_device: str | torch.device | None = None,
        kept_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            schedule = Schedule.from_dict(schedule)
        if steps_mismatch not in ("error", "compute"):
            raise ValueError(f"steps_mismatch must be 'error' or 'compute', got {steps_mismatch!r}")
        self.target = resolve_target(pipe_or_module)
        split = split_branches(schedule)  # '@cond'/'@uncond' keys: see plan.split_branches
        self.schedule = split.schedule
        order = branch_order(self.target.pipeline, branches) if split.branch_plans else None
        self.steps_mismatch = steps_mismatch
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        self.forecast = forecast
        planned = (schedule.planned or {}).get("forecast")
        if planned in ("none", "linear") and planned != forecast:
            logger.warning(
                "The schedule was planned for forecast=%r but runs with forecast=%r: its computed steps were placed "
                "for %s, so quality suffers; pass forecast=%r to cache() (the command line's --forecast %s)",
                planned, forecast, "extrapolating reused outputs" if planned == "linear" else "plain reuse", planned, planned,
            )
        if layers is None:
            if components is None:
                components = list(dict.fromkeys(Key.parse(key).layer_type for key in self.schedule.keys))
            layers = find_layers(self.target.model, components, allow_repeated=True)
        model = self.target.model
        self.plan: CachePlan = plan_cache(
            split, list(layers), branch_order=order, forecast=forecast == "linear",
            module_order={name: position for position, (name, _) in enumerate(model.named_modules())},
            model_name=type(model).__name__,
        )
        self.layers = [layer_plan.layer for layer_plan in self.plan.layers]
        self.kept_form = self._kept_form(kept_device, kept_dtype)
        self.state = CacheState()
        self._tracker = StepTracker(
            self.schedule.num_steps, self.target.timesteps, calls_per_step, scheduler_step_index(self.target)
        )
        self._decisions: list[Decision] = []  # one per column of the plan
        # kept entries a computing call replaces, released before it runs, grouped by decision so that a
        # reusing call looks at each column once: (decision, refilled at every computing call rather than
        # only where the next step reuses, the layers' entries); see _release_replaced
        self._replaced: list[EntryGroup] = []
        self._forecasting: list[EntryGroup] = []  # entries keeping two outputs: the older goes
        self._restore: list[Callable[[], None]] = []
        self._with_depth = 0  # nested ``with`` blocks on this handle: the outermost one disables
        self._warned_launch_bound = False  # see _warn_if_launch_bound
        self._chains: dict[int, BlockChain] = {}  # the plan's chains, made at enable
        self._chained_blocks: list[ChainedBlock] = []  # their blocks, for regional compile (see .regional)
        self._anchor: torch.nn.Module | None = None  # the block whose pre-hook marks calls that bypass the model's hooks
        self._marked_by_anchor = False  # while such a call is marked
        if getattr(model, "_parallel_config", None) is not None:  # diffusers' context parallelism
            from ..distributed import check_ranks_agree

            check_ranks_agree(self.schedule, type(model).__name__)
        self.enable()

    # ---- attach / detach --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._restore)

    def enable(self) -> Self:
        """Attach to the model (idempotent). The next model call starts a new generation."""
        if self.enabled:
            return self
        keys = ", ".join(self.schedule.keys)
        claim(self.target.model, Claim(self, f"cached by a smoothcache handle (keys {keys})", self.disable,
                                       "Disable that handle first (handle.disable(), or leave its with block)"))
        self._forget_generation()
        self._decisions = [Decision() for _ in self.plan.columns]
        self._replaced, self._forecasting = [], []
        self._chains, self._chained_blocks = {}, []  # fresh chains, over fresh kept entries
        for layer_plan in self.plan.layers:
            forward = self._forward_for(layer_plan)
            self._restore.append(shadow_forward(layer_plan.layer.module, forward))
        self._barriers_attached = False
        if compiled_whole(self.target.model):
            self._attach_barriers()
        if self.plan.reused_plainly:
            logger.warning(
                "forecast='linear' extrapolates layers' outputs and blocks' residuals; %d cached modules (guidance "
                "branches or layers called several times per step, e.g. %s) reuse their kept outputs plainly",
                len(self.plan.reused_plainly), self.plan.reused_plainly[0],
            )
        first = self.layers[0]
        anchor = step_anchor(self.target.model, first.name, whole_block=first.streams is not None)
        self._anchor = anchor
        # the step bookkeeping is plain Python state: traced, it would put every counter in a guard
        on_model_call = torch.compiler.disable(self._before_model_call)
        on_anchor_call = torch.compiler.disable(self._before_call_marked_by_anchor)
        self._restore.extend(attach_step_hooks(self.target.model, anchor, on_model_call, pass_inputs=True,
                                               on_model_error=self._after_model_error, on_anchor_call=on_anchor_call))
        logger.debug("SmoothCache enabled on %d layers under %d keys", len(self.state.outputs), len(self.schedule.keys))
        warn_if_past_recompile_limit(self.target.model, self.plan.patterns())
        return self

    def _kept_form(self, device: str | torch.device | None, dtype: torch.dtype | None) -> KeptForm | None:
        """Where kept outputs live, where asked for; only plain reuse of layers and blocks converts."""
        if device is None and dtype is None:
            return None
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"kept_dtype must be a floating-point torch.dtype, e.g. torch.bfloat16; got {dtype!r}")
        unsupported = sorted({p.kind for p in self.plan.layers} - {"layer", "block"})
        if unsupported:
            raise ScheduleError(
                f"kept_device/kept_dtype store the outputs of layers and blocks reused plainly; this cache also has "
                f"{', '.join(unsupported)} forwards (forecasting, guidance halves or repeated layers). Leave them out, "
                "or drop forecast= and '@cond'/'@uncond' keys"
            )
        return KeptForm(torch.device(device) if device is not None else None, dtype)

    def _attach_barriers(self) -> None:
        """Shadow the blocks holding cached layers with the stream barrier, which only a model
        compiled whole needs. Only then: a block's forward shadowed eagerly would be wrapped by
        whatever comes later (block-level group offloading), and the cache could not be disabled."""
        for barrier in self.plan.barriers:
            module = self.target.model.get_submodule(barrier.block)
            following = None if barrier.following is None else [self._decisions[c] for c in barrier.following]
            forward = stream_barrier_forward(module.forward, [self._decisions[c] for c in barrier.columns], following,
                                             barrier.closes_group, self.state.whole_model_compiled)
            self._restore.append(shadow_forward(module, forward))
        self._barriers_attached = True

    def _forward_for(self, layer_plan: LayerPlan) -> Callable[..., Any]:
        """The caching forward a layer's plan asks for, reading its decisions and kept outputs."""
        layer, kind = layer_plan.layer, layer_plan.kind
        original, outputs = layer.module.forward, self.state.new_outputs()
        decision = self._decisions[layer_plan.columns[0]]
        if kind in ("layer", "block"):  # guidance halves and repeated layers splice into the entry they replace
            _group_of(self._replaced, decision, refilled=kind == "layer").append(outputs)
        elif kind in ("forecast", "block-forecast"):  # reads the last output, not the one before it
            _group_of(self._forecasting, decision, refilled=True).append(outputs)
        if kind in ("block", "block-forecast"):
            streams = BlockStreams.of(layer.module, layer.name, layer.streams)  # type: ignore[arg-type]
            if self.kept_form is not None:
                one_by_one = stored_block_caching_forward(original, decision, outputs, streams, self.kept_form)
            else:
                make = block_forecasting_forward if kind == "block-forecast" else block_caching_forward
                one_by_one = make(original, decision, outputs, streams, layer_plan.keep_states)
            link = layer_plan.chain
            if link is None:
                return one_by_one
            chain = self._chains.get(link.chain)
            if chain is None:
                chain = BlockChain(link.length, streams, forecast=kind == "block-forecast", form=self.kept_form)
                self._chains[link.chain] = chain
            chain.kept[link.position] = outputs
            inside = [False]
            self._chained_blocks.append(ChainedBlock(layer.module, layer.name, chain, link.position, decision, streams, inside))
            return chained_block_forward(original, decision, chain, link.position, streams, one_by_one, inside)
        if self.kept_form is not None:
            return stored_caching_forward(original, decision, outputs, self.kept_form)
        if kind == "branches":
            second = self._decisions[layer_plan.columns[1]]
            return branch_caching_forward(original, decision, second, outputs, self.state.guidance, f"Layer {layer.name}")
        if kind == "repeated":
            return repeated_caching_forward(original, decision, outputs, self.state.new_occurrence())
        if kind == "forecast":
            return forecasting_forward(original, decision, outputs)
        return caching_forward(original, decision, outputs)

    def decision_patterns(self) -> int:
        """How many distinct compute/reuse combinations of the schedule keys the steps use: under
        ``torch.compile`` each is one graph per compiled region and call slot (a whole-model compile
        sees every key; a per-block one only its block's keys, so it may need fewer). A block cached
        whole computes in two ways eagerly, keeping its residual for the next step or not: two
        patterns; traced, it keeps at every computing step, so compiled graphs may be fewer."""
        return self.plan.patterns()

    def disable(self) -> None:
        """Detach: the model's modules are exactly as before and every kept output is released.

        Raises :class:`ModelInUseError`, changing nothing, where a cached module's ``forward`` was
        replaced after the handle attached (another cache, or a wrapper): putting back what was
        there before would silently drop that change."""
        replaced = [r.module for r in self._restore if isinstance(r, ShadowedForward) and not r.intact()]
        if replaced:
            names = {id(m): n for n, m in self.target.model.named_modules()}
            raise ModelInUseError(
                f"The forward of {names.get(id(replaced[0]), type(replaced[0]).__name__)} (and {len(replaced) - 1} more) "
                "was replaced after smoothcache attached, so disabling would drop that change; undo it first "
                "(disable the other cache or wrapper), then disable this handle"
            )
        unwrap_compiled_calls(self._chained_blocks)
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        release(self.target.model, self)
        for chain in self._chains.values():
            chain.abandon()
        self.state.clear()
        self._decisions = []
        self._tracker.reset()

    def works_between_calls(self) -> bool:
        """Whether the last model call left a chained run open, which the next call's start closes
        on the GPU, outside the model's forward (graphs captured per call would miss that work)."""
        return any(chain.open for chain in self._chains.values())

    def reset(self) -> None:
        """Start over at step 0 on the next call (e.g. after an interrupted generation)."""
        self._forget_generation()

    def _forget_generation(self) -> None:
        self._tracker.reset()
        self.state.thread = None
        for chain in self._chains.values():
            chain.abandon()

    def _after_model_error(self) -> None:
        """A model call raised: its generation cannot go on (unless the call was another thread's, refused)."""
        if self.state.thread in (None, threading.get_ident()):
            self._forget_generation()

    def __enter__(self) -> Self:
        self.enable()  # first: a refused entry never reaches __exit__, so it must not count
        self._with_depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving the outermost ``with`` block on this handle disables it; an inner one does not."""
        self._with_depth = max(0, self._with_depth - 1)
        if self._with_depth == 0:
            self.disable()

    # ---- per model call ---------------------------------------------------------------------
    def _before_call_marked_by_anchor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A model call whose own hooks did not run (the original DiT's ``forward_with_cfg``): its
        first block marked it, from inside that block's call."""
        self._marked_by_anchor = True
        try:
            self._before_model_call(args, kwargs)
        finally:
            self._marked_by_anchor = False

    def _before_model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        num_steps, state, me = self.schedule.num_steps, self.state, threading.get_ident()  # per model call: keep cheap
        running = state.thread is not None and state.last_step < num_steps - 1  # a generation is under way
        if running and me != state.thread:
            state.intruded = True
            raise ModelInUseError(
                f"The cached model was called from another thread while a generation runs in thread {state.thread}: "
                "a cache handle follows one generation at a time. Give each thread its own pipeline (and handle), "
                "or let one pipeline call finish before the next starts (a lock around pipe(...))"
            )
        for chain in self._chains.values():  # a run the last call left open (it skipped the chain's end)
            chain.start_call()
        try:
            step, slot, new_generation = self._tracker.advance(args, kwargs)
        except StepMismatchError:
            self._forget_generation()
            raise
        if new_generation and running and state.intruded:
            # the refused thread's pipeline call reset the scheduler both threads share, mid-generation
            self._forget_generation()
            raise ModelInUseError(
                "Another thread called this pipeline during this generation, which reset the scheduler both share: "
                "this generation cannot continue correctly. Give each thread its own pipeline, or serialize the calls"
            )
        if new_generation:
            state.thread, state.intruded = me, False
            self._start_generation()
        elif state.marked_step is not None and cudagraph_step_mark() != state.marked_step:
            state.marked_step = None
            state.warn_marks = False  # said once
            logger.warning(
                "torch.compiler.cudagraph_mark_step_begin() was called during a generation: under CUDA graphs "
                "(mode='reduce-overhead') that recycles the outputs the cache keeps between steps. Call it at "
                "most once per generation, before the pipeline call, or not at all: the cache marks each "
                "generation's start itself"
            )
        state.last_step = step
        state.new_call(slot, args, kwargs)
        self._check_guidance_batch(slot, args, kwargs)
        if step >= num_steps:
            if self.steps_mismatch == "error":
                self._forget_generation()
                raise StepMismatchError(
                    f"The schedule has {num_steps} steps but the model was called for step {step + 1}; "
                    f"calibrate for {step + 1}+ steps, set calls_per_step if the pipeline calls the model "
                    "several times per step, or pass steps_mismatch='compute'"
                )
            for decision in self._decisions:
                decision.compute, decision.keep, decision.ratio, decision.slot = True, False, 0.0, slot
            self._release_replaced(slot)
            return
        for decision, column in zip(self._decisions, self.plan.columns, strict=True):
            decision.compute, decision.keep, decision.ratio, decision.slot = (
                column.compute[step], column.keep[step], column.ratio[step], slot)
        self._release_replaced(slot)

    def _release_replaced(self, slot: int) -> None:
        """Empty the kept entries this call's computing layers will replace, before the model runs.

        Eagerly an entry is replaced as its layer finishes, but a model compiled whole stores what
        its graph kept only after the graph returns: the entries it replaces would stay alive
        through the whole graph, raising its peak by what they hold (a chained run's residual,
        one hidden state per call slot). A block stores eagerly only where the next step reuses, so
        elsewhere its entry stays, as it was. Forecasting keeps the last two outputs and a computing
        call makes the last one the older: the one before it goes (it is read only by a reusing
        step, and a reuse follows a computing call that keeps)."""
        traced = self.state.whole_model_compiled[0]
        for decision, refilled, entries in self._replaced:
            if decision.compute and (refilled or traced or decision.keep):
                for outputs in entries:
                    outputs[slot] = None
        for decision, _, entries in self._forecasting:
            if decision.compute:
                for outputs in entries:
                    kept = outputs[slot]
                    if isinstance(kept, tuple):  # (last, previous)
                        outputs[slot] = (kept[0], None)
                    elif isinstance(kept, RunKept):  # a chained run's first block
                        kept.previous = None

    def _start_generation(self) -> None:
        state, num_steps = self.state, self.schedule.num_steps
        state.whole_model_compiled[0] = compiled_whole(self.target.model)  # compiled between generations
        if state.whole_model_compiled[0] and not self._barriers_attached:  # compiled after cache()
            self._attach_barriers()
        ran = self._tracker.generation_steps
        if ran is not None and ran != num_steps and self.steps_mismatch == "error":
            self._forget_generation()
            raise StepMismatchError(
                f"The schedule has {num_steps} steps but the pipeline is running {ran}; "
                f"calibrate for {ran} steps, call the pipeline with num_inference_steps={num_steps}, "
                "or pass steps_mismatch='compute' to compute every step the schedule does not cover"
                f"{self._multistep_hint(ran)}"
            )
        state.new_generation()
        compiled = compiled_anywhere(self.target.model)
        route_chains(self.target.model, self._chained_blocks, state.whole_model_compiled[0], self._anchor,
                     marked_by_anchor=self._marked_by_anchor)
        if compiled:
            # CUDA graphs (mode="reduce-overhead"): cudagraph trees recycle a replay's outputs when a
            # new generation starts, at every compiled call until this was called once, then only
            # at each call (for every compiled function of the process, from then on). Kept
            # outputs outlive their step, so a generation must span the denoising loop: marked
            # here, at its first model call, never within it.
            torch.compiler.cudagraph_mark_step_begin()
            state.marked_step = cudagraph_step_mark() if state.warn_marks else None
            self._warn_if_launch_bound()

    def _warn_if_launch_bound(self) -> None:
        """Once per handle: layers cached on a GPU under torch.compile without CUDA graphs. A reusing
        step then still launches, one by one from the host, the kernels of every block's norms,
        modulation and gates; where launches set the pace (a small model or batch) a cached
        generation gains little and can be slower than an uncached one."""
        if self._warned_launch_bound or all(layer.streams is not None for layer in self.layers):
            return
        self._warned_launch_bound = True
        if not launches_each_kernel(self.target.model):
            return
        logger.warning(
            "Layers are cached under torch.compile without CUDA graphs: a reusing step still launches its blocks' "
            "norm, modulation and gate kernels from the host, so where launches set the pace (a small model or "
            "batch) caching gains little and can be slower than no cache. Cache whole blocks (components=['block']), "
            "compile with CUDA graphs (mode='reduce-overhead') or replay steps from graphs (smoothcache.step_graphs); "
            "smoothcache bench --compile model measures it"
        )

    def _check_guidance_batch(self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Where guidance halves are cached apart: the call must batch guidance; its halves are compared
        once per slot and input shape (the comparison syncs)."""
        if not self.plan.splits_guidance:
            return
        seen = (slot, input_shape(args, kwargs))
        try:
            self.state.guidance.rows = check_cfg_batch(args, kwargs, compare=seen not in self.state.guidance_checked)
        except GuidanceError:
            self._forget_generation()
            raise
        self.state.guidance_checked.add(seen)

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


def cache(
    pipe_or_module: Any,
    schedule: Schedule | dict[str, list[int]],
    *,
    components: Sequence[str] | None = None,
    calls_per_step: int | None = None,
    steps_mismatch: Literal["error", "compute"] = "error",
    branches: Sequence[str] | str = "auto",
    forecast: Literal["none", "linear"] = "none",
    kept_device: str | torch.device | None = None,
    kept_dtype: torch.dtype | None = None,
) -> CacheHandle:
    """Cache ``pipe_or_module``'s layers on ``schedule``; returns an enabled :class:`CacheHandle`.

    ``forecast="linear"``: a reusing step extrapolates each layer's output (a whole block's residual)
    from its last two computed ones instead of handing back the last one (beyond the paper;
    TaylorSeer's first-order step). It keeps two outputs per layer instead of one; guidance halves
    cached apart and layers called several times per block call still reuse plainly.

    Whole blocks (the ``"block"`` component) on one key for a whole module list reuse the list as
    one chain: one kept residual per stream for the list, not one per block (see
    :class:`~smoothcache.runtime.streams.BlockChain`).

    ``kept_device`` / ``kept_dtype`` store kept outputs elsewhere (``"cpu"``) or in a lower precision
    (``torch.bfloat16``, ``torch.float8_e4m3fn``) and convert them back on reuse: less memory held by
    the cache for a copy per keep and per reuse (and, for a lower precision, rounded reuses). Plain
    reuse of layers and whole blocks only (not with forecasting or guidance halves cached apart); keep
    them on the device under CUDA graphs.

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
        kept_device=kept_device,
        kept_dtype=kept_dtype,
    )
