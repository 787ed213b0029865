"""step_graphs: each denoising step's model call is captured once and replayed after, keyed by its
place in the generation and its signature; anything a graph baked in that changes drops them all.

CUDA graphs need a GPU, so here a stand-in capture (``op_replay.OpReplayCapture``) records the
ATen operations of a captured call and replays only them, on the same tensors, with none of the
model's or the cache's Python: the dispatch, the keys, the warm-up, the fallbacks and the restore
are what these tests check on the CPU, under a graph's semantics. tests/test_step_graphs_cuda.py
checks real graphs where there is a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline
from op_replay import OpReplayCapture
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import smoothcache
from smoothcache import Schedule, graph_replay
from smoothcache.adapters import whole_block_components
from smoothcache.errors import GraphCaptureError
from smoothcache.graph_replay import StepGraphs, copy_inputs, static_inputs


def counts(graphs: StepGraphs) -> tuple[int, int, int]:
    return graphs.stats.plain, graphs.stats.captured, graphs.stats.replayed


def test_one_plain_generation_then_one_captured_then_replays() -> None:
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    capture = OpReplayCapture()
    with StepGraphs(pipe, capture=capture) as graphs:
        outputs = [generate(pipe) for _ in range(4)]
        assert counts(graphs) == (STEPS, STEPS, 2 * STEPS)
        assert graphs.graphs == STEPS and capture.pools == 1
    assert all(torch.equal(output, plain) for output in outputs)


def test_with_a_cache_the_outputs_are_the_cache_alone() -> None:
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule):
        cached = generate(pipe)
    with smoothcache.cache(pipe, schedule), StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
        outputs = [generate(pipe) for _ in range(3)]
        assert counts(graphs) == (STEPS, STEPS, STEPS)
    assert all(torch.equal(output, cached) for output in outputs)


def test_attaching_a_cache_drops_the_graphs_and_starts_over() -> None:
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule):
        cached = generate(pipe)
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        generate(pipe)
    assert graphs.graphs == STEPS and graphs.stats.invalidated == 0
    with smoothcache.cache(pipe, schedule):
        first = generate(pipe)  # the block forwards changed: run as it is, graphs dropped
        assert graphs.stats.invalidated == 1 and graphs.graphs == 0
        generate(pipe)
        assert graphs.graphs == STEPS
        replayed = generate(pipe)
    assert torch.equal(first, cached) and torch.equal(replayed, cached)
    graphs.disable()


def test_changed_parameters_are_noticed() -> None:
    pipe, reference = make_dit_pipeline(), make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        generate(pipe)
    for model in (pipe.transformer, reference.transformer):  # a new tensor, as loading a LoRA makes
        linear = model.transformer_blocks[0].ff.net[2]
        linear.weight = torch.nn.Parameter(linear.weight.detach() * 2)
    changed = generate(pipe)
    assert graphs.stats.invalidated == 1 and graphs.graphs == 0
    assert torch.equal(changed, generate(reference))


def test_a_module_without_weights_swapped_for_another_is_noticed() -> None:
    """A module that holds no weights (the feed-forward's dropout) replaced by another kind in the
    same mode: same name, no tensor changed, yet the graphs baked in the old one's kernels."""
    pipe, reference = make_dit_pipeline(), make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        generate(pipe)
    for model in (pipe.transformer, reference.transformer):
        net = model.transformer_blocks[0].ff.net
        net[1] = torch.nn.Tanh().train(net[1].training)
    changed = generate(pipe)
    assert graphs.stats.invalidated == 1
    assert torch.equal(changed, generate(reference))


def test_the_fingerprint_sees_where_modules_and_weights_are_registered() -> None:
    """A module registered twice and one registration re-pointed, or a weight moved to another
    name of its module, change what the forward runs though no module or tensor is new."""
    shared, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Module()
    model.first, model.second = shared, shared
    before = graph_replay.model_fingerprint(model)
    assert graph_replay.model_fingerprint(model) == before  # nothing changed, nothing seen
    model.second = other
    assert graph_replay.model_fingerprint(model) != before

    weight = torch.nn.Parameter(torch.ones(2))
    module = torch.nn.Module()
    module.register_parameter("scale", weight)
    module.register_parameter("shift", None)
    before = graph_replay.model_fingerprint(module)
    module._parameters["scale"], module._parameters["shift"] = None, weight
    assert graph_replay.model_fingerprint(module) != before


def test_a_model_that_changes_at_every_generation_never_replays_and_is_told_so(caplog) -> None:
    """As CPU offloading moves the weights at every generation: the graphs are dropped each time,
    and a warning says why nothing replays (once)."""
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    linear = pipe.transformer.transformer_blocks[0].ff.net[2]
    with caplog.at_level("WARNING", logger="smoothcache.graph_replay"):
        for _ in range(2 + 2 * graph_replay.CHANGED_IN_A_ROW):
            generate(pipe)
            linear.weight = torch.nn.Parameter(linear.weight.detach().clone())  # the same values, moved
    warnings = [r for r in caplog.records if "never get to replay" in r.getMessage()]
    assert len(warnings) == 1 and "offloading" in warnings[0].getMessage()
    assert graphs.stats.replayed == 0 and graphs.stats.invalidated == 1 + 2 * graph_replay.CHANGED_IN_A_ROW
    graphs.disable()


def test_the_models_own_hooks_run_on_every_replayed_call_and_a_blocks_hook_is_captured_afresh() -> None:
    """The model's own hooks run around the replaced forward, replays included (a benchmark's clock,
    a profiler's ranges), so adding one keeps the graphs; a block's hook runs inside the forward,
    where a graph would skip it, so adding one drops them."""
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        generate(pipe)
    calls: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert torch.equal(generate(pipe), plain)
    handle.remove()
    assert len(calls) == STEPS and graphs.stats.invalidated == 0
    assert counts(graphs) == (STEPS, STEPS, 2 * STEPS)
    everywhere = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    generate(pipe)  # a hook for every module runs inside the forward too
    assert graphs.stats.invalidated == 1 and graphs.graphs == 0
    everywhere.remove()
    for _ in range(3):
        generate(pipe)
    block = pipe.transformer.transformer_blocks[0]
    doubled = block.register_forward_hook(lambda module, args, output: output * 2)
    changed = generate(pipe)
    assert graphs.stats.invalidated == 3 and graphs.graphs == 0 and not torch.equal(changed, plain)
    doubled.remove()
    graphs.disable()


def test_a_new_batch_size_is_warmed_up_and_captured_on_its_own() -> None:
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        generate(pipe)
    assert counts(graphs) == (STEPS, STEPS, STEPS)
    three = [generate(pipe, labels=(1, 2, 3)) for _ in range(3)]
    assert counts(graphs) == (2 * STEPS, 2 * STEPS, 2 * STEPS)
    assert graphs.graphs == 2 * STEPS
    assert torch.equal(three[0], three[2])


def test_a_call_that_cannot_be_captured_detaches_the_graphs_and_says_so() -> None:
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    graphs = StepGraphs(pipe, capture=OpReplayCapture(fail_at_step=3))
    assert torch.equal(generate(pipe), plain)
    with pytest.raises(GraphCaptureError, match="could not be captured as a CUDA graph"):
        generate(pipe)  # the capture generation stops at step 3: the cache's state there is unknown
    assert "forward" not in vars(pipe.transformer) and graphs.graphs == 0
    assert "stream is capturing" in graphs.stats.capture_error
    assert torch.equal(generate(pipe), plain)  # the next call runs without graphs


def test_a_generation_that_meets_an_uncaptured_call_runs_the_rest_as_it_is_and_the_set_is_captured_again(caplog) -> None:
    """Replays keep nothing in the cache (its Python does not run), so from the uncaptured call on the
    generation computes where the schedule reuses, until each layer computes again: here step 5,
    a reusing step, computes. A warning says the image is not the cache's alone."""
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)  # computes steps 0, 2, 4, 6, 8 and the last
    with smoothcache.cache(pipe, schedule):
        cached = generate(pipe)
    step_5_computes = Schedule({"block": [1, 0, 1, 0, 1, 1, 1, 0, 1, 1]})
    with smoothcache.cache(pipe, step_5_computes):
        fallen_back = generate(pipe)
    with smoothcache.cache(pipe, schedule), StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
        outputs = [generate(pipe) for _ in range(2)]
        (graph_set,) = graphs._sets.values()
        del graph_set[next(key for key in graph_set if key[0] == 5)]  # as if step 5 had not been captured
        with caplog.at_level("WARNING", logger="smoothcache.graph_replay"):
            incomplete = generate(pipe)  # replays steps 0-4, runs 5-9 as they are
        assert graphs.stats.incomplete == 1 and graphs.stats.replayed == 5 and graphs.graphs == 0
        outputs += [generate(pipe) for _ in range(2)]  # captured again, then replayed whole
        assert graphs.stats.captured == 2 * STEPS and graphs.stats.replayed == 5 + STEPS
    assert all(torch.equal(output, cached) for output in outputs)
    assert torch.equal(incomplete, fallen_back) and not torch.equal(incomplete, cached)
    assert "Step 6 (call 1) of this generation is not the next captured call" in caplog.text


