"""The cache under torch.compile: same outputs as eager, one graph per compute/reuse pattern, no
graph break inside a compiled region, no recompilation after the first generation, and every
layer computes exactly as scheduled. Dynamo only (``backend="eager"``): the inductor changes
nothing about guards and graph breaks, and would make these tests slow on a CPU."""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline
from torch import nn

import smoothcache
from smoothcache import Schedule

# attn1 and ff take turns: all four compute/reuse combinations occur
ATTN1 = (1, 0, 0, 1, 0, 1, 0, 1, 0, 1)
FF = (1, 1, 0, 1, 0, 0, 1, 1, 0, 1)
SCHEDULE = Schedule({"attn1": ATTN1, "ff": FF})
# every layer computes, or every layer reuses: two patterns, for tests that need reuse but not all four
# patterns (each pattern is a graph to trace)
ALTERNATE = Schedule.fixed_interval(["attn1", "ff"], STEPS, 2)


class GraphCounter:
    """A dynamo backend that runs each graph as traced and counts graphs made and graph calls."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)

        def run(*args: object) -> object:
            self.calls += 1
            return gm.forward(*args)

        return run

    def attention_calls(self, gm: torch.fx.GraphModule) -> int:
        return sum(node.target is torch._C._nn.scaled_dot_product_attention for node in gm.graph.nodes)


class ExecutionCounter:
    """Counts real executions of modules inside compiled graphs too: the count is a tensor the graph
    increments (a Python int would be a guard, and recompile at every call)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.hits = torch.zeros((), dtype=torch.int64)
        for module in modules:
            module.register_forward_hook(self._hit)

    def _hit(self, *args: object) -> None:
        self.hits.add_(1)

    def take(self) -> int:
        count = int(self.hits)
        self.hits.zero_()
        return count


@contextlib.contextmanager
def fresh_compiler() -> Iterator[None]:
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    finally:
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    with fresh_compiler():
        yield


def counted_pipeline():
    pipe = make_dit_pipeline()
    blocks = pipe.transformer.transformer_blocks
    return pipe, ExecutionCounter([b.attn1.to_q for b in blocks]), ExecutionCounter([b.ff.net[2] for b in blocks])


def eager_cached(pipe, schedule: Schedule = SCHEDULE) -> torch.Tensor:
    with smoothcache.cache(pipe, schedule):
        return generate(pipe)


@dataclass
class CompiledRun:
    """What one compiled, cached pipeline did: two generations in one ``cache()``, the second under
    ``error_on_recompile``. Several tests check the same run, so each is made once (module fixtures below)
    and only read by the tests; nothing runs the compiled model again."""

    pipe: object  # its transformer compiled; the cache is off again
    backend: GraphCounter
    expected: torch.Tensor  # the same schedule, eagerly, before compiling
    first: torch.Tensor
    second: torch.Tensor
    graphs_after_first: int
    graphs_after_second: int
    second_calls: int  # graph calls of the second generation
    attn_computes: int  # attn1 (to_q) executions over both generations, every block
    ff_computes: int
    decision_patterns: int
    marks: int  # cudagraph-trees steps the cache marked over the two generations
    graphs_after_uncached: int | None = None  # after one more generation with the cache off

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        """The graphs of the two cached generations."""
        return self.backend.graphs[:self.graphs_after_second]


def compiled_run(compile_model: Callable[[object, GraphCounter], None], schedule: Schedule = SCHEDULE) -> CompiledRun:
    """A counted pipeline cached with ``schedule``: eagerly, then compiled by ``compile_model`` twice."""
    pipe, attn, ff = counted_pipeline()
    expected = eager_cached(pipe, schedule)
    attn.take(), ff.take()
    backend = GraphCounter()
    compile_model(pipe, backend)
    marks = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        with smoothcache.cache(pipe, schedule) as handle:
            first = generate(pipe)
            graphs_after_first = len(backend.graphs)
            backend.calls = 0
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = generate(pipe)
            patterns = handle.decision_patterns()
    return CompiledRun(pipe, backend, expected, first, second, graphs_after_first, len(backend.graphs), backend.calls,
                       attn.take(), ff.take(), patterns, len(marks))


def compile_whole(pipe, backend: GraphCounter) -> None:
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)


