"""A CUDA graph's replay semantics on the CPU, for step_graphs' tests.

:class:`OpReplayCapture` captures a call by recording every ATen operation it dispatches (a
``TorchDispatchMode``), with the very tensors it read and wrote. A replay copies the fresh inputs
into the captured ones and runs those operations again on the same tensors, writing each result
into the tensor the capture produced. None of the model's Python runs on replay: not its forward,
not the cache's forwards, not their bookkeeping; what a replay reads is whatever those tensors'
memory holds, exactly as a CUDA graph reads fixed addresses. So a state bug that only real graphs
would show (a value the Python side updates at every call, a tensor the cache replaces rather than
writes into) shows here as a wrong output. A value read back on the host during capture (``.item()``,
``bool(tensor)``) raises, as it does inside a CUDA capture.

Operations whose output shape depends on the values (``nonzero``, ``masked_select``) raise too.

A tensor a graph reads that no capture of its pool made (a parameter, a buffer, something the
model or the cache made outside the captures) is held weakly, as a CUDA graph holds only its
address: a replay that finds it gone raises, where a GPU would read freed memory. Views of such a
tensor and in-place writes to it are not held either (a view would keep it alive): a replay makes
them again from it. Tensors made by the pool's captures are held for good, as the pool keeps their
memory.

What it does not model: the pool reusing a freed tensor's memory for a later capture's (it keeps
them all; replayed in the order captured, as step_graphs does, that makes no difference); values
read on the host without an ATen operation
(``.tolist()``, ``.numpy()`` on the CPU), which it bakes in where a capture fails; operations that
change a tensor's shape in place (``unsqueeze_``, ``resize_``, ``out=`` into an empty tensor), which
it does not replay right; kernels' own streams and the side stream the capture runs on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from smoothcache.graph_replay import copy_inputs, static_inputs

Operation = tuple[Any, tuple[Any, ...], dict[str, Any], list[Any], bool]

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
               torch.ops.aten.is_nonzero.default}
# an output whose shape depends on the values (nonzero, masked_select, unique): the host must read them
_DATA_DEPENDENT = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}
# the tensor made by torch.tensor(...) enters dispatch here, made outside any operation
_CONSTANTS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class _Outside:
    """A tensor the pool's captures did not make, held as a graph holds it: by its address only."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.shape = tuple(tensor.shape)

    def get(self, func: Any, _: dict[int, list[Any]]) -> torch.Tensor:
        tensor = self.ref()
        if tensor is None:
            raise RuntimeError(f"a replayed graph reads freed memory: {func} reads a tensor of shape {self.shape} that "
                               "was made outside the captures and is gone")
        return tensor


class _Derived:
    """A view of, or an in-place write to, a tensor made outside: not held (a view would hold the
    outside tensor alive, which a graph does not), but made again on replay by its operation."""

    def __init__(self, operation: int, leaf: int) -> None:
        self.operation, self.leaf = operation, leaf

    def get(self, _: Any, made_again: dict[int, list[Any]]) -> torch.Tensor:
        return made_again[self.operation][self.leaf]


def _storage(tensor: torch.Tensor) -> int | None:
    return tensor.untyped_storage()._cdata if tensor.numel() else None


class _Recorder(TorchDispatchMode):
    def __init__(self, made: set[int]) -> None:
        super().__init__()
        self.operations: list[Operation] = []
        self.made = made  # ids of the tensors the pool's captures made, and the captured inputs
        self.derived: dict[int, tuple[weakref.ref, _Derived]] = {}  # this capture's, by id

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _HOST_READS or _DATA_DEPENDENT & set(func.tags):
            raise RuntimeError(f"operation not permitted when stream is capturing ({func} reads a value on the host)")
        output = func(*args, **kwargs)
        if func in _CONSTANTS:  # torch.tensor(...) in the forward: a constant of the graph, as a capture bakes it
            self.made.update(id(t) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        held_args, held_kwargs = pytree.tree_map(self._held, (args, kwargs))
        # an output sharing memory with an outside tensor read here is that tensor's view or itself
        outside = {_storage(t) for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and id(t) not in self.made} - {None}
        recorded, aliases = [], False
        for leaf_index, leaf in enumerate(pytree.tree_leaves(output)):
            if isinstance(leaf, torch.Tensor) and _storage(leaf) in outside:
                self.derived[id(leaf)] = (weakref.ref(leaf), _Derived(len(self.operations), leaf_index))
                recorded.append(None)
                aliases = True
            else:
                if isinstance(leaf, torch.Tensor):
                    self.made.add(id(leaf))
                recorded.append(leaf)
        self.operations.append((func, held_args, held_kwargs, recorded, aliases))
        return output

    def _held(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or id(value) in self.made:
            return value
        ref, derived = self.derived.get(id(value), (None, None))
        if ref is not None and ref() is value:
            return derived
        return _Outside(value)


def _resolved(func: Any, value: Any, made_again: dict[int, list[Any]]) -> Any:
    return pytree.tree_map(lambda v: v.get(func, made_again) if isinstance(v, (_Outside, _Derived)) else v, value)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _run(operations: list[Operation]) -> None:
    made_again: dict[int, list[Any]] = {}  # the results of operations on outside tensors, this replay's
    with torch.no_grad():
        for index, (func, args, kwargs, recorded, aliases) in enumerate(operations):
            result = func(*_resolved(func, args, made_again), **_resolved(func, kwargs, made_again))
            values = pytree.tree_leaves(result)
            if aliases:
                made_again[index] = values
            for into, value in zip(recorded, values, strict=True):
                if isinstance(into, torch.Tensor) and not _same_memory(into, value):
                    into.copy_(value)  # a fresh result lands where the capture's was


class OpReplayCapture:
    """Captures a call as its list of operations; a replay reruns them on the captured tensors only."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.pools = 0
        self.replays = 0
        self.operations = 0  # recorded in the last capture
        self.fail_at_step = fail_at_step
        self._made: set[int] = set()  # the current pool's tensors (kept alive by its recordings)

    def new_pool(self) -> None:
        self.pools += 1
        self._made = set()

    def __call__(self, forward: Callable[..., Any], leaves: list[Any], spec: Any, key: Any) -> tuple[Callable[[list[Any]], Any], Any]:
        if self.fail_at_step is not None and key[0] == self.fail_at_step:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = static_inputs(leaves)  # as the CUDA capture makes them
        args, kwargs = pytree.tree_unflatten(static, spec)
        self._made.update(id(t) for t in static if isinstance(t, torch.Tensor))
        recorder = _Recorder(self._made)
        with recorder:
            output = forward(*args, **kwargs)
        operations = recorder.operations
        self.operations = len(operations)

        def replay(fresh: list[Any]) -> Any:
            self.replays += 1
            copy_inputs(static, fresh)
            _run(operations)
            return output

        return replay, replay(leaves)
