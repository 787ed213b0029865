"""Chained blocks under regional compile: each block compiled on its own (``Module.compile``,
diffusers' ``compile_repeated_blocks``).

A chain (:class:`~.streams.BlockChain`) keeps one residual per stream and list because its
bookkeeping follows the stream from block to block in Python. Traced inside each block's graph,
that bookkeeping would specialise every graph on the block's place in the chain, so the chain used
to be switched off there and each block kept its own residual: on Wan 2.1 (30 blocks, guidance as
two calls) 62 hidden states instead of 2. Here the bookkeeping runs around each block's compiled
call instead (:class:`CompiledBlockCall`): the graph holds the plain block, the same one at every
step, and the chain keeps what it keeps eagerly.

:func:`route_chains` decides, at each generation's start, how every chain runs: traced in the
model's one graph (compiled whole), around the blocks' own compiled calls, eagerly, or, where that
would not be exact, switched off (each block on its own again, traced in its own graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .compile import compiled_whole
from .forwards import Decision, link_block
from .streams import BlockChain, BlockStreams

__all__ = ["ChainedBlock", "CompiledBlockCall", "route_chains", "unwrap_compiled_calls"]


@dataclass(frozen=True, eq=False)
class ChainedBlock:
    """One block of a chain, as the handle attached it: what its compiled call needs."""

    module: nn.Module
    name: str  # its path in the model
    chain: BlockChain
    position: int
    decision: Decision
    streams: BlockStreams
    inside: list[bool]  # read by its chained forward: True while its compiled call runs the graph


class CompiledBlockCall:
    """Stands in for a chained block's compiled call (``module._compiled_call_impl``).

    A computing call runs the compiled block with the chained forward stepping aside (``inside``),
    then links the block into the chain where the next step reuses; a reusing call runs the
    module's ``_call_impl`` eagerly, hooks included, where the chained forward adds the kept
    residual or passes the stream on, with no graph to enter."""

    __slots__ = ("block", "compiled")

    def __init__(self, compiled: Any, block: ChainedBlock) -> None:
        self.compiled, self.block = compiled, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        if not block.decision.compute:
            return block.module._call_impl(*args, **kwargs)
        inputs = block.streams.inputs(args, kwargs) if block.decision.keep else ()
        block.inside[0] = True
        try:
            output = self.compiled(*args, **kwargs)
        finally:
            block.inside[0] = False
        if block.decision.keep:  # as the chained forward does eagerly: the next step reuses
            outputs = block.chain.kept[block.position]
            link_block(block.chain, block.position, outputs, block.decision, block.streams.states(output, inputs))
        return output

    def get_compiler_config(self) -> Any:
        """The compiled call's settings (``mode="reduce-overhead"`` shows here: see ``cuda_graphs_anywhere``)."""
        get_config = getattr(self.compiled, "get_compiler_config", None)
        return get_config() if callable(get_config) else None


def route_chains(model: nn.Module, blocks: Sequence[ChainedBlock], whole_model_compiled: bool,
                 anchor: nn.Module | None = None, *, marked_by_anchor: bool = False) -> None:
    """Set each chain on or off for the next generation and wrap or unwrap its blocks' compiled
    calls. A model compiled whole traces every chain in its graph (no wrapping). Otherwise a chain
    none of whose blocks runs compiled runs eagerly; one whose blocks are compiled in place runs
    around their compiled calls (:class:`CompiledBlockCall`) where that is exact, else it is off and
    each block keeps its own residual, traced in its own graph: where a block sits in another
    compiled module (its graph would trace the bookkeeping), where a block has hooks of its own
    (they would see the stream before and after it, not the chained forward; the ``anchor``'s step
    hook aside), or where the generation's calls are marked by the ``anchor`` from inside its call
    (``marked_by_anchor``: the model's own hooks do not run, so the first block's decisions are
    set only inside it, after its wrapper has read them)."""
    chains: dict[int, list[ChainedBlock]] = {}
    for block in blocks:
        chains.setdefault(id(block.chain), []).append(block)
    for members in chains.values():
        chain = members[0].chain
        in_place = whole_model_compiled or all(_compiled_in_place_alone(model, block) for block in members)
        eager = in_place and all(block.module._compiled_call_impl is None for block in members)
        if whole_model_compiled or eager:
            chain.active, wrapped = True, False  # traced in the model's graph (no path looked up), or eager
        else:
            chain.active = wrapped = in_place and not _global_hooks() and all(
                _hooks_of(block.module) == (int(block.module is anchor), 0)
                and not (block.module is anchor and marked_by_anchor)
                for block in members
            )
        for block in members:
            if wrapped and block.module._compiled_call_impl is not None:
                _wrap(block)
            else:
                _unwrap(block)


def _wrap(block: ChainedBlock) -> None:
    compiled = block.module._compiled_call_impl
    if isinstance(compiled, CompiledBlockCall):
        if compiled.block is block:
            return
        compiled = compiled.compiled  # another handle's, left behind
    block.module._compiled_call_impl = CompiledBlockCall(compiled, block)


def unwrap_compiled_calls(blocks: Sequence[ChainedBlock]) -> None:
    """Give each block back the compiled call it had (the handle is disabled)."""
    for block in blocks:
        _unwrap(block)


def _unwrap(block: ChainedBlock) -> None:
    call = block.module._compiled_call_impl
    if isinstance(call, CompiledBlockCall) and call.block is block:
        block.module._compiled_call_impl = call.compiled


def _compiled_in_place_alone(model: nn.Module, block: ChainedBlock) -> bool:
    """Whether the block runs eagerly or compiled in place (``Module.compile``), in no other
    compiled module and not replaced by a compiled wrapper (``blocks[i] = torch.compile(block)``)."""
    return not _inside_compiled(model, block.name) and model.get_submodule(block.name) is block.module


def _hooks_of(module: nn.Module) -> tuple[int, int]:
    """The module's own forward pre-hooks and forward hooks."""
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in ("_global_forward_pre_hooks", "_global_forward_hooks"))


def _inside_compiled(model: nn.Module, name: str) -> bool:
    """Whether a module between ``model`` and the block ``name`` (both left out) runs compiled."""
    parts = name.split(".")
    return any(compiled_whole(model.get_submodule(".".join(parts[:end]))) for end in range(1, len(parts)))