@pytest.fixture(scope="module")
def whole() -> CompiledRun:
    """SCHEDULE, the transformer compiled whole by a wrapper (as diffusers' docs do; the step hook
    then sits on the wrapper); then one generation with the cache off."""
    with fresh_compiler():
        run = compiled_run(compile_whole)
        generate(run.pipe)
        run.graphs_after_uncached = len(run.backend.graphs)
    return run


@pytest.fixture(scope="module")
def whole_in_place() -> CompiledRun:
    """SCHEDULE, the transformer compiled whole in place (``module.compile()``)."""
    with fresh_compiler():
        return compiled_run(lambda pipe, backend: pipe.transformer.compile(backend=backend))


@pytest.fixture(scope="module")
def regional() -> CompiledRun:
    """SCHEDULE, each block compiled on its own (regional compile)."""

    def compile_blocks(pipe, backend: GraphCounter) -> None:
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend=backend)

    with fresh_compiler():
        return compiled_run(compile_blocks)


@pytest.fixture(scope="module")
def chained_blocks() -> CompiledRun:
    """Both blocks cached whole under one key, with FF's plan; the transformer compiled whole."""
    with fresh_compiler():
        return compiled_run(compile_whole, Schedule({"block": FF}))


def test_regional_compile_matches_eager_with_one_graph_per_pattern_and_no_recompiles(regional):
    blocks = regional.pipe.transformer.transformer_blocks
    backend = regional.backend
    assert torch.allclose(regional.first, regional.expected, atol=1e-6)
    assert torch.allclose(regional.second, regional.expected, atol=1e-6)
    assert regional.attn_computes == 2 * len(blocks) * sum(ATTN1)
    assert regional.ff_computes == 2 * len(blocks) * sum(FF)
    assert regional.decision_patterns == 4
    # DiT's first block sees strided input (the patch embedding), the others contiguous: two variants
    assert regional.graphs_after_first == 4 * 2 and regional.graphs_after_second == regional.graphs_after_first
    # one graph call per block call: no graph break splits a block
    assert regional.second_calls == STEPS * len(blocks)
    # a reused attention is not in the graph at all
    assert sorted({backend.attention_calls(gm) for gm in regional.graphs}) == [0, 1]


@pytest.mark.parametrize("how", ["wrapper", "in place"])
def test_whole_model_compile_is_one_graph_per_step_and_compiles_nothing_the_second_time(how, request):
    run = request.getfixturevalue({"wrapper": "whole", "in place": "whole_in_place"}[how])
    assert torch.allclose(run.first, run.expected, atol=1e-6) and torch.allclose(run.second, run.expected, atol=1e-6)
    assert run.attn_computes == 2 * 2 * sum(ATTN1) and run.ff_computes == 2 * 2 * sum(FF)
    assert len(run.graphs) == 4  # the four compute/reuse patterns
    assert run.second_calls == STEPS  # each model call is one graph: nothing breaks it
    # attention computes in two patterns (in both blocks) and is left out of the other two
    assert sorted(run.backend.attention_calls(gm) for gm in run.graphs) == [0, 0, 2, 2]


def test_uncached_after_disable_compiles_like_a_plain_model(whole):
    # the model without the cache: one more graph, no more
    assert whole.graphs_after_uncached == len(whole.graphs) + 1


def test_more_patterns_than_the_recompile_limit_warns(caplog):
    pipe = make_dit_pipeline()
    # block 0 reuses on odd steps, block 1 on every third: all four combinations occur
    per_block = Schedule({"attn1-0": [int(s % 2 == 0) for s in range(STEPS)],
                          "attn1-1": [int(s % 3 != 2) for s in range(STEPS)]})
    with caplog.at_level(logging.WARNING, logger="smoothcache.runtime"):
        with smoothcache.cache(pipe, per_block) as handle:  # not compiled: nothing to say
            patterns = handle.decision_patterns()
        assert not [r for r in caplog.records if r.name.startswith("smoothcache")]  # others' imports may warn
        pipe.transformer.compile(backend="eager")
        with torch._dynamo.config.patch(recompile_limit=patterns - 1), smoothcache.cache(pipe, per_block):
            pass
    assert patterns == 4
    assert "uses 4 compute/reuse patterns" in caplog.text and "recompile_limit is 3" in caplog.text


