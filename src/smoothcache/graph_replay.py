"""Replay each denoising step's model call from a CUDA graph captured once (opt-in, CUDA only).

Where a step's GPU work is short (batch 1, or a step that reuses), the host's time per model call
sets the pace. Under ``torch.compile(mode="reduce-overhead")`` that time is dynamo's guard check,
gathering the graph's inputs and cudagraph trees' bookkeeping before the launch
(``docs/speed.md``). :func:`step_graphs` takes the model call off that path: the pipeline's model
runs as it is for ``warmup_generations`` generations (compiling where it is compiled, without CUDA
graphs), the next generation captures each call as a ``torch.cuda.CUDAGraph``, and later
generations copy each call's tensors into the captured inputs and replay.

Why one graph per step rather than one per compute/reuse pattern: a step's graph reads what the
cache kept at earlier steps at the addresses the capture saw, and a generation's graphs share one
memory pool, which is safe only when they replay in the order they were captured. So a graph is
keyed by the call's step and slot (its place in the generation) and by the call's signature (every
tensor's shape, dtype and device, every other argument's value); a generation replays from its
first call, in order, or not at all, and calls off that order run as they are. Everything the graphs
baked in (parameters, buffers, the modules' forwards, so a cache attached or removed) is checked
at each generation's start; a change drops every graph and starts over.

The model's own hooks still run at every call (the cache's step bookkeeping among them, except
where the model is a compiled wrapper: then the hooks of the model inside it are in the graphs);
its ``forward`` does not, which is the point: the kernels it launched are replayed. Outputs are the
replayed graph's, copied out by default so that nothing the pipeline holds is overwritten by a
later replay. A call is captured only once it has run as it is ``warmup_generations`` times (so
nothing compiles inside a capture), into inputs laid out like the warm-up's (an expanded timestep
stays expanded: dynamo guards on strides). A generation replays its set's graphs in the order
they were captured: one that meets a call other than the set's next (uncaptured, or a captured
call left out before it) replays up to it and runs the rest as it is; a cache then computes where
it would reuse until each layer computes again, as it forgot its kept outputs at the generation's
start and the replays kept none (that image is not the cache's exactly, and a warning says so);
the next generation captures the whole set again. A capture that fails leaves the model's Python
state (the cache's kept outputs) unknown mid-generation: step graphs then
detach and raise :class:`~smoothcache.errors.GraphCaptureError`, and the next ``pipe(...)`` runs
without them. Each generation's set of graphs (named by its first call and its step count) has
its own pool and is looked up alone; the ``max_sets`` used last are kept. Calls whose arguments
cannot be captured (a tensor off the GPU, a tensor subclass, an object that is not a plain value)
run as they are. The wrapper is kept out of dynamo: a model compiled after step graphs attach runs
its calls through them eagerly rather than tracing the capture.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils import _pytree as pytree

from .errors import GraphCaptureError
from .ownership import holder
from .runtime.compile import cuda_graphs_anywhere
from .runtime.forwards import ShadowedForward, shadow_forward
from .runtime.handle import CacheHandle
from .steps import Experts, StepTracker, resolve_target, scheduler_step_index

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["GraphStats", "StepGraphs", "step_graphs"]

logger = logging.getLogger(__name__)


# Calls counted towards their warm-up, at most: a pipeline whose calls never repeat a signature
# (a new resolution every time) would otherwise grow the count without end. Past it the counts
# start over, which costs each signature one more plain generation.
SEEN_LIMIT = 1 << 16

# Generations in a row that find the model changed (so nothing replays) before a warning says so
CHANGED_IN_A_ROW = 3


class Replay(Protocol):
    """A captured call: copy fresh inputs in, run, hand back the outputs it wrote."""

    def __call__(self, leaves: list[Any]) -> Any: ...


class CudaCapture:
    """Captures calls as CUDA graphs on one side stream of the model's device; each capture
    generation has its own pool."""

    device_types = ("cuda",)  # the devices whose tensors it can take as captured inputs

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool: Any = None

    def new_pool(self) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what the allocator holds unused can go to the new pool
            self.pool = torch.cuda.graph_pool_handle()

    def run_plain(self, call: Callable[[], Any]) -> Any:
        """A warm-up call, on the stream captures use (as torch's CUDA graph notes advise)."""
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                output = call()
            torch.cuda.current_stream().wait_stream(self.stream)
        return output

    def __call__(self, forward: Callable[..., Any], leaves: list[Any], spec: Any, _: Any) -> tuple[Replay, Any]:
        static = static_inputs(leaves)
        args, kwargs = pytree.tree_unflatten(static, spec)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            # capture_begin/end rather than torch.cuda.graph(), which collects garbage and empties
            # the allocator's cache at every capture (one generation captures every step). cuBLAS's
            # workspace is cleared around the capture, as cudagraph trees do: a graph must not bake
            # in a workspace that another user of CUDA graphs in the process frees.
            torch._C._cuda_clearCublasWorkspaces()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    output = forward(*args, **kwargs)
                except BaseException:
                    with contextlib.suppress(Exception):  # the call's own error is the one to report
                        graph.capture_end()
                    self._end_failed_capture()
                    # cuBLAS keeps the workspace it allocated inside the capture, in its pool, for
                    # the next call on this stream: cleared, or the pool's memory stays reserved
                    torch._C._cuda_clearCublasWorkspaces()
                    raise
                graph.capture_end()
            torch.cuda.current_stream().wait_stream(self.stream)
            torch._C._cuda_clearCublasWorkspaces()

        def replay(fresh: list[Any]) -> Any:
            copy_inputs(static, fresh)
            graph.replay()
            return output

        with torch.cuda.device(self.device):
            return replay, replay(leaves)

    def _end_failed_capture(self) -> None:
        """Torch before 2.12 leaves the allocator routing this thread's allocations into the pool
        after a capture that failed (its ``capture_end`` raises before it ends that, pytorch#180395),
        and its ``reset()`` never releases a failed graph's hold on the pool (pytorch#190348): later
        ``empty_cache()`` calls then free nothing (or assert) and the pool's memory stays reserved.
        End both where torch did not. A torch that ended the routing itself is left to release the
        pool itself: releasing it twice would fail an assertion in the graph's destructor, so a
        torch with the first fix and not the second keeps the pool reserved (its bug, not undone
        here); so does ROCm, whose branches took the fixes in another order. Never raises: the
        capture's own error is the one to report."""
        if self.pool is None:
            return
        end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
            torch._C, "_cuda_endAllocateCurrentStreamToPool", None)  # its name before torch 2.8
        if end is None:
            return
        try:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                end(index, self.pool)
            except RuntimeError:  # "not currently recording": torch ended it
                return
            if torch.version.hip is None:
                torch._C._cuda_releasePool(index, self.pool)
        except Exception:  # cleanup after a failure must not hide it
            logger.debug("Could not end the failed capture's pool", exc_info=True)