def test_static_inputs_keep_each_tensors_layout_and_identity() -> None:
    timestep = torch.tensor(7.0).expand(4)  # DiTPipeline's t.expand(batch): stride 0
    latents = torch.randn(4, 3)
    static = static_inputs([latents, timestep, timestep, None, 2])
    assert static[1].stride() == (0,) and static[1] is static[2] and static[3:] == [None, 2]
    assert torch.equal(static[0], latents) and static[0] is not latents
    copy_inputs(static, [latents * 2, torch.tensor(3.0).expand(4), torch.tensor(3.0).expand(4), None, 2])
    assert torch.equal(static[0], latents * 2) and static[1].tolist() == [3.0] * 4


def test_outputs_kept_on_the_host_are_refused() -> None:
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule, kept_device="cpu"), StepGraphs(pipe, capture=OpReplayCapture()):
        generate(pipe)
        with pytest.raises(ValueError, match="kept_device='cpu'"):
            generate(pipe)


def test_disable_restores_the_model_exactly() -> None:
    pipe = make_dit_pipeline()
    model = pipe.transformer
    assert "forward" not in vars(model)
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    generate(pipe)
    graphs.disable()
    assert "forward" not in vars(model) and graphs.graphs == 0
    graphs.disable()  # twice is harmless