def test_blocks_cached_whole_compile_one_graph_per_pattern_and_nothing_the_second_time(chained_blocks):
    run = chained_blocks
    assert torch.allclose(run.first, run.expected, atol=1e-6) and torch.allclose(run.second, run.expected, atol=1e-6)
    # eagerly: compute and keep, compute only (the next step computes too), reuse; traced, a
    # computing block keeps regardless, so the first two are one graph
    assert run.decision_patterns == 3 and len(run.graphs) == 2
    assert run.second_calls == STEPS
    assert sorted(run.backend.attention_calls(gm) for gm in run.graphs) == [0, 2]


def subtractions(gm: torch.fx.GraphModule) -> int:
    return sum(node.target in (operator.sub, torch.sub) for node in gm.graph.nodes)


def test_compiled_blocks_keep_their_states_and_take_the_difference_where_they_reuse():
    """Per-block keys, traced: a computing step keeps the second block's output and input as they
    are (no subtraction) and the first block's residual (its input could come from outside the
    model); the reusing step takes the second block's ``output - input``."""
    pipe = make_dit_pipeline()
    backend = GraphCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with smoothcache.cache(pipe, Schedule({"block-0": FF, "block-1": FF})):
        generate(pipe)
    # (attention calls, subtractions): computing, reusing
    assert sorted((backend.attention_calls(gm), subtractions(gm)) for gm in backend.graphs) == [(0, 1), (2, 1)]


def test_a_compiled_chain_keeps_one_residual_and_reuses_with_one_addition(chained_blocks):
    """One key for the whole list, traced: a computing step takes one difference (the list's
    output minus its input), a reusing step none."""
    backend = chained_blocks.backend
    assert sorted((backend.attention_calls(gm), subtractions(gm)) for gm in chained_blocks.graphs) == [(0, 0), (2, 1)]


def barrier_calls(gm: torch.fx.GraphModule) -> int:
    return sum("stream_barrier" in str(node.target) for node in gm.graph.nodes)


def live_layer_norms(gm: torch.fx.GraphModule) -> int:
    """Layer norms left after dead-code elimination (as AOTAutograd's and inductor's drop the others)."""
    graph = copy.deepcopy(gm.graph)
    graph.eliminate_dead_code()
    return sum(node.target is torch.nn.functional.layer_norm for node in graph.nodes)


def test_under_whole_model_compile_a_run_of_reusing_blocks_ends_at_the_barrier_and_dead_norms_go(whole, regional):
    """Compiled whole, where a run of blocks whose cached layers all reuse ends (here at the last
    block), the stream goes through smoothcache::stream_barrier, so inductor cannot fuse the run into
    the next reduction; the norms feeding only reused layers are dead code, dropped from the graph.
    Compiled block by block, nothing spans blocks: no barrier."""
    assert torch.allclose(whole.first, whole.expected, atol=1e-6)
    # per graph (attn1, ff): both compute, one reused (twice), both reused; norm1 feeds attn1, norm2
    # ff, plus the model's final norm
    assert sorted((barrier_calls(gm), live_layer_norms(gm)) for gm in whole.graphs) == [(0, 3), (0, 3), (0, 5), (1, 1)]
    assert torch.allclose(regional.first, whole.expected, atol=1e-6)
    assert regional.graphs and not any(barrier_calls(gm) for gm in regional.graphs)


@pytest.mark.parametrize("schedule", [SCHEDULE, Schedule({"block": FF})], ids=["layers", "blocks"])
def test_inductor_compiled_whole_matches_eager(schedule):
    """The barrier, the dropped norms and the kept block states through the real compiler (inductor
    on the CPU, about 20 s each)."""
    pipe = make_dit_pipeline()
    with smoothcache.cache(pipe, schedule):
        expected = generate(pipe)
    pipe.transformer = torch.compile(pipe.transformer)
    with torch._dynamo.config.patch(error_on_recompile=False), smoothcache.cache(pipe, schedule):
        first = generate(pipe)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = generate(pipe)
    assert torch.allclose(first, expected, atol=1e-5) and torch.equal(first, second)


