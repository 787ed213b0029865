"""What users stack on a cached pipeline: LoRA adapters (peft), int8 weights (torchao), group
offloading. Each before and after cache(): the cache skips exactly its plan, disable() restores
exactly, and the stacked feature still acts. On a tiny SD3 pipeline (its transformer takes LoRA)."""

from __future__ import annotations

import pytest
import torch
from models.conftest import STEPS
from models.test_sd3 import generate, make_pipeline
from torch import nn

import smoothcache
from smoothcache import ModelInUseError, Schedule

PLAN = tuple(1 if step % 2 == 0 or step == STEPS - 1 else 0 for step in range(STEPS))
SCHEDULE = Schedule({"attn": PLAN, "ff": PLAN})


def computes(pipe, schedule: Schedule, order: str, stack) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The output with ``stack`` applied and no cache, then cached with ``stack`` applied ``order``
    ("before"/"after" cache()), and how often each cached layer's first Linear really ran."""
    if order == "before":
        stack(pipe)
    handle = smoothcache.cache(pipe, schedule)
    if order == "after":
        stack(pipe)
    runs: dict[str, int] = {}
    hooks = []
    for layer in handle.layers:
        first = next(m for m in layer.module.modules() if isinstance(m, nn.Linear))
        runs[layer.name] = 0
        hooks.append(first.register_forward_hook(lambda *_, name=layer.name: runs.__setitem__(name, runs[name] + 1)))
    cached = generate(pipe)
    for hook in hooks:
        hook.remove()
    handle.disable()
    return generate(pipe), cached, runs


def lora(pipe) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="style")


def int8(pipe) -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(pipe.transformer, Int8WeightOnlyConfig())


def group_offload(pipe) -> None:
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")


def block_group_offload(pipe) -> None:
    """Block level: the offloading hooks wrap each block's forward (a layer cache leaves those alone
    unless the model is compiled whole, so disable() can still restore everything)."""
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("stack", [lora, int8, group_offload, block_group_offload],
                         ids=["lora", "int8", "group-offload", "group-offload-blocks"])
def test_a_stacked_feature_caches_exactly_and_disable_restores_it(stack, order):
    plain = generate(make_pipeline())
    pipe = make_pipeline()
    uncached, cached, runs = computes(pipe, SCHEDULE, order, stack)
    fresh = make_pipeline()
    stack(fresh)
    assert torch.equal(uncached, generate(fresh))  # disable() left the stacked model exactly as without a cache
    assert set(runs.values()) == {sum(PLAN)}  # every cached layer ran on its plan's compute steps only
    assert not torch.equal(cached, uncached)
    if stack not in (group_offload, block_group_offload):
        assert not torch.equal(uncached, plain)  # the feature itself acts


def test_lora_adapters_switched_and_fused_while_cached_take_effect_at_the_next_generation():
    pipe = make_pipeline()
    lora(pipe)
    with smoothcache.cache(pipe, SCHEDULE):
        with_adapter = generate(pipe)
        pipe.transformer.disable_adapters()
        without = generate(pipe)
        pipe.transformer.enable_adapters()
        assert torch.equal(generate(pipe), with_adapter)
        pipe.transformer.set_adapters(["style"], weights=[0.5])
        half = generate(pipe)
        pipe.transformer.set_adapters(["style"], weights=[1.0])
        pipe.transformer.fuse_lora()
        fused = generate(pipe)
    assert not torch.equal(without, with_adapter) and not torch.equal(half, with_adapter)
    assert torch.allclose(fused, with_adapter, atol=1e-5)  # fusing folds the same update into the weights


def test_a_cache_holding_whole_blocks_refuses_to_drop_an_offloading_hook_added_after_it():
    """Group offloading wraps each block's forward; added after a cache of whole blocks, disabling the
    cache first would drop it, so the cache says to remove the offloading first."""
    pipe = make_pipeline()
    handle = smoothcache.cache(pipe, Schedule({"block": PLAN}))
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ModelInUseError, match="was replaced after smoothcache attached"):
        handle.disable()
    assert handle.enabled  # nothing undone: the blocks still run the offloading hook around the cache
