"""From a schedule and the model's cacheable layers to one plan per layer: pure functions on lists.

A :class:`CachePlan` says, for every cached layer, which forward it runs (``kind``) and which
decision columns it follows; a :class:`Column` holds one decision's value at every step: compute
or reuse, keep the output for a later step or not, and how far to extrapolate (forecasting). The
handle (:mod:`.handle`) makes one ``Decision`` per column and, at each model call, copies the
step's entry of every column into it; nothing here touches a module.

Keys ``"<type>@cond"`` / ``"<type>@uncond"`` give each half of a classifier-free guidance batch a
plan of its own: :func:`split_branches` takes them out of the schedule, leaving a plain one whose
base keys (``"attn1"``; made up as the union of the halves' plans where the schedule has none)
find the layers, and :func:`plan_cache` gives each such layer the two branch columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal

from ..adapters import CacheableLayer
from ..errors import BlockCachingError, ScheduleError
from ..keys import BRANCHES, Key, key_for
from ..schedule import Schedule

__all__ = ["BarrierPlan", "BranchSplit", "CachePlan", "ChainLink", "Column", "LayerPlan", "keeps", "plan_cache",
           "ratios", "split_branches"]

Kind = Literal["layer", "forecast", "repeated", "branches", "block", "block-forecast"]

# Blocks of a run of reusing blocks fused into one kernel at most under whole-model torch.compile:
# few inputs per kernel, few copies (see forwards.stream_barrier_forward).
BARRIER_EVERY = 4


@dataclass(frozen=True)
class Column:
    """One decision's values at every step."""

    key: str
    compute: tuple[bool, ...]
    keep: tuple[bool, ...]
    ratio: tuple[float, ...]


@dataclass(frozen=True)
class ChainLink:
    """A block's place in a chain: every block of one module list, cached whole on one column (or of
    two lists run back to back on the same steps), which a reusing step skips with one kept residual
    per stream (:class:`~.streams.BlockChain`)."""

    chain: int  # which chain of the plan
    position: int  # the block's index in its chain
    length: int  # the chain's blocks


@dataclass(frozen=True)
class LayerPlan:
    """One cached layer: the forward it runs and the columns it follows (two, in batch order, for
    ``"branches"``; one otherwise)."""

    layer: CacheableLayer
    kind: Kind
    columns: tuple[int, ...]
    keep_states: bool = False  # a block: keep its output and inputs as they are (not the first of its list)
    chain: ChainLink | None = None  # a block reused as part of its whole list


@dataclass(frozen=True)
class BarrierPlan:
    """A block holding cached layers, shadowed under whole-model compile by a stream barrier."""

    block: str  # module path
    columns: tuple[int, ...]  # the decisions of its cached layers
    following: tuple[int, ...] | None  # those of the next such block in the same module list
    closes_group: bool  # every BARRIER_EVERY-th block


@dataclass(frozen=True)
class CachePlan:
    num_steps: int
    columns: tuple[Column, ...]
    layers: tuple[LayerPlan, ...]  # module order: the first anchors the step
    barriers: tuple[BarrierPlan, ...]
    reused_plainly: tuple[str, ...]  # with forecasting: layers that reuse without extrapolating
    splits_guidance: bool = False  # the schedule has branch keys: every model call must batch guidance

    def patterns(self) -> int:
        """How many distinct combinations of the columns' values the steps use, the all-compute one
        (steps past the schedule) included: under torch.compile, one graph each."""
        steps = set(zip(*(c.compute for c in self.columns), *(c.keep for c in self.columns),
                        *(c.ratio for c in self.columns), strict=True))
        all_compute = (True,) * 2 * len(self.columns) + (0.0,) * len(self.columns)
        return len({*steps, all_compute})


@dataclass(frozen=True)
class BranchSplit:
    """A schedule with its guidance-branch keys taken out."""

    schedule: Schedule  # base keys only
    branch_plans: dict[str, tuple[int, ...]]
    made_up: frozenset[str]  # base keys only there to cover branch layers