def test_long_runs_of_reusing_blocks_have_a_barrier_every_few_blocks():
    """Within a run of reusing blocks, every fourth block's output passes the barrier too, so that no
    fused kernel reads more than four blocks' kept outputs."""
    pipe = make_dit_pipeline(num_layers=9)
    backend = GraphCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    alternate = (1, 0) * (STEPS // 2)  # two graphs: every layer computes, every layer reuses
    with smoothcache.cache(pipe, Schedule({"attn1": alternate, "ff": alternate})):
        generate(pipe)
    # the run of all nine blocks: after blocks 3 and 7, and at its end
    assert sorted(barrier_calls(gm) for gm in backend.graphs) == [0, 3]


@pytest.mark.parametrize("compiled", ["uncompiled", "whole", "regional"])
def test_a_compiled_model_marks_a_cudagraph_step_once_per_generation(monkeypatch, request, compiled):
    """Under CUDA graphs, kept outputs must outlive their step: the cache marks a cudagraph-trees
    step at each generation's first call (never within one), and only where something is compiled."""
    if compiled != "uncompiled":  # two generations in one cache(), marks counted (see compiled_run)
        assert request.getfixturevalue(compiled).marks == 2
        return
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    pipe = make_dit_pipeline()
    with smoothcache.cache(pipe, SCHEDULE):
        generate(pipe)
        generate(pipe)
    assert len(marks) == 0


def test_compiled_modules_are_found_wrapped_inside_others_and_through_an_instance_forward():
    """Wan 2.2's experts each compiled, a compiled child, ``model.forward = torch.compile(model.forward)``."""
    from smoothcache.runtime.compile import compiled_anywhere, compiled_whole
    from smoothcache.steps import Experts

    def linear() -> nn.Module:
        return nn.Linear(2, 2)

    experts = Experts({"transformer": torch.compile(linear(), backend="eager"), "transformer_2": linear()})
    assert compiled_whole(experts) and compiled_anywhere(experts)
    assert not compiled_whole(Experts({"transformer": linear(), "transformer_2": linear()}))
    nested = nn.Sequential(torch.compile(linear(), backend="eager"))
    assert compiled_anywhere(nested) and not compiled_whole(nested)
    by_forward = linear()
    by_forward.forward = torch.compile(by_forward.forward, backend="eager")
    assert compiled_whole(by_forward) and compiled_anywhere(by_forward)
    assert not compiled_anywhere(nn.Sequential(linear()))


def test_barriers_follow_module_order_whatever_the_order_of_the_schedule_keys():
    """A per-block key puts its block after the others in the schedule; runs of reusing blocks are
    still found in module order: here block 1 always computes, so runs [0] and [2, 3] end at 0 and 3."""
    pipe = make_dit_pipeline(num_layers=4)
    always = (1,) * STEPS
    schedule = Schedule({"attn1": ATTN1, "ff": ATTN1, "attn1-1": always, "ff-1": always})
    backend = GraphCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with smoothcache.cache(pipe, schedule):
        generate(pipe)
    assert sorted(barrier_calls(gm) for gm in backend.graphs) == [0, 2]


def test_a_step_marked_within_a_generation_is_warned_about_once(caplog):
    """Torch's own error message for overwritten CUDA graph outputs suggests a mark before every
    model call; with kept outputs that recycles them, so the cache says so."""
    pipe = make_dit_pipeline(num_layers=1)  # one block: the warning is the generation's, not a block's
    model = torch.compile(pipe.transformer, backend="eager")
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "class_labels": torch.tensor([1, 2])}
    with smoothcache.cache(model, ALTERNATE), caplog.at_level(logging.WARNING, logger="smoothcache"):
        for generation in range(2):
            for step in range(STEPS):
                model(timestep=torch.tensor([999 - 100 * step] * 2), **inputs)
                if generation == 0 or step < STEPS - 1:
                    torch.compiler.cudagraph_mark_step_begin()
    assert caplog.text.count("was called during a generation") == 1


