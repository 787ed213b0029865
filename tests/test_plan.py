"""The cache's plan, checked on lists: which forward each layer runs and which decision columns it
follows, before any module is touched (smoothcache.runtime.plan)."""

from __future__ import annotations

import pytest
from torch import nn

from smoothcache import BlockCachingError, Schedule, ScheduleError
from smoothcache.adapters import CacheableLayer
from smoothcache.runtime.plan import keeps, plan_cache, split_branches

A = (1, 0, 1, 0, 1)
B = (1, 1, 0, 0, 1)


def layer(name: str, layer_type: str, block: int | None, **kwargs) -> CacheableLayer:
    return CacheableLayer(name, nn.Identity(), layer_type, block, **kwargs)


def dit_layers(blocks: int = 2) -> list[CacheableLayer]:
    return [layer(f"transformer_blocks.{b}.{t}", t, b) for b in range(blocks) for t in ("attn1", "ff")]


def dit_blocks(blocks: int) -> list[CacheableLayer]:
    return [layer(f"transformer_blocks.{b}", "block", b, streams=("hidden_states",)) for b in range(blocks)]


def order(layers: list[CacheableLayer]) -> dict[str, int]:
    """Module order as named_modules() gives it: blocks before their layers."""
    names: list[str] = []
    for item in layers:
        parent = item.name.rpartition(".")[0]
        names += [n for n in (parent, item.name) if n not in names]
    return {name: i for i, name in enumerate(names)}


def plan(schedule: dict, layers: list[CacheableLayer], forecast: bool = False, branch_order=None):
    return plan_cache(split_branches(Schedule(schedule)), layers, branch_order=branch_order, forecast=forecast,
                      module_order=order(layers), model_name="Tiny")


def test_each_layer_follows_the_column_of_the_key_that_governs_it_per_block_first():
    result = plan({"attn1": A, "ff": B, "ff-1": A}, dit_layers())
    assert [(c.key, c.compute) for c in result.columns] == [
        ("attn1", tuple(map(bool, A))), ("ff", tuple(map(bool, B))), ("ff-1", tuple(map(bool, A)))]
    assert [(p.layer.name, p.kind, p.columns) for p in result.layers] == [
        ("transformer_blocks.0.attn1", "layer", (0,)), ("transformer_blocks.0.ff", "layer", (1,)),
        ("transformer_blocks.1.attn1", "layer", (0,)), ("transformer_blocks.1.ff", "layer", (2,))]
    assert all(c.keep == (True,) * 5 and c.ratio == (0.0,) * 5 for c in result.columns)  # layers keep regardless


def test_forecasting_layers_get_the_extrapolation_ratios_of_their_column():
    result = plan({"attn1": (1, 1, 0, 0, 1)}, dit_layers(), forecast=True)
    assert {p.kind for p in result.layers} == {"forecast"}
    assert result.columns[0].ratio == (0.0, 0.0, 1.0, 2.0, 0.0)


def test_a_block_keeps_its_residual_only_where_the_next_step_reuses_it_and_the_first_of_a_list_keeps_the_residual():
    result = plan({"block": A}, dit_blocks(3))
    assert result.columns[0].keep == keeps(tuple(map(bool, A))) == (True, False, True, False, False)
    assert [(p.kind, p.keep_states) for p in result.layers] == [("block", False), ("block", True), ("block", True)]
    assert plan({"block": A}, dit_blocks(2), forecast=True).layers[0].kind == "block-forecast"


def test_guidance_branch_keys_get_two_columns_in_batch_order_and_a_made_up_base_key():
    split = split_branches(Schedule({"attn1@cond": A, "attn1@uncond": B}))
    assert split.schedule.plans == {"attn1": (1, 1, 1, 0, 1)} and split.made_up == {"attn1"}
    result = plan({"attn1@cond": A, "attn1@uncond": B}, dit_layers(1), branch_order=("uncond", "cond"))
    [attn] = result.layers
    assert attn.kind == "branches" and result.splits_guidance
    assert [result.columns[c].compute for c in attn.columns] == [tuple(map(bool, B)), tuple(map(bool, A))]


def test_a_branch_key_whose_other_half_has_no_plan_is_refused():
    with pytest.raises(ScheduleError, match="no key plans its uncond half"):
        plan({"attn1@cond": A}, dit_layers(1), branch_order=("cond", "uncond"))


def test_a_key_that_governs_no_layer_and_a_block_cached_with_its_layers_are_refused():
    with pytest.raises(ScheduleError, match=r"Schedule keys \['attn2'\] match no layer of Tiny"):
        plan({"attn1": A, "attn2": A}, dit_layers())
    with pytest.raises(BlockCachingError, match="both cache transformer_blocks.0"):
        plan({"block": A, "attn1": A}, dit_blocks(1) + dit_layers(1))


def test_stream_barriers_close_every_fourth_block_and_look_ahead_within_one_module_list():
    layers = dit_layers(6) + [layer("single_blocks.0.attn", "attn", 0)]
    result = plan({"attn1": A, "ff": B, "attn": A}, layers)
    barriers = [(b.block, b.closes_group, b.following is not None) for b in result.barriers]
    assert barriers == [(f"transformer_blocks.{i}", i == 3, i < 5) for i in range(6)] + [("single_blocks.0", False, False)]
    assert result.barriers[0].columns == (0, 1)


def test_patterns_count_the_distinct_steps_and_the_all_compute_step():
    assert plan({"attn1": (1, 1, 1)}, dit_layers()).patterns() == 1
    assert plan({"attn1": A}, dit_layers()).patterns() == 2  # compute, reuse
    assert plan({"attn1": A, "ff": B}, dit_layers()).patterns() == 4  # (1,1), (0,1), (1,0), (0,0)