def _distinct(tensor: torch.Tensor) -> torch.Tensor:
    """The view of ``tensor`` with each element once: a dimension expanded (stride 0) taken at index 0."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for stride, size in zip(tensor.stride(), tensor.shape, strict=True))
    return tensor[index]


def static_inputs(leaves: list[Any]) -> list[Any]:
    """The captured inputs: each tensor copied into one of the same shape, strides and dtype (dynamo
    guards on strides, so a contiguous copy of an expanded timestep would compile again inside the
    capture); a tensor passed twice stays one tensor."""
    made: dict[int, torch.Tensor] = {}
    static: list[Any] = []
    with torch.no_grad():
        _fill_static(leaves, made, static)
    return static


def _fill_static(leaves: list[Any], made: dict[int, torch.Tensor], static: list[Any]) -> None:
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            static.append(leaf)
            continue
        if id(leaf) not in made:
            target = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device)
            _distinct(target).copy_(_distinct(leaf))
            target.requires_grad_(leaf.requires_grad)  # dynamo guards on it
            made[id(leaf)] = target
        static.append(made[id(leaf)])


def copy_inputs(static: list[Any], fresh: list[Any]) -> None:
    """A call's tensors into the captured inputs (each distinct element once)."""
    done: set[int] = set()
    for target, given in zip(static, fresh, strict=True):
        if isinstance(target, torch.Tensor) and target is not given and id(target) not in done:
            if 0 in given.stride():
                _distinct(target).copy_(_distinct(given))
            else:
                target.detach().copy_(given)
            done.add(id(target))


@dataclass
class GraphStats:
    """What the graphs did: calls captured, replayed and run as they are; times everything was dropped."""

    captured: int = 0
    replayed: int = 0
    plain: int = 0
    invalidated: int = 0
    incomplete: int = 0  # generations that met an uncaptured call after replaying (their set is captured again)
    capture_error: str | None = None