def test_the_stream_barrier_passes_gradients_through():
    """Guidance by gradients through a model compiled whole must get past a reusing step's barrier."""
    from smoothcache.runtime.compile import stream_barrier

    x = torch.randn(3, requires_grad=True)
    (stream_barrier(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("mode", "graphs"), [(None, False), ("reduce-overhead", True), ("max-autotune", True), ("max-autotune-no-cudagraphs", False)]
)
def test_cuda_graphs_are_read_from_how_the_model_was_compiled(mode, graphs) -> None:
    from smoothcache.runtime.compile import cuda_graphs_anywhere, launches_each_kernel

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert cuda_graphs_anywhere(torch.compile(model, mode=mode)) is graphs
    model[1].compile(mode=mode)  # one block compiled (regional)
    assert cuda_graphs_anywhere(model) is graphs
    assert not cuda_graphs_anywhere(nn.Linear(2, 2)) and not launches_each_kernel(model)  # on a CPU, never


@pytest.mark.parametrize(("keys", "warns"), [(["attn1", "ff"], True), (["block"], False)])
def test_layers_launched_kernel_by_kernel_are_warned_about_once(keys, warns, monkeypatch, caplog) -> None:
    """Layers under torch.compile without CUDA graphs on a GPU (faked: this runs on a CPU) may be
    slower than no cache; whole blocks leave nothing to launch, so they are not warned about."""
    import smoothcache.runtime.handle

    monkeypatch.setattr(smoothcache.runtime.handle, "launches_each_kernel", lambda model: True)
    pipe = make_dit_pipeline(num_layers=1)  # one block: the warning is the handle's, not a block's
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="smoothcache"), smoothcache.cache(pipe, Schedule.fixed_interval(keys, STEPS, 2)):
        generate(pipe)
        generate(pipe)
    assert caplog.text.count("cached under torch.compile without CUDA graphs") == int(warns)
    if warns:
        assert "components=['block']" in caplog.text and "mode='reduce-overhead'" in caplog.text


def test_blocks_compiled_one_by_one_chain_around_their_graphs_as_eagerly():
    """Regional compile (each block compiled on its own, as diffusers' compile_repeated_blocks does):
    the chain's bookkeeping runs around each block's compiled call, so the list keeps one residual as
    it does eagerly, and every graph is the plain block's, run at computing steps only: the same graphs
    for every step, none made in a second generation. Disabling gives the blocks their compiled calls back."""
    pipe = make_dit_pipeline(num_layers=4)
    blocks = pipe.transformer.transformer_blocks
    schedule = Schedule({"block": FF})

    def run() -> tuple[torch.Tensor, int]:
        with smoothcache.cache(pipe, schedule) as handle:
            generate(pipe)
            with torch._dynamo.config.patch(error_on_recompile=True):
                output = generate(pipe)
            return output, sum(handle.state.kept_bytes().values())

    eager, chained = run()
    backend = GraphCounter()
    compiled_calls = []
    for block in blocks:
        block.compile(backend=backend)
        compiled_calls.append(block._compiled_call_impl)
    with fresh_compiler():
        output, kept = run()
        graph_calls_per_generation = backend.calls // 2
    assert kept == chained  # one residual for the list, as eagerly
    assert torch.allclose(output, eager, atol=1e-6)
    assert len(backend.graphs) <= 2  # the plain block: the first block's strided input and the others'
    assert not any(barrier_calls(gm) for gm in backend.graphs)
    assert graph_calls_per_generation == len(blocks) * sum(FF)  # reusing steps enter no graph
    assert [block._compiled_call_impl for block in blocks] == compiled_calls


def test_blocks_get_their_stream_barrier_only_when_the_model_is_compiled_whole():
    """Eagerly no block's forward is shadowed for the barrier (block-level offloading added later can
    then be undone); compiled in place after cache(), the next generation attaches the barriers."""
    pipe = make_dit_pipeline()
    blocks = pipe.transformer.transformer_blocks
    with smoothcache.cache(pipe, ALTERNATE):
        generate(pipe)
        assert not any("forward" in vars(block) for block in blocks)
        backend = GraphCounter()
        pipe.transformer.compile(backend=backend)
        generate(pipe)
        assert all("forward" in vars(block) for block in blocks)
    assert any(barrier_calls(gm) for gm in backend.graphs)
    assert not any("forward" in vars(block) for block in blocks)  # disable() took them off