def split_branches(schedule: Schedule) -> BranchSplit:
    branch_plans: dict[str, tuple[int, ...]] = {}
    base: dict[str, tuple[int, ...]] = {}
    for key, plan in schedule.plans.items():
        (branch_plans if Key.parse(key).branch else base)[key] = plan
    made_up: set[str] = set()
    for key, plan in branch_plans.items():
        base_key = Key.parse(key).without_branch()
        if str(base_key) not in schedule.plans and base_key.layer_type not in schedule.plans:
            made_up.add(str(base_key))
            base[str(base_key)] = tuple(a | b for a, b in zip(base.get(str(base_key), plan), plan, strict=True))
    if not branch_plans:
        return BranchSplit(schedule, {}, frozenset())
    return BranchSplit(Schedule(base, source=schedule.source), branch_plans, frozenset(made_up))


def plan_cache(
    split: BranchSplit,
    layers: Sequence[CacheableLayer],
    *,
    branch_order: tuple[str, str] | None,
    forecast: bool,
    module_order: Mapping[str, int],
    model_name: str,
) -> CachePlan:
    """The plan for ``layers`` (module order) under ``split``; every schedule key must govern some
    layer, and every branch key some layer its base key governs."""
    schedule = split.schedule
    by_key = _assign_keys(schedule, layers, model_name)
    covered = {id(layer) for group in by_key.values() for layer in group}
    ordered = [layer for layer in layers if id(layer) in covered]
    branch_plans = _bind_branches(split, ordered) if branch_order is not None else {}
    first_blocks = _first_of_each_list(
        sorted((layer.name for layer in ordered if layer.streams is not None), key=module_order.__getitem__)
    )

    computes: list[tuple[str, tuple[bool, ...]]] = []
    keeps_column: set[int] = set()  # columns whose keep flag matters: blocks reused plainly
    forecasting: set[int] = set()
    plans: dict[int, LayerPlan] = {}
    reused_plainly: list[str] = []
    block_columns: dict[str, list[int]] = {}  # block path -> columns of its cached layers
    for key, group in by_key.items():
        column = len(computes)
        computes.append((key, tuple(v == 1 for v in schedule.plans[key])))
        for layer in group:
            governing = (column,)
            if layer.streams is not None:
                kind: Kind = "block-forecast" if forecast else "block"
                (forecasting if forecast else keeps_column).add(column)
            elif id(layer) in branch_plans:
                kind, governing = "branches", (len(computes), len(computes) + 1)
                computes += [branch_plans[id(layer)][branch] for branch in branch_order]  # type: ignore[union-attr]
            elif layer.repeats > 1:
                kind = "repeated"
            elif forecast:
                kind = "forecast"
                forecasting.add(column)
            else:
                kind = "layer"
            if forecast and kind in ("branches", "repeated"):
                reused_plainly.append(layer.name)
            if layer.streams is None:
                block = _block_path(layer)
                if block is not None:
                    mine = block_columns.setdefault(block, [])
                    mine += [c for c in governing if c not in mine]
            plans[id(layer)] = LayerPlan(layer, kind, governing, layer.streams is not None and layer.name not in first_blocks)

    columns = tuple(
        Column(key, compute, keeps(compute) if i in keeps_column else (True,) * len(compute),
               ratios(compute) if i in forecasting else (0.0,) * len(compute))
        for i, (key, compute) in enumerate(computes)
    )
    barriers = _barriers(sorted(block_columns.items(), key=lambda item: module_order[item[0]]))
    layer_plans = tuple(plans[id(layer)] for layer in ordered)
    links = _chains(layer_plans, module_order, columns)
    layer_plans = tuple(replace(p, chain=links[id(p.layer)]) if id(p.layer) in links else p for p in layer_plans)
    return CachePlan(schedule.num_steps, columns, layer_plans, barriers, tuple(reused_plainly),
                     splits_guidance=branch_order is not None)


