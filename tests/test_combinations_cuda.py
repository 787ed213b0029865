"""The GPU half of test_combinations.py (issue 21): what users stack on a pipeline that computes on
CUDA. Accelerate's model and sequential CPU offloading, diffusers' group offloading onto the GPU
(block and leaf level), torchao int8 and float8 weight-only weights, each before and after cache();
bitsandbytes int8 and NF4 weights, loaded quantized before cache().
For each: the cache computes each layer exactly on its plan's steps, an all-ones schedule is
bit-identical to the uncached run, kept outputs live on the GPU, nothing stays behind across
generations or after disable(), and disable() leaves the model exactly as without a cache. Also
kept outputs stored on the host or in float8 (cache(kept_device=, kept_dtype=)) on the GPU.

On the tiny SD3 pipeline of test_combinations.py; skipped without CUDA."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import test_sd3
from models.conftest import STEPS, text_embeddings
from models.test_sd3 import generate, make_pipeline
from test_combinations import PLAN, SCHEDULE, computes, int8

import smoothcache
from smoothcache import Schedule

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("deterministic_convolutions")]

GPU, CPU = torch.device("cuda"), torch.device("cpu")
BLOCKS = Schedule({"block": PLAN})
ALL_ONES = Schedule({key: (1,) * STEPS for key in SCHEDULE.keys})


@pytest.fixture(autouse=True)
def embeddings_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Diffusers hands prompt embeddings it is given to the transformer where they are (only
    offloading hooks move them), so test_sd3's stand-ins are made on the GPU here."""
    monkeypatch.setattr(test_sd3, "text_embeddings", lambda *shape: text_embeddings(*shape).to(GPU))



# ---- what is stacked: each takes a tiny SD3 pipeline built on the CPU and makes it compute on the GPU
def on_the_gpu(pipe) -> None:
    pipe.to(GPU)


def model_offload(pipe) -> None:
    pipe.enable_model_cpu_offload(device=GPU)


def sequential_offload(pipe) -> None:
    pipe.enable_sequential_cpu_offload(device=GPU)


def block_group_offload(pipe) -> None:
    pipe.vae.to(GPU)  # only the transformer is offloaded: the pipeline decodes where it computes
    pipe.transformer.enable_group_offload(GPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1)


def leaf_group_offload(pipe) -> None:
    pipe.vae.to(GPU)
    pipe.transformer.enable_group_offload(GPU, offload_device=CPU, offload_type="leaf_level")


def int8_on_the_gpu(pipe) -> None:
    on_the_gpu(pipe)
    int8(pipe)


def float8_on_the_gpu(pipe) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torchao's float8 weights need compute capability 8.9 or later")
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    on_the_gpu(pipe)
    quantize_(pipe.transformer, Float8WeightOnlyConfig())


