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
address: a replay that finds it gone raises, where a GPU would read freed memory. Tensors made by
the pool's captures are held for good, as the pool keeps their memory.

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

Operation = tuple[Any, tuple[Any, ...], dict[str, Any], Any]

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
               torch.ops.aten.is_nonzero.default}
# an output whose shape depends on the values (nonzero, masked_select, unique): the host must read them
_DATA_DEPENDENT = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}


class _Outside:
    """A tensor the pool's captures did not make, held as a graph holds it: by its address only."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.shape = tuple(tensor.shape)

    def get(self, func: Any) -> torch.Tensor:
        tensor = self.ref()
        if tensor is None:
            raise RuntimeError(f"a replayed graph reads freed memory: {func} reads a tensor of shape {self.shape} that "
                               "was made outside the captures and is gone")
        return tensor


class _Recorder(TorchDispatchMode):
    def __init__(self, made: set[int]) -> None:
        super().__init__()
        self.operations: list[Operation] = []
        self.made = made  # ids of the tensors the pool's captures made, and the captured inputs

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _HOST_READS or _DATA_DEPENDENT & set(func.tags):
            raise RuntimeError(f"operation not permitted when stream is capturing ({func} reads a value on the host)")
        output = func(*args, **kwargs)
        held_args, held_kwargs = pytree.tree_map(self._held, (args, kwargs))
        self.operations.append((func, held_args, held_kwargs, output))
        self.made.update(id(t) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
        return output

    def _held(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and id(value) not in self.made:
            return _Outside(value)
        return value


def _resolved(func: Any, value: Any) -> Any:
    return pytree.tree_map(lambda v: v.get(func) if isinstance(v, _Outside) else v, value)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _run(operations: list[Operation]) -> None:
    with torch.no_grad():
        for func, args, kwargs, recorded in operations:
            result = func(*_resolved(func, args), **_resolved(func, kwargs))
            for into, value in zip(pytree.tree_leaves(recorded), pytree.tree_leaves(result), strict=True):
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