def test_what_it_refuses() -> None:
    pipe = make_dit_pipeline()
    with pytest.raises(ValueError, match="CUDA device"):
        smoothcache.step_graphs(pipe)  # a CPU model
    with pytest.raises(TypeError, match="pipeline with a scheduler"):
        StepGraphs(pipe.transformer, capture=OpReplayCapture())
    pipe.transformer = torch.compile(pipe.transformer, mode="reduce-overhead")
    with pytest.raises(ValueError, match="reduce-overhead"):
        StepGraphs(pipe, capture=OpReplayCapture())


def test_at_most_max_sets_signatures_keep_graphs_the_least_recently_used_goes() -> None:
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture(), max_sets=2)
    for labels in ((1,), (1, 2), (1, 2, 3)):  # three batch sizes, each warmed up then captured
        for _ in range(2):
            generate(pipe, labels=labels)
    assert graphs.graphs == 2 * STEPS  # the batch of one was dropped for the batch of three
    replayed = graphs.stats.replayed
    generate(pipe, labels=(1, 2))
    assert graphs.stats.replayed == replayed + STEPS
    generate(pipe, labels=(1,))  # warmed up long ago: captured again, dropping (1, 2, 3), now least recent
    assert graphs.graphs == 2 * STEPS and graphs.stats.replayed == replayed + STEPS
    generate(pipe, labels=(1, 2, 3))
    assert graphs.stats.replayed == replayed + STEPS  # it was dropped: captured again
    graphs.disable()