# non-tensor arguments a key holds by value; any other object (which may hold tensors a graph would
# bake in) makes its call run as it is
_VALUE_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


class StepGraphs:
    """Step graphs on one pipeline's model; ``disable()`` (or leaving a ``with`` block) removes them."""

    def __init__(self, pipe: Any, *, warmup_generations: int = 1, copy_outputs: bool = True,
                 max_sets: int = 4, capture: Any = None) -> None:
        self.target = resolve_target(pipe)
        if self.target.pipeline is None or getattr(self.target.pipeline, "scheduler", None) is None:
            raise TypeError("step_graphs needs a diffusers pipeline with a scheduler: its timesteps mark each generation")
        if isinstance(self.target.model, Experts):
            raise TypeError("step_graphs takes a pipeline with one transformer; this one has two experts (Wan 2.2)")
        if cuda_graphs_anywhere(self.target.model):
            raise ValueError(
                "The model is compiled with CUDA graphs (mode='reduce-overhead'), which step_graphs replaces: "
                "compile it without them (torch.compile(model), default mode), then call step_graphs"
            )
        _refuse_compiled_in_place(self.target.model)
        if max_sets < 1:
            raise ValueError(f"max_sets must be >= 1, got {max_sets}")
        if warmup_generations < 1:
            raise ValueError(f"warmup_generations must be >= 1 (the first generation compiles), got {warmup_generations}")
        self.warmup_generations, self.copy_outputs, self.max_sets = warmup_generations, copy_outputs, max_sets
        if capture is None:
            capture = CudaCapture(next(p.device for p in self.target.model.parameters()))
        self.capture = capture
        self._device_types: tuple[str, ...] | None = getattr(capture, "device_types", None)  # None: any
        self.stats = GraphStats()
        self._tracker = StepTracker(None, self.target.timesteps, None, scheduler_step_index(self.target))
        self._seen: dict[Hashable, int] = {}  # plain runs of each key, towards its warm-up
        self._fingerprint: tuple[Any, ...] | None = None
        self._mode = "plain"  # this generation: "plain", "capture" or "replay"
        self._name: Hashable | None = None  # this generation's set: its first key and step count
        self._order: list[Hashable] = []  # a replayed generation: its set's keys in the order captured
        self._captured_to, self._capture_steps = -1, 0  # a capture generation: its last step captured, of how many
        self._position = 0  # and how many of them this generation has replayed
        # Each generation's graphs: one set per name, least recently used first. A set holds a pool
        # (a forward's working memory) and every step's inputs and outputs, so at most max_sets are
        # kept; a generation looks up only its own set (another set's graphs read other kept outputs)
        self._sets: dict[Hashable, dict[Hashable, Replay]] = {}
        self._shadow: ShadowedForward | None = None
        self._warned_wrapped = False
        self._changed_in_a_row = 0  # generations in a row that found the model changed
        self.enable()

    @property
    def graphs(self) -> int:
        return sum(len(graphs) for graphs in self._sets.values())

    def enable(self) -> Self:
        if self._shadow is None:
            current = self.target.model.__dict__.get("forward")
            if getattr(current, "_smoothcache_step_graphs", None) is not None:
                raise ValueError("This model already replays step graphs: disable those first (graphs.disable())")
            # kept out of dynamo: a model compiled after this (or in place, model.compile()) then runs
            # its calls through here eagerly instead of tracing the capture and the replays
            forward = torch.compiler.disable(self._forward(self.target.model.forward))
            forward._smoothcache_step_graphs = self  # type: ignore[attr-defined]
            self._shadow = shadow_forward(self.target.model, forward)
        return self

    def disable(self) -> None:
        """Put the model's ``forward`` back exactly and drop every graph."""
        if self._shadow is None:
            return
        if not self._shadow.intact():
            raise RuntimeError("The model's forward was replaced after step_graphs attached; undo that first")
        self._shadow()
        self._shadow = None
        self.drop()

    def drop(self) -> None:
        """Forget every graph (they are captured again after the warm-up); the next call starts a
        generation. Meant for between generations: in the middle of a replayed one, the rest runs
        as it is (a warning says what that means for a cache)."""
        if self._mode == "replay" and 0 < self._position < len(self._order):
            self._warn_incomplete(f"Step graphs were dropped after {self._position} replayed calls of this generation")
        self._forget_graphs()
        self._tracker.reset()
        self._mode = "plain"

    def _forget_graphs(self) -> None:
        self._sets.clear()
        self._seen.clear()

    def __enter__(self) -> Self:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # ---- per call ---------------------------------------------------------------------------
    def _forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            step, slot, new_generation = self._tracker.advance(args, kwargs)
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key = self._key(step, slot, leaves, spec)
            if new_generation:
                # a named range in profiler traces: the model check's share of a generation's start
                with torch.profiler.record_function("smoothcache.step_graphs: new generation"):
                    self._start_generation(key)
            if self._mode == "replay":
                # the set's next call, or none: a graph replayed out of order (a call skipped, as
                # guidance left out on a step) would read kept outputs the skipped graph did not write
                expected = self._order[self._position] if self._position < len(self._order) else None
                if key is not None and key == expected:
                    self._position += 1
                    self.stats.replayed += 1
                    return self._out(self._sets[self._name][key](leaves))
                # Replays run none of the model's Python: the cache forgot its kept outputs at this
                # generation's start and replays kept nothing, so plain calls from here on compute
                # where the schedule reuses, until each layer computes again. The set is
                # incomplete: the next generation captures it again.
                self.stats.incomplete += 1
                self._warn_incomplete(f"Step {step + 1} (call {slot + 1}) of this generation is not the next captured "
                                      "call (the calls changed since the capture)")
                self._sets.pop(self._name, None)
                self._mode = "plain"
            if key is not None and self._mode == "capture" and self._seen.get(key, 0) >= self.warmup_generations:
                return self._out(self._captured(original, key, leaves, spec))
            if self._mode == "capture":  # a call not warmed up: later captures would read its plain state
                self._sets.pop(self._name, None)  # and a partial set would only be replayed up to here
                self._mode = "plain"
            self.stats.plain += 1
            if key is not None:
                if len(self._seen) >= SEEN_LIMIT and key not in self._seen:  # signatures without end: start counting afresh
                    self._seen.clear()
                self._seen[key] = self._seen.get(key, 0) + 1
            run_plain = getattr(self.capture, "run_plain", None)
            return run_plain(lambda: original(*args, **kwargs)) if run_plain else original(*args, **kwargs)

        return forward

    def _key(self, step: int, slot: int, leaves: list[Any], spec: pytree.TreeSpec) -> Hashable | None:
        """The call's place and signature: each tensor's layout and which earlier argument it is (a
        tensor passed twice is one captured input), each other argument's value, and the modes the
        kernels depend on. None, so the call runs as it is, where an argument cannot be captured: a
        tensor off the GPU (read on the host at launch), a tensor subclass, an object not a plain value."""
        signature: list[Hashable] = []
        first_seen: dict[int, int] = {}
        grad = torch.is_grad_enabled()
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if type(leaf) is not torch.Tensor or (
                        self._device_types is not None and leaf.device.type not in self._device_types):
                    return None
                if grad and leaf.requires_grad:  # a replay's output would hang off the capture's autograd graph
                    return None
                same = first_seen.setdefault(id(leaf), position)
                signature.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad, same))
            elif isinstance(leaf, _VALUE_TYPES):
                signature.append((type(leaf), leaf))
            else:
                return None
        autocast = torch.is_autocast_enabled("cuda")
        modes = (grad, torch.is_inference_mode_enabled(), autocast, torch.get_autocast_dtype("cuda") if autocast else None)
        return (step, slot, spec, tuple(signature), modes)

    def _start_generation(self, first: Hashable | None) -> None:
        if self._mode == "capture" and self._captured_to < self._capture_steps - 1:  # cut short (interrupted)
            self._sets.pop(self._name, None)  # a partial set would replay its steps, then fall back
        self._check_compile_order()
        fingerprint = model_fingerprint(self.target.model)
        if self._fingerprint is not None and fingerprint != self._fingerprint and (self._sets or self._seen):
            logger.info("The model changed (parameters, buffers, forwards or hooks inside it): its step graphs are captured again")
            self.stats.invalidated += 1
            self._forget_graphs()
            self._changed_in_a_row += 1
            if self._changed_in_a_row == CHANGED_IN_A_ROW:
                logger.warning(
                    "The model changed between each of the last %d generations, so step graphs never get to replay: "
                    "something moves or replaces its weights or hooks at every generation (CPU offloading does; so "
                    "does loading or switching adapters per call). Remove that, or disable step_graphs", CHANGED_IN_A_ROW)
        else:
            self._changed_in_a_row = 0
        self._fingerprint = fingerprint
        timesteps = self.target.timesteps()
        self._name = None if first is None else (first, None if timesteps is None else len(timesteps))
        if self._name is not None and self._name in self._sets:
            self._mode = "replay"
            self._sets[self._name] = self._sets.pop(self._name)  # the most recently used
            self._order, self._position = list(self._sets[self._name]), 0
        elif first is not None and self._seen.get(first, 0) >= self.warmup_generations:
            self._refuse_host_kept_outputs()
            self._mode = "capture"
            while len(self._sets) >= self.max_sets:
                self._sets.pop(next(iter(self._sets)))
            self._sets[self._name] = {}
            self._captured_to, self._capture_steps = -1, self._tracker.generation_steps or 0
            new_pool = getattr(self.capture, "new_pool", None)
            if new_pool is not None:
                new_pool()  # graphs of one generation share a pool, replayed in the order captured
        else:
            self._mode = "plain"

    def _captured(self, original: Callable[..., Any], key: Hashable, leaves: list[Any], spec: Any) -> Any:
        """Capture the call and return its outputs. Where it cannot be captured the model's Python
        ran part way (the cache's kept outputs are unknown), so the generation cannot go on: detach
        and say so. Likewise where the cache left GPU work for the next call's start (a chained run
        left open), which no graph of a call would hold."""
        try:
            replay, output = self.capture(original, leaves, spec, key)
            cache = self._cache()
            if cache is not None and cache.works_between_calls():
                raise RuntimeError("the cache closes a run of whole blocks at the next call's start, outside any call")
        except Exception as error:
            self.stats.capture_error = f"{type(error).__name__}: {error}"[:500]
            self.disable()
            raise GraphCaptureError(
                f"A call of the model could not be captured as a CUDA graph ({type(error).__name__}: "
                f"{str(error)[:300]}), so step graphs detached themselves and this generation stopped; "
                "the next pipe(...) runs without them. A model whose forward waits for the GPU (.item(), "
                "a host copy) or changes shape from call to call cannot be replayed from graphs"
            ) from error
        self._sets[self._name][key] = replay
        self._captured_to = max(self._captured_to, key[0])  # type: ignore[index]
        self.stats.captured += 1
        return output

    def _warn_incomplete(self, where: str) -> None:
        if self._cache() is not None:  # it kept nothing during the replays
            logger.warning(
                "%s: it and the rest run as they are, and the cache, which kept nothing during the replayed steps, "
                "computes where its schedule reuses until each layer computes again, so this image differs "
                "slightly from the cache's alone (closer to uncached). The next generation captures again", where)
        else:  # the plain path from here on: the same output
            logger.info("%s: it and the rest run as they are; the next generation captures again", where)

    def _check_compile_order(self) -> None:
        """The wrapper is kept out of dynamo, so compiling must come first and as a wrapper: a model
        compiled in place (``model.compile()``) is refused; one wrapped after attaching runs eagerly,
        which is said once."""
        model = self.target.model
        if getattr(model, "_compiled_call_impl", None) is not None:
            self.disable()
            _refuse_compiled_in_place(model)
        called = getattr(self.target.pipeline, "transformer", model)
        if called is not model and getattr(called, "_orig_mod", None) is model and not self._warned_wrapped:
            self._warned_wrapped = True
            logger.warning(
                "The transformer was compiled after step_graphs attached: its calls go through step graphs eagerly, "
                "uncompiled. Disable step graphs, compile (pipe.transformer = torch.compile(pipe.transformer)), then "
                "call smoothcache.step_graphs(pipe)"
            )

    def _refuse_host_kept_outputs(self) -> None:
        """A cache keeping its outputs on the host copies them outside the graphs' memory: refused."""
        cache = self._cache()
        form = None if cache is None else cache.kept_form
        if form is not None and form.device is not None and form.device.type != "cuda":
            raise ValueError(
                "The cache keeps its outputs on the host (kept_device='cpu'); CUDA graphs cannot replay copies to "
                "memory the cache frees between generations. Keep them on the GPU (kept_dtype= still saves memory) "
                "or disable step_graphs"
            )

    def _cache(self) -> CacheHandle | None:
        """The cache on the model, if one holds it (a calibration may hold it instead)."""
        held = holder(self.target.model)
        return held if isinstance(held, CacheHandle) else None

    def _out(self, output: Any) -> Any:
        if not self.copy_outputs:
            return output
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)