def bitsandbytes_loaded(pipe, **quantization: Any) -> None:
    """The transformer loaded through ``from_pretrained`` with a ``BitsAndBytesConfig``, as users
    load it: bitsandbytes quantizes while loading, onto the GPU, so it only ever comes before cache()."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    try:  # a wheel without binaries for this CUDA imports, then fails at its first kernel
        bitsandbytes.functional.int8_vectorwise_quant(torch.ones(2, 2, device=GPU, dtype=torch.float16))
    except Exception as error:  # noqa: BLE001 - whatever it raises, it cannot run here
        pytest.skip(f"bitsandbytes cannot run on this GPU: {type(error).__name__}: {str(error)[:200]}")
    from diffusers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        pipe.transformer.save_pretrained(folder)
        quantized = type(pipe.transformer).from_pretrained(  # the other modules stay in the model's float32
            folder, quantization_config=BitsAndBytesConfig(**quantization), torch_dtype=torch.float32)
    pipe.register_modules(transformer=quantized)
    pipe.vae.to(GPU)


def bnb_int8(pipe) -> None:
    bitsandbytes_loaded(pipe, load_in_8bit=True)


def bnb_nf4(pipe) -> None:
    bitsandbytes_loaded(pipe, load_in_4bit=True, bnb_4bit_quant_type="nf4")


BOTH, BEFORE = ("before", "after"), ("before",)
STACKS = {  # id: (stack, where it can come relative to cache())
    "model-offload": (model_offload, BOTH), "sequential-offload": (sequential_offload, BOTH),
    "group-offload-blocks": (block_group_offload, BOTH), "group-offload-leaves": (leaf_group_offload, BOTH),
    "int8": (int8_on_the_gpu, BOTH), "float8": (float8_on_the_gpu, BOTH),
    "bitsandbytes-int8": (bnb_int8, BEFORE), "bitsandbytes-nf4": (bnb_nf4, BEFORE),
}
stacks = pytest.mark.parametrize("stack", [stack for stack, _ in STACKS.values()], ids=list(STACKS))
stacks_and_orders = pytest.mark.parametrize("stack, order", [
    pytest.param(stack, order, id=f"{name}-{order}") for name, (stack, orders) in STACKS.items() for order in orders
])


def stacked(stack: Callable[[Any], None]) -> Any:
    """A fresh tiny SD3 pipeline with ``stack`` applied."""
    pipe = make_pipeline()
    stack(pipe)
    return pipe


def gpu_name() -> str:
    """The device string ``kept_bytes()`` gives for tensors on the current GPU ("cuda:0")."""
    return str(torch.device("cuda", torch.cuda.current_device()))


@stacks_and_orders
def test_a_stacked_feature_caches_exactly_and_disable_restores_it(stack, order):
    uncached, cached, runs = computes(make_pipeline(), SCHEDULE, order, stack)
    assert torch.equal(uncached, generate(stacked(stack)))  # disable() left the model exactly as without a cache
    assert set(runs.values()) == {sum(PLAN)}  # every cached layer ran on its plan's compute steps only
    assert not torch.equal(cached, uncached)


@stacks_and_orders
def test_an_all_ones_schedule_is_bit_identical_to_the_uncached_run(stack, order):
    uncached = generate(stacked(stack))
    pipe = make_pipeline()
    if order == "before":
        stack(pipe)
    with smoothcache.cache(pipe, ALL_ONES):
        if order == "after":
            stack(pipe)
        assert torch.equal(generate(pipe), uncached)


@stacks
def test_kept_outputs_stay_on_the_gpu_and_nothing_is_left_behind(stack):
    pipe = stacked(stack)
    generate(pipe)  # the feature's own first-call allocations (cuBLAS workspace, offloading buffers) come first
    gc.collect()
    before = torch.cuda.memory_allocated()
    handle = smoothcache.cache(pipe, SCHEDULE)
    kept = []
    for _ in range(3):
        generate(pipe)
        kept.append(handle.state.kept_bytes())
    handle.disable()
    gc.collect()
    held = kept[-1].get(gpu_name(), 0)
    assert set(kept[0]) == {gpu_name()} and held > 0  # kept where the model computes
    assert kept[1] == kept[2]  # a generation replaces the last one's outputs, adds none
    assert abs(torch.cuda.memory_allocated() - before) < held  # what the cache held is released (allocator rounding aside)


def kept_run(pipe, schedule: Schedule, **form: Any) -> tuple[torch.Tensor, dict[str, int]]:
    """The output of a cached generation, and the bytes the cache holds after it, by device."""
    with smoothcache.cache(pipe, schedule, **form) as handle:
        output = generate(pipe)
        return output, handle.state.kept_bytes()


@pytest.mark.parametrize("schedule", [SCHEDULE, BLOCKS], ids=["layers", "blocks"])
def test_kept_outputs_on_the_host_reuse_exactly_on_the_gpu(schedule):
    pipe = stacked(on_the_gpu)
    on_gpu, on_gpu_bytes = kept_run(pipe, schedule)
    on_host, on_host_bytes = kept_run(pipe, schedule, kept_device="cpu")
    assert set(on_host_bytes) == {"cpu"} and on_host_bytes["cpu"] == on_gpu_bytes[gpu_name()] > 0
    assert torch.equal(on_host, on_gpu)  # a round trip through the host in the same precision is exact


@pytest.mark.parametrize("schedule", [SCHEDULE, BLOCKS], ids=["layers", "blocks"])
def test_kept_outputs_in_float8_hold_a_quarter_and_round_only_the_reuses(schedule):
    pipe = stacked(on_the_gpu)  # a float32 model: float8 kept outputs are a quarter of its bytes
    full, full_bytes = kept_run(pipe, schedule)
    small, small_bytes = kept_run(pipe, schedule, kept_dtype=torch.float8_e4m3fn)
    assert set(small_bytes) == {gpu_name()} and small_bytes[gpu_name()] * 4 == full_bytes[gpu_name()] > 0
    assert not torch.equal(small, full) and torch.isfinite(small).all()  # reuses rounded to float8
    all_ones = Schedule({key: (1,) * STEPS for key in schedule.keys})
    assert torch.equal(kept_run(pipe, all_ones, kept_dtype=torch.float8_e4m3fn)[0], generate(pipe))  # computing steps exact