def _chains(
    layer_plans: Sequence[LayerPlan], module_names: Mapping[str, int], columns: Sequence[Column]
) -> dict[int, ChainLink]:
    """The blocks (by ``id`` of their layer) that chain, two or more: all of one module list's
    blocks, cached whole on the same column, with the same streams, each called once per model
    call. A list that its family runs right after another (``BlockFamily.back_to_back``, which the
    family vouches for: nothing here can see what reads a list's last output) continues that list's
    chain where both qualify and their two columns compute, keep and extrapolate on the same steps:
    Flux's 57 blocks keep one residual per stream instead of two.

    Only whole lists, each on one column: a block's output may be read beyond the next block
    (HunyuanDiT passes first-half outputs to second-half blocks), so a chain must reuse or compute
    as one; and no list whose outputs leave the model (``CacheableLayer.chains``: a ControlNet's)."""
    lists: dict[str, list[LayerPlan]] = {}  # list path -> its blocks, in order, for lists that can chain
    for list_path, members in _blocks_by_list(layer_plans).items():
        indices = [member.layer.name.rpartition(".")[2] for member in members]
        if not all(index.isdigit() for index in indices):
            continue
        members = [member for _, member in sorted(zip(map(int, indices), members, strict=True), key=lambda pair: pair[0])]
        whole_list = sorted(map(int, indices)) == list(range(len(members))) and f"{list_path}.{len(members)}" not in module_names
        alike = (len({m.columns for m in members}) == 1 and len({m.layer.streams for m in members}) == 1
                 and all(m.layer.repeats == 1 and m.layer.chains for m in members))
        if whole_list and alike:
            lists[list_path] = members
    following: dict[str, str] = {}  # list path -> the list that continues its chain
    for list_path, members in lists.items():
        before_path = members[0].layer.list_before
        before = lists.get(before_path or "")
        if before_path and before and _same_steps(before[0], members[0], columns):
            following[before_path] = list_path
    links: dict[int, ChainLink] = {}
    chains = 0
    for list_path in lists:
        if list_path in following.values():
            continue  # part of the chain of the list before it
        run: list[LayerPlan] = []
        next_list: str | None = list_path
        while next_list is not None:
            run += lists[next_list]
            next_list = following.get(next_list)
        if len(run) < 2:
            continue
        for position, member in enumerate(run):
            links[id(member.layer)] = ChainLink(chains, position, len(run))
        chains += 1
    return links


def _blocks_by_list(layer_plans: Sequence[LayerPlan]) -> dict[str, list[LayerPlan]]:
    """The plans of blocks cached whole, by the module list holding them."""
    by_list: dict[str, list[LayerPlan]] = {}
    for layer_plan in layer_plans:
        if layer_plan.kind in ("block", "block-forecast"):
            by_list.setdefault(_list_of(layer_plan.layer.name), []).append(layer_plan)
    return by_list


def _same_steps(first: LayerPlan, second: LayerPlan, columns: Sequence[Column]) -> bool:
    """Whether two blocks' lists can be one chain: columns that compute, keep and extrapolate alike
    at every step (one reuse decision for both), the same streams and the same kind (plain or
    forecasting; both lists always agree on these today, but a family's declaration cannot promise it)."""
    a, b = columns[first.columns[0]], columns[second.columns[0]]
    return (first.layer.streams == second.layer.streams and first.kind == second.kind
            and (a.compute, a.keep, a.ratio) == (b.compute, b.keep, b.ratio))


def _assign_keys(schedule: Schedule, layers: Sequence[CacheableLayer], model_name: str) -> dict[str, list[CacheableLayer]]:
    """The layers grouped by the schedule key that governs them; every key must govern some."""
    by_key: dict[str, list[CacheableLayer]] = {}
    for layer in layers:
        key = key_for(schedule.plans, layer.layer_type, layer.block)
        if key is not None:
            by_key.setdefault(key, []).append(layer)
    _check_blocks_apart(by_key)
    unused = [key for key in schedule.keys if key not in by_key]
    if unused:
        found = sorted({layer.layer_type for layer in layers})
        raise ScheduleError(
            f"Schedule keys {unused} match no layer of {model_name}; its cacheable layers answer to {found} "
            "(or '<type>-<block>'). Use a schedule made for this model, or pass components= naming its layers"
        )
    return by_key


def _check_blocks_apart(by_key: dict[str, list[CacheableLayer]]) -> None:
    """A block cached whole must not also have its layers cached: reusing the block skips them, so
    their kept outputs would go stale."""
    blocks = {layer.name: key for key, layers in by_key.items() for layer in layers if layer.streams is not None}
    for key, layers in by_key.items():
        for layer in layers:
            block = next((name for name in blocks if layer.name.startswith(name + ".")), None)
            if block is not None:
                raise BlockCachingError(
                    f"Schedule keys {blocks[block]!r} and {key!r} both cache {block}: one caches the block whole, "
                    f"the other its layer {layer.name}. Use a schedule of one kind, e.g. "
                    "profile.schedule(..., keys=[...]) with block keys only or layer keys only"
                )