def _refuse_compiled_in_place(model: nn.Module) -> None:
    """The wrapper is kept out of dynamo, so a model compiled in place would run through it eagerly."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(
            "The model was compiled in place (model.compile()), which step graphs would run eagerly: compile it "
            "as a wrapper (pipe.transformer = torch.compile(pipe.transformer)) before calling step_graphs"
        )


def model_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What a captured graph baked in: each module (its identity and class: a module swapped for
    another is seen even where it holds no weights), its parameters' and buffers' tensors (their
    identity too: a quantized weight's data pointer says nothing), storage, shape and dtype, and
    its Python state that its kernels depend on (other attributes its forward reads are baked in
    unseen: after changing one, call ``drop()``). The model's own hooks are left out: they run
    around the replaced forward, on every call, replays included, and no graph holds them.

    Taken at every generation's first call, before the GPU has work, so it reads each module's own
    dictionaries rather than building every parameter's dotted name."""
    modules = tuple(
        (id(module), type(module), tuple(map(id, module._modules.values())), _tensors_of(module),
         *_module_state(module, hooks=module is not model))
        for module in model.modules()  # each module once: its children's identities say where it is registered
    )
    # hooks for every module (torch.nn.modules.module.register_module_forward_hook) run inside too
    everywhere = tuple(_global_forward_pre_hooks), tuple(_global_forward_hooks)
    return modules, everywhere