def test_one_step_graphs_per_model() -> None:
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    with pytest.raises(ValueError, match="already replays step graphs"):
        StepGraphs(pipe, capture=OpReplayCapture())
    graphs.disable()
    StepGraphs(pipe, capture=OpReplayCapture()).disable()


def test_the_model_says_it_replays_step_graphs_while_they_are_attached() -> None:
    """The cache's warning about kernels launched one by one under compile is not for a model
    replayed from graphs: it asks runtime.compile.replays_step_graphs."""
    from smoothcache.runtime.compile import replays_step_graphs

    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    assert replays_step_graphs(pipe.transformer)
    graphs.disable()
    assert not replays_step_graphs(pipe.transformer)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_two_calls_a_step_and_a_scheduler_with_a_step_index(family: str) -> None:
    """Flux with true CFG and Wan call the model twice a step (the slots key apart) and their
    schedulers count steps by a step index; cached whole blocks, replayed generations are the cache's."""
    from models import test_flux, test_wan
    from models.conftest import STEPS as FAMILY_STEPS

    module = {"flux": test_flux, "wan": test_wan}[family]
    generate_family = test_flux.generate_true_cfg if family == "flux" else test_wan.generate
    pipe = module.make_pipeline()
    schedule = Schedule({key: (1, 0) * (FAMILY_STEPS // 2) for key in whole_block_components(pipe.transformer)})
    with smoothcache.cache(pipe, schedule):
        cached = generate_family(pipe)
    with smoothcache.cache(pipe, schedule), StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
        outputs = [generate_family(pipe) for _ in range(3)]
        assert graphs.graphs == 2 * FAMILY_STEPS and graphs.stats.replayed == 2 * FAMILY_STEPS
    assert all(torch.equal(output, cached) for output in outputs)


def test_each_step_count_keeps_its_own_set() -> None:
    """Generations of 10 and 8 steps begin with the same call; each set replays only its own graphs."""
    pipe = make_dit_pipeline()
    plain = {steps: generate(pipe, steps=steps) for steps in (STEPS, 8)}
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(3):
        for steps in (STEPS, 8):
            assert torch.equal(generate(pipe, steps=steps), plain[steps])
    assert len(graphs._sets) == 2 and graphs.graphs == STEPS + 8
    # the 8-step generation's calls were warmed up by the 10-step one's first 8: it captured first
    assert graphs.stats.plain == STEPS and graphs.stats.replayed == STEPS + 2 * 8 and graphs.stats.incomplete == 0
    graphs.disable()


def test_keys_tell_a_tensor_passed_twice_from_two_tensors_and_skip_objects() -> None:
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    a, b = torch.ones(3), torch.ones(3)
    twice, two = (pytree.tree_flatten(((a, a), {})), pytree.tree_flatten(((a, b), {})))
    assert graphs._key(0, 0, *twice) != graphs._key(0, 0, *two)
    assert graphs._key(0, 0, *pytree.tree_flatten(((a, object()), {}))) is None  # may hold tensors: runs as it is
    assert graphs._key(0, 0, *pytree.tree_flatten(((a, 2, None, "x", torch.float16), {}))) is not None
    graphs.disable()


def test_work_the_cache_leaves_between_calls_cannot_be_captured(monkeypatch) -> None:
    pipe = make_dit_pipeline()
    handle = smoothcache.cache(pipe, Schedule.fixed_interval(["block"], STEPS, 2))
    monkeypatch.setattr(handle, "works_between_calls", lambda: True)  # as SD3's skip-layer guidance leaves a run open
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    generate(pipe)
    with pytest.raises(GraphCaptureError, match="next call's start"):
        generate(pipe)
    assert graphs.graphs == 0 and "forward" not in vars(pipe.transformer)
    handle.disable()


def test_a_model_compiled_after_attaching_runs_its_calls_through_the_graphs_eagerly_and_says_so(caplog) -> None:
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    traced = counters["frames"]["total"]
    with caplog.at_level("WARNING", logger="smoothcache.graph_replay"):
        outputs = [generate(pipe) for _ in range(3)]
    assert caplog.text.count("compiled after step_graphs attached") == 1
    assert graphs.stats.replayed == STEPS and all(torch.equal(output, plain) for output in outputs)
    assert counters["frames"]["total"] == traced  # nothing traced: the wrapper runs the calls eagerly
    pipe.transformer = pipe.transformer._orig_mod
    graphs.disable()
    torch._dynamo.reset()


def test_compiled_first_the_captures_compile_nothing_again() -> None:
    """Captured inputs are laid out as the warm-up's (the expanded timestep included): dynamo's
    guards hold, so the capture and replays add no graph (dynamo only, on the CPU)."""
    torch._dynamo.reset()
    pipe = make_dit_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    generate(pipe)
    compiled = counters["stats"]["unique_graphs"]
    for _ in range(3):
        generate(pipe)
    assert counters["stats"]["unique_graphs"] == compiled and graphs.stats.replayed == 2 * STEPS
    graphs.disable()
    torch._dynamo.reset()


def test_a_model_compiled_in_place_is_refused() -> None:
    pipe = make_dit_pipeline()
    pipe.transformer.compile(backend="eager")
    with pytest.raises(ValueError, match="compiled in place"):
        StepGraphs(pipe, capture=OpReplayCapture())
    torch._dynamo.reset()


def test_a_fused_adapter_and_a_new_attention_backend_are_noticed() -> None:
    """peft's merge adds to the weights in place (same tensors); a backend switch keeps the processor."""
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for _ in range(2):
        generate(pipe)
    block = pipe.transformer.transformer_blocks[0]
    block.ff.net[2].merged_adapters = ["style"]
    generate(pipe)
    assert graphs.stats.invalidated == 1
    block.attn1.processor._attention_backend = "flash"
    generate(pipe)
    assert graphs.stats.invalidated == 2
    graphs.disable()


def test_inputs_that_need_gradients_run_as_they_are_while_grad_is_on() -> None:
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    weights = torch.ones(3, requires_grad=True)
    leaves = pytree.tree_flatten(((weights,), {}))
    assert graphs._key(0, 0, *leaves) is None
    with torch.no_grad():
        assert graphs._key(0, 0, *leaves) is not None
    graphs.disable()


SEMANTICS = {  # every kind of kept state a replay must leave right, each one schedule
    "uncached": (None, {}),
    "blocks": (Schedule.fixed_interval(["block"], STEPS, 2), {}),
    "blocks-forecast": (Schedule.fixed_interval(["block"], STEPS, 2), {"forecast": "linear"}),
    "layers": (Schedule.fixed_interval(["attn1", "ff"], STEPS, 2), {}),
    "layers-forecast": (Schedule.fixed_interval(["attn1", "ff"], STEPS, 2), {"forecast": "linear"}),
    "layers-bfloat16": (Schedule.fixed_interval(["attn1", "ff"], STEPS, 2), {"kept_dtype": torch.bfloat16}),
    "per-block": (Schedule({"block-0": [1, 0] * (STEPS // 2), "block-1": [1, 1, 0] * (STEPS // 3) + [1]}), {}),
    "guidance-halves": (Schedule({key: [1, 0] * (STEPS // 2) if key.endswith("@cond") else [1, 1, 0] * (STEPS // 3) + [1]
                                  for key in ("attn1@cond", "attn1@uncond", "ff@cond", "ff@uncond")}), {}),
}


COMPILED_SEMANTICS = ("blocks-forecast", "layers-forecast", "guidance-halves")  # the rest compile alike


@pytest.mark.parametrize(("name", "compiled"), [(name, False) for name in SEMANTICS]
                         + [(name, True) for name in COMPILED_SEMANTICS])
def test_replayed_generations_are_the_plain_path_under_a_graphs_semantics(name: str, compiled: bool) -> None:
    """With nothing of the model's or the cache's Python running on replay, each kind of kept state
    (outputs, residual chains, forecasting's two, a lower precision, per-block and per-branch
    columns) is read where the capture left it and rewritten by the replays: the plain path's output,
    eager and compiled (dynamo only), with nothing compiled again."""
    schedule, options = SEMANTICS[name]
    torch._dynamo.reset()
    pipe = make_dit_pipeline()
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    handle = smoothcache.cache(pipe, schedule, **options) if schedule is not None else None
    plain = generate(pipe)
    compiled_before = counters["stats"]["unique_graphs"]
    capture = OpReplayCapture()
    with StepGraphs(pipe, capture=capture) as graphs:
        outputs = [generate(pipe) for _ in range(3)]
        assert counts(graphs) == (STEPS, STEPS, STEPS) and graphs.stats.incomplete == 0
    assert capture.operations > 0 and all(torch.equal(output, plain) for output in outputs)
    assert counters["stats"]["unique_graphs"] == compiled_before
    if handle is not None:
        handle.disable()
    torch._dynamo.reset()


def test_two_step_counts_alternating_with_one_set_kept_and_outputs_not_copied() -> None:
    """With room for one set each generation captures its own into a fresh pool; outputs handed out
    uncopied are still the plain ones (the pipeline is done with each before the next replay)."""
    pipe = make_dit_pipeline()
    plain = {steps: generate(pipe, steps=steps) for steps in (STEPS, STEPS - 2)}
    capture = OpReplayCapture()
    with StepGraphs(pipe, capture=capture, max_sets=1, copy_outputs=False) as graphs:
        for _ in range(3):
            for steps in (STEPS, STEPS - 2):
                assert torch.equal(generate(pipe, steps=steps), plain[steps])
        # the 8-step calls were warmed up by the first 10-step generation: every generation after it captures
        assert len(graphs._sets) == 1 and capture.pools == 5 and graphs.stats.captured == 3 * (STEPS - 2) + 2 * STEPS


def read_on_host(_module, _args, output) -> None:
    """A forward hook that reads a value back on the host (a sync, which no capture allows); returns
    nothing, so the output stays the block's."""
    float(output.sum())


def test_a_forward_that_reads_a_value_on_the_host_cannot_be_captured() -> None:
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(read_on_host)
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    generate(pipe)
    with pytest.raises(GraphCaptureError, match="could not be captured"):
        generate(pipe)
    assert graphs.graphs == 0 and "forward" not in vars(pipe.transformer)
    hook.remove()
    assert torch.equal(generate(pipe), plain)


@pytest.mark.parametrize("read", ["directly", "through-a-view", "written-in-place"])
def test_the_stand_in_holds_a_tensor_made_outside_the_captures_by_its_address_only(read: str) -> None:
    """As a CUDA graph holds a tensor made outside its pool (a parameter, a value a hook sets)
    by its address only, the stand-in holds it weakly, views of it and writes into it included (a
    view would keep it alive): a replay that reads one that is gone, which on a GPU reads freed
    memory, raises; one still held replays."""
    capture = OpReplayCapture()
    capture.new_pool()
    weight = torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
    per_call = {"scale": torch.full((3,), 3.0)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        scale = per_call["scale"]
        if read == "through-a-view":
            scale = scale.view(3, 1)[:, 0]
        elif read == "written-in-place":
            scale = scale.fill_(3.0)
        return x * weight * scale

    leaves, spec = pytree.tree_flatten(((torch.ones(3),), {}))
    replay, output = capture(forward, leaves, spec, (0, 0))
    assert torch.equal(output, torch.full((3,), 6.0))
    assert torch.equal(replay([torch.full((3,), 2.0)]), torch.full((3,), 12.0))
    per_call["scale"] = torch.full((3,), 3.0)  # the same value, made anew: the captured one is freed
    with pytest.raises(RuntimeError, match="reads freed memory"):
        replay(leaves)


def test_the_stand_in_bakes_in_a_constant_the_forward_makes() -> None:
    capture = OpReplayCapture()
    capture.new_pool()
    leaves, spec = pytree.tree_flatten(((torch.ones(3),), {}))
    replay, _ = capture(lambda x: x * torch.tensor([1.0, 2.0, 3.0]), leaves, spec, (0, 0))
    assert torch.equal(replay([torch.full((3,), 2.0)]), torch.tensor([2.0, 4.0, 6.0]))


@pytest.mark.parametrize("torch_version", ["2.8-2.11", "before-2.8", "2.12-on", "rocm"])
def test_a_failed_capture_ends_the_allocators_routing_into_its_pool_where_torch_did_not(torch_version, monkeypatch) -> None:
    """Torch before 2.12 leaves the allocator routing into a failed capture's pool and never
    releases the failed graph's hold on it (before 2.8 the call that ends it had another name);
    later torch ends the routing itself. The capture ends the routing where torch did not, and
    releases the pool then, except on ROCm, whose branches took the fixes in another order (a
    second release would fail in the graph's destructor). Torch's allocator calls are faked here."""
    calls: list[tuple[str, int, tuple[int, int]]] = []

    def end(index: int, pool: tuple[int, int]) -> None:
        if torch_version == "2.12-on":
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        calls.append(("end", index, pool))

    monkeypatch.delattr(torch._C, "_cuda_endAllocateToPool", raising=False)
    monkeypatch.delattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", raising=False)
    name = "_cuda_endAllocateCurrentStreamToPool" if torch_version == "before-2.8" else "_cuda_endAllocateToPool"
    monkeypatch.setattr(torch._C, name, end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda index, pool: calls.append(("release", index, pool)),
                        raising=False)
    monkeypatch.setattr(torch.version, "hip", "6.4" if torch_version == "rocm" else None)
    capture = object.__new__(graph_replay.CudaCapture)  # no CUDA stream to make here
    capture.device, capture.pool = torch.device("cuda", 1), (0, 7)
    capture._end_failed_capture()
    expected = {"2.8-2.11": [("end", 1, (0, 7)), ("release", 1, (0, 7))], "before-2.8": [("end", 1, (0, 7)), ("release", 1, (0, 7))],
                "2.12-on": [], "rocm": [("end", 1, (0, 7))]}
    assert calls == expected[torch_version]


def test_the_warm_up_counts_are_bounded(monkeypatch) -> None:
    """A pipeline whose calls never repeat a signature must not grow the warm-up counts without end:
    past the limit they start over (one more plain generation for a signature seen before)."""
    from smoothcache import graph_replay

    monkeypatch.setattr(graph_replay, "SEEN_LIMIT", 2 * STEPS)
    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    for labels in ((1,), (1, 2), (1, 2, 3)):  # three signatures, one plain generation each
        generate(pipe, labels=labels)
        assert len(graphs._seen) <= 2 * STEPS
    generate(pipe, labels=(1,))  # its count was dropped with the third signature's arrival: plain again
    assert graphs.stats.captured == 0 and len(graphs._seen) == 2 * STEPS
    generate(pipe, labels=(1,))
    assert graphs.stats.captured == STEPS
    graphs.disable()


def guided_loop(pipe, skip_uncond_at: tuple[int, ...] = ()) -> torch.Tensor:
    """A denoising loop of one's own with guidance as two model calls a step, the unconditional one
    left out on the steps in ``skip_uncond_at`` (as guidance limited to an interval does)."""
    from diffusers import EulerDiscreteScheduler

    if not isinstance(pipe.scheduler, EulerDiscreteScheduler):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler, generator = pipe.scheduler, torch.Generator().manual_seed(0)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_input, timestep = scheduler.scale_model_input(x, t), t[None].expand(1)
            cond = pipe.transformer(model_input, timestep=timestep, class_labels=torch.tensor([1])).sample[:, :4]
            uncond = cond if i in skip_uncond_at else pipe.transformer(
                model_input, timestep=timestep, class_labels=torch.tensor([1000])).sample[:, :4]
            x = scheduler.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_a_generation_that_leaves_out_a_captured_call_replays_no_graph_after_it(cached: bool, caplog) -> None:
    """Every later call of the set is still there, but its graphs read kept outputs the left-out
    graph would have written: from the gap on, the generation runs as it is."""
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    handle = smoothcache.cache(pipe, schedule) if cached else None
    full, gap = guided_loop(pipe), guided_loop(pipe, skip_uncond_at=(2,))
    with StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
        guided_loop(pipe)
        guided_loop(pipe)  # captured: two calls at every step
        assert graphs.stats.captured == 2 * STEPS
        with caplog.at_level("INFO", logger="smoothcache.graph_replay"):
            replayed_with_gap = guided_loop(pipe, skip_uncond_at=(2,))
        assert graphs.stats.replayed == 5 and graphs.stats.incomplete == 1  # steps 0-1 and step 2's first call
    assert "Step 4 (call 1) of this generation is not the next captured call" in caplog.text
    if cached:  # replays kept nothing: from step 3, a reusing step, the cache computes
        assert not torch.equal(replayed_with_gap, gap) and "differs slightly from the cache's" in caplog.text
    else:  # the plain path from the gap on: the same output
        assert torch.equal(replayed_with_gap, gap) and not torch.equal(gap, full)
    if handle is not None:
        handle.disable()


def on_scheduler_step(pipe, n: int, action) -> None:
    """Run ``action`` at the pipeline's ``n``-th scheduler step (1-based), once."""
    real, calls = type(pipe.scheduler).step, [0]

    def step(scheduler, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            action()
        return real(scheduler, *args, **kwargs)

    pipe.scheduler.step = step.__get__(pipe.scheduler)


def test_a_capture_cut_short_leaves_no_partial_set_behind() -> None:
    """A capture generation interrupted at step 6 (an error, a user's interrupt) holds graphs of
    steps 0-5 only: the next generation captures afresh rather than replaying them and falling back."""
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule):
        cached = generate(pipe)
    with smoothcache.cache(pipe, schedule), StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
        generate(pipe)

        def interrupt() -> None:
            raise KeyboardInterrupt

        on_scheduler_step(pipe, 6, interrupt)
        with pytest.raises(KeyboardInterrupt):
            generate(pipe)
        del pipe.scheduler.step
        assert graphs.stats.captured == 6
        outputs = [generate(pipe) for _ in range(2)]  # captured whole, then replayed
        assert graphs.stats.incomplete == 0 and graphs.stats.captured == 6 + STEPS and graphs.stats.replayed == STEPS
    assert all(torch.equal(output, cached) for output in outputs)


def test_dropping_the_graphs_in_the_middle_of_a_replayed_generation_says_what_it_costs(caplog) -> None:
    pipe = make_dit_pipeline()
    with smoothcache.cache(pipe, Schedule.fixed_interval(["block"], STEPS, 2)):
        graphs = StepGraphs(pipe, capture=OpReplayCapture())
        generate(pipe)
        generate(pipe)
        on_scheduler_step(pipe, 4, graphs.drop)
        with caplog.at_level("WARNING", logger="smoothcache.graph_replay"):
            generate(pipe)
        assert "Step graphs were dropped after 4 replayed calls" in caplog.text
        assert "differs slightly from the cache's alone" in caplog.text
        del pipe.scheduler.step
        graphs.disable()


def test_with_prefetched_timesteps_the_replays_are_the_plain_path() -> None:
    """prefetch_timesteps answers the pipeline's per-step timestep copies from one made per
    generation: the replayed calls read those, and the output stays the plain path's."""
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule):
        plain = generate(pipe)
        with smoothcache.prefetch_timesteps(pipe), StepGraphs(pipe, capture=OpReplayCapture()) as graphs:
            outputs = [generate(pipe) for _ in range(3)]
            assert counts(graphs) == (STEPS, STEPS, STEPS) and graphs.stats.incomplete == 0
    assert all(torch.equal(output, plain) for output in outputs)


def test_a_generations_start_is_a_named_range_in_profiler_traces() -> None:
    """Where a traced generation's start goes (the model check): one range per generation."""
    from torch.profiler import ProfilerActivity, profile

    pipe = make_dit_pipeline()
    graphs = StepGraphs(pipe, capture=OpReplayCapture())
    generate(pipe)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        generate(pipe)
    names = [e.name for e in profiler.events()]
    assert names.count("smoothcache.step_graphs: new generation") == 1
    graphs.disable()