def _bind_branches(
    split: BranchSplit, layers: Sequence[CacheableLayer]
) -> dict[int, dict[str, tuple[str, tuple[bool, ...]]]]:
    """Each branch-governed layer's key and plan per branch, refusing what cannot be split."""
    found: dict[int, dict[str, tuple[str, tuple[bool, ...]]]] = {}
    used: set[str] = set()
    for layer in layers:
        keys = {b: key_for(split.branch_plans, Key(layer.layer_type, branch=b).typed, layer.block) for b in BRANCHES}
        named = [key for key in keys.values() if key is not None]
        if not named:
            continue
        if layer.streams is not None:
            raise ScheduleError(
                f"Schedule key {named[0]!r}: {layer.name} is a block cached whole, whose guidance halves "
                "cannot be cached apart; drop its '@cond'/'@uncond' keys"
            )
        if layer.repeats > 1:
            raise ScheduleError(
                f"Schedule key {named[0]!r}: {layer.name} runs {layer.repeats} times per block call, so its "
                "guidance halves cannot be cached apart; drop its '@cond'/'@uncond' keys"
            )
        plans: dict[str, tuple[str, tuple[int, ...]]] = {}
        for branch, key in keys.items():
            if key is None:
                key = key_for(split.schedule.plans, layer.layer_type, layer.block)
                if key is None or key in split.made_up:
                    raise ScheduleError(
                        f"Schedule key {named[0]!r} plans one guidance half of {layer.name} but no key plans its "
                        f"{branch} half; add {str(Key(layer.layer_type, branch=branch))!r} or {layer.layer_type!r}"
                    )
                plans[branch] = (key, split.schedule.plans[key])
            else:
                used.add(key)
                plans[branch] = (key, split.branch_plans[key])
        found[id(layer)] = {b: (key, tuple(v == 1 for v in plan)) for b, (key, plan) in plans.items()}
    unused = [key for key in split.branch_plans if key not in used]
    if unused:
        raise ScheduleError(f"Schedule keys {unused} match no cached layer; their base keys must name layers of the model")
    return found


def _barriers(blocks: list[tuple[str, list[int]]]) -> tuple[BarrierPlan, ...]:
    barriers = []
    for position, (block, columns) in enumerate(blocks):
        after = blocks[position + 1] if position + 1 < len(blocks) else None
        # the next block of the same list (Flux's single-stream blocks follow its double-stream ones)
        following = tuple(after[1]) if after is not None and _list_of(after[0]) == _list_of(block) else None
        barriers.append(BarrierPlan(block, tuple(columns), following, position % BARRIER_EVERY == BARRIER_EVERY - 1))
    return tuple(barriers)


def ratios(plan: Sequence[bool]) -> tuple[float, ...]:
    """Per step: for a reusing step, the steps since the last compute over the gap between the last
    two computes (0 where there is no earlier compute: plain reuse); 0 for computing steps."""
    result, last, previous = [], None, None
    for step, compute in enumerate(plan):
        if compute:
            last, previous = step, last
            result.append(0.0)
        else:
            result.append((step - last) / (last - previous) if last is not None and previous is not None else 0.0)
    return tuple(result)


def keeps(plan: Sequence[bool]) -> tuple[bool, ...]:
    """Per step: whether it computes and the next step reuses, so that its output is needed. (A
    reusing step that finds nothing kept computes and keeps regardless.)"""
    return tuple(now and not following for now, following in pairwise(plan)) + (False,)


def _block_path(layer: CacheableLayer) -> str | None:
    """The module path of the block holding a layer: its parent where that is an indexed block
    (``transformer_blocks.3`` for ``transformer_blocks.3.attn1``), else up to the first index in
    its path (``blocks.3`` for a pattern's ``blocks.3.ff.net.0.proj``); None for a layer in no list."""
    parts = layer.name.split(".")
    if layer.block is not None:
        return ".".join(parts[:-1])
    first_index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return None if first_index is None else ".".join(parts[: first_index + 1])


def _first_of_each_list(block_paths: Sequence[str]) -> set[str]:
    """The first of ``block_paths`` (in module order) in each module list."""
    firsts: dict[str, str] = {}
    for path in block_paths:
        firsts.setdefault(_list_of(path), path)
    return set(firsts.values())


def _list_of(block_path: str) -> str:
    """The module list a block sits in (``transformer_blocks`` for ``transformer_blocks.3``)."""
    return block_path.rpartition(".")[0]
