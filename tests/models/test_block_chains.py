"""A module list cached whole on one key is reused as one chain (one kept residual per stream):
for every family, outputs match the same plan reused block by block, with less memory held."""

import importlib

import pytest
import torch

import smoothcache
from smoothcache import Schedule, find_layers
from smoothcache.keys import key_for

from .conftest import calibrated_schedule
from .test_whole_blocks import FAMILIES, _has, block_components


@pytest.mark.parametrize("name", FAMILIES)
def test_a_list_reused_as_one_matches_its_blocks_reused_one_by_one(name):
    family_test = importlib.import_module(f".test_{name}", __package__)
    pipe, generate = family_test.make_pipeline(), family_test.generate
    components = [c for c in block_components(pipe.transformer) if _has(pipe.transformer, c)]
    schedule = calibrated_schedule(pipe, generate, components)
    layers = find_layers(pipe.transformer, components)
    one_by_one = Schedule({
        f"{layer.layer_type}-{layer.block}": schedule.plans[key_for(schedule.plans, layer.layer_type, layer.block)]
        for layer in layers
    })
    with smoothcache.cache(pipe, schedule) as handle:
        chained = generate(pipe)
        chained_bytes = sum(handle.state.kept_bytes().values())
        chains = sum(layer_plan.chain is not None for layer_plan in handle.plan.layers)
    with smoothcache.cache(pipe, one_by_one) as handle:
        per_block = generate(pipe)
        per_block_bytes = sum(handle.state.kept_bytes().values())
    assert chains > 0, name  # (a list of one block does not chain: HunyuanVideo's token refiner here)
    torch.testing.assert_close(chained, per_block, rtol=1e-4, atol=1e-4)
    # Latte interleaves its spatial and temporal lists: no block's input is its list predecessor's
    # output, so every block is a run of its own and holds what it held before
    assert 0 < chained_bytes < per_block_bytes or (name == "latte" and chained_bytes == per_block_bytes), name
