"""smoothcache.runtime.regional: how each chain runs in a generation, from where the model is compiled.
(That a chain under regional compile keeps one residual and matches eager outputs is in test_compile.py.)"""

from __future__ import annotations

import dataclasses

from torch import nn

from smoothcache.runtime.forwards import Decision
from smoothcache.runtime.regional import (
    ChainedBlock,
    CompiledBlockCall,
    route_chains,
    unwrap_compiled_calls,
)
from smoothcache.runtime.streams import BlockChain


def chained_model() -> tuple[nn.Module, list[ChainedBlock]]:
    model = nn.Module()
    model.stack = nn.Module()
    model.stack.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    chain = BlockChain(2, streams=None, forecast=False)  # type: ignore[arg-type]  # (routing reads no stream)
    return model, [ChainedBlock(block, f"stack.blocks.{i}", chain, i, Decision(), None, [False])  # type: ignore[arg-type]
                   for i, block in enumerate(model.stack.blocks)]


def test_blocks_compiled_on_their_own_run_the_chain_around_their_compiled_calls():
    model, blocks = chained_model()
    route_chains(model, blocks, whole_model_compiled=False)
    assert blocks[0].chain.active and all(b.module._compiled_call_impl is None for b in blocks)  # eager: as it was
    for block in blocks:
        block.module.compile(backend="eager")
    compiled = [b.module._compiled_call_impl for b in blocks]
    route_chains(model, blocks, whole_model_compiled=False)
    route_chains(model, blocks, whole_model_compiled=False)  # each generation: wrapped once
    calls = [b.module._compiled_call_impl for b in blocks]
    assert blocks[0].chain.active
    assert all(isinstance(c, CompiledBlockCall) and c.compiled is original for c, original in zip(calls, compiled, strict=True))
    unwrap_compiled_calls(blocks)
    assert [b.module._compiled_call_impl for b in blocks] == compiled


def test_a_chain_traced_inside_another_compiled_module_is_off_and_one_compiled_whole_is_traced_whole():
    model, blocks = chained_model()
    for block in blocks:
        block.module.compile(backend="eager")
    compiled = [b.module._compiled_call_impl for b in blocks]
    route_chains(model, blocks, whole_model_compiled=False)
    model.stack.compile(backend="eager")  # its graph would trace the blocks' bookkeeping
    route_chains(model, blocks, whole_model_compiled=False)
    assert not blocks[0].chain.active and [b.module._compiled_call_impl for b in blocks] == compiled
    route_chains(model, blocks, whole_model_compiled=True)
    assert blocks[0].chain.active and [b.module._compiled_call_impl for b in blocks] == compiled


def test_another_handles_leftover_wrapper_is_replaced_not_wrapped_again():
    model, blocks = chained_model()
    blocks[0].module.compile(backend="eager")
    original = blocks[0].module._compiled_call_impl
    blocks[0].module._compiled_call_impl = CompiledBlockCall(original, dataclasses.replace(blocks[0]))
    route_chains(model, blocks[:1], whole_model_compiled=False)
    call = blocks[0].module._compiled_call_impl
    assert isinstance(call, CompiledBlockCall) and call.block is blocks[0] and call.compiled is original