@pytest.mark.parametrize("keys", [["block"], ["block-0", "block-1"]], ids=["chain", "per-block"])
def test_two_model_calls_per_step_compile_nothing_the_second_generation(keys):
    """Wan 2.1 runs guidance as a second model call per step: its call slot opens in the first
    generation, and the kept-output dicts must not change size then (dynamo guards on it)."""
    from models.test_wan import generate as generate_wan
    from models.test_wan import make_pipeline as make_wan

    pipe = make_wan()
    plan = (1, 0, 1, 1, 0, 1)
    with smoothcache.cache(pipe, Schedule(dict.fromkeys(keys, plan))):
        expected = generate_wan(pipe)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with smoothcache.cache(pipe, Schedule(dict.fromkeys(keys, plan))):
        first = generate_wan(pipe)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = generate_wan(pipe)
    assert torch.allclose(first, expected, atol=1e-6) and torch.equal(first, second)


@pytest.mark.parametrize("schedule, forecast", [
    (Schedule.fixed_interval(["block"], STEPS, 2), "none"),
    (SCHEDULE, "none"),
    (SCHEDULE, "linear"),
    (Schedule({key: ATTN1 if key.endswith("@cond") else FF for key in ("attn1@cond", "attn1@uncond", "ff@cond", "ff@uncond")}), "none"),
], ids=["blocks", "layers", "layers-forecast", "guidance-halves"])
def test_after_one_generation_only_the_guards_that_tell_graphs_apart_are_needed(schedule, forecast):
    """torch.compiler.set_stance(skip_guard_eval_unsafe=True) checks only the guards that told the
    compiled graphs apart (docs/speed.md): the cache's compute/reuse decisions are among them, so
    after one warm-up generation a cached model picks the right graph at every step without the
    full guard check, and compiles nothing."""
    torch._dynamo.reset()
    pipe = make_dit_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with smoothcache.cache(pipe, schedule, forecast=forecast):
        checked = generate(pipe)
        frames = torch._dynamo.utils.counters["frames"]["total"]
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            unchecked = [generate(pipe) for _ in range(2)]
        assert torch._dynamo.utils.counters["frames"]["total"] == frames
    assert all(torch.equal(output, checked) for output in unchecked)
    torch._dynamo.reset()


def scaled_stream(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook that changes the stream entering a block (as a steering hook would)."""
    if args:
        return (args[0] * 1.5, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 1.5}


@pytest.mark.parametrize("case", ["block hooks", "wrapped blocks", "calls marked by the first block"])
def test_where_a_chain_cannot_run_around_compiled_blocks_they_keep_their_own_and_match_eager(case):
    """Regional compile where running the chain around each block's compiled call would not be
    exact: blocks with hooks of their own (the wrapper would see the stream before and after them),
    blocks replaced by compiled wrappers (nothing in place to wrap), and the original DiT, whose
    forward_with_cfg bypasses the model's hooks so that the first block marks each call from inside
    (its decisions are set after a wrapper would read them). The chain is off there, each block keeps
    its own, and the outputs match eager caching's."""
    from conftest import OriginalStyleDiT, sample_loop

    plan = (1, 0, 1, 0, 0, 1, 0, 1, 0, 1)
    if case == "calls marked by the first block":
        torch.manual_seed(0)
        model = OriginalStyleDiT(depth=3).eval()
        blocks = model.blocks
        x, y = torch.randn(4, 6, 16), torch.tensor([0, 1, 4, 4])

        def run() -> torch.Tensor:
            with torch.no_grad():
                return sample_loop(model.forward_with_cfg, x, len(plan), y=y, cfg_scale=4.0)
        target = model
    else:
        pipe = make_dit_pipeline(num_layers=3)
        blocks, target = pipe.transformer.transformer_blocks, pipe
        if case == "block hooks":
            for block in blocks:
                block.register_forward_pre_hook(scaled_stream, with_kwargs=True)

        def run() -> torch.Tensor:
            return generate(pipe, steps=len(plan))
    schedule = Schedule({"block": plan})
    with smoothcache.cache(target, schedule) as handle:
        eager, chained = run(), sum(handle.state.kept_bytes().values())
    with fresh_compiler(), smoothcache.cache(target, schedule) as handle:
        for i, block in enumerate(list(blocks)):  # after cache(): the next generation sees them compiled
            if case == "wrapped blocks":
                blocks[i] = torch.compile(block, backend="eager")
            else:
                block.compile(backend="eager")
        for _ in range(2):
            torch.testing.assert_close(run(), eager, rtol=1e-5, atol=1e-5)
        assert sum(handle.state.kept_bytes().values()) > chained  # a residual or the states of each block