def _tensors_of(module: nn.Module) -> tuple[Any, ...]:
    """The module's own parameters and buffers (not its children's), by name, as a graph sees them."""
    return tuple(
        (name, id(t), t.data_ptr(), t.shape, t.dtype)
        for name, t in (*module._parameters.items(), *module._buffers.items()) if t is not None
    )


def _module_state(module: nn.Module, *, hooks: bool = True) -> tuple[Any, ...]:
    """A replaced forward, training mode, hooks (where ``hooks``), the attention processor and its
    backend, and peft's adapter switches, merges (``fuse_lora`` adds to the weights in place) and
    scales (read from the instance's own attributes: a missing one through ``nn.Module`` costs)."""
    own = vars(module)
    scaling = own.get("scaling")
    processor = own.get("processor", module._modules.get("processor"))
    return (
        id(own.get("forward")), module.training,
        (tuple(module._forward_pre_hooks), tuple(module._forward_hooks)) if hooks else None,
        id(processor), repr(getattr(processor, "_attention_backend", None)),
        repr(own.get("_active_adapter")), own.get("_disable_adapters"), tuple(own.get("merged_adapters", ())),
        tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None,
    )


def step_graphs(pipe: Any, *, warmup_generations: int = 1, copy_outputs: bool = True, max_sets: int = 4) -> StepGraphs:
    """Replay the pipeline's model calls from CUDA graphs captured once per step; returns the handle.

    Works cached (``smoothcache.cache``, before or after) or not, eager or compiled without CUDA
    graphs; outputs are the plain path's (the same kernels, replayed), except, with a cache, in a
    generation whose calls change after its first (it replays up to the change, then runs as it
    is, computing where the cache would reuse, and warns). To check that, compare with the same
    compiled model after ``disable()``: a second torch.compile of a model can itself differ a
    little from the first. The first
    ``warmup_generations`` generations run as they are (compiling), the next captures. A change of
    parameters, hooks or caches is noticed and captured afresh; each signature (batch size,
    resolution) gets its own set of graphs, of which the ``max_sets`` used last are kept.

    >>> graphs = smoothcache.step_graphs(pipe)                        # doctest: +SKIP
    >>> images = pipe(prompt, num_inference_steps=28).images          # doctest: +SKIP
    """
    model = resolve_target(pipe).model
    device = next((p.device for p in model.parameters()), None)
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"step_graphs replays CUDA graphs: the model must be on a CUDA device (it is on {device})")
    return StepGraphs(pipe, warmup_generations=warmup_generations, copy_outputs=copy_outputs, max_sets=max_sets)
