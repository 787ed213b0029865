"""Which layers of which model family are cacheable, and the schedule keys they answer to.

A layer is named by its module path (``transformer_blocks.3.attn1``); its *layer type* is the last
part (``attn1``) and its *block* the index before it (``3``), giving the schedule keys ``"attn1"``
and ``"attn1-3"``. Known block classes are recognised by class name, so this module imports no
model library.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import NoCacheableLayersError

__all__ = ["BlockFamily", "CacheableLayer", "FAMILIES", "find_layers", "family_of"]


@dataclass(frozen=True)
class BlockFamily:
    """A transformer block class and the sub-layers worth caching in it."""

    name: str
    block_class_names: tuple[str, ...]
    default_components: tuple[str, ...]
    components: tuple[str, ...]


FAMILIES: tuple[BlockFamily, ...] = (
    # diffusers' DiT / PixArt block: self-attention, optional cross-attention, feed-forward.
    BlockFamily("diffusers-basic", ("BasicTransformerBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff")),
    # facebookresearch/DiT models.py: x + gate * attn(...), x + gate * mlp(...).
    BlockFamily("original-dit", ("DiTBlock",), ("attn", "mlp"), ("attn", "mlp")),
)


@dataclass(frozen=True)
class CacheableLayer:
    """One layer that may be cached: where it is, what it is, and its schedule keys."""

    name: str
    module: nn.Module
    layer_type: str
    block: int | None

    @property
    def block_key(self) -> str:
        return self.layer_type if self.block is None else f"{self.layer_type}-{self.block}"


def family_of(model: nn.Module) -> BlockFamily | None:
    """The first known block family with a block in ``model``."""
    names = {type(m).__name__ for m in model.modules()}
    return next((f for f in FAMILIES if names.intersection(f.block_class_names)), None)


def find_layers(
    model: nn.Module,
    components: Sequence[str] | None = None,
    block_classes: Sequence[type] | None = None,
) -> list[CacheableLayer]:
    """The cacheable layers of ``model``, in module order.

    ``components`` are layer names inside blocks (``["attn1", "ff"]``) or module-path patterns
    (``["transformer_blocks.*.attn1"]``). Without them, the known family's defaults apply.
    ``block_classes`` restricts plain names to blocks of those classes (the reference package's
    ``block_classes`` argument); otherwise known families' blocks, then any indexed block, match.
    """
    family = family_of(model)
    if components is None:
        if family is None:
            raise NoCacheableLayersError(
                f"{type(model).__name__} has no block class smoothcache knows "
                f"({', '.join(n for f in FAMILIES for n in f.block_class_names)}); pass components=, e.g. "
                f"{_example_patterns(model)}"
            )
        components = family.default_components
    patterns = [c for c in components if "." in c or any(ch in c for ch in "*?[")]
    plain = [c for c in components if c not in patterns]

    layers: list[CacheableLayer] = []
    for name, module in model.named_modules():
        if not name:
            continue
        parts = name.split(".")
        parent_name, layer_type = ".".join(parts[:-1]), parts[-1]
        wanted = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if not wanted and layer_type in plain:
            parent = model.get_submodule(parent_name) if parent_name else model
            wanted = _is_block(parent, parent_name, family, block_classes)
        if wanted:
            layers.append(CacheableLayer(name, module, layer_type, _block_index(parts)))
    if not layers:
        raise NoCacheableLayersError(_nothing_found_message(model, components, block_classes))
    return layers


def _is_block(parent: nn.Module, parent_name: str, family: BlockFamily | None, block_classes: Sequence[type] | None) -> bool:
    if block_classes is not None:
        return isinstance(parent, tuple(block_classes))
    if family is not None:
        return type(parent).__name__ in family.block_class_names
    return _block_index(parent_name.split(".") + ["_"]) is not None


def _block_index(parts: list[str]) -> int | None:
    return int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None


def _example_patterns(model: nn.Module) -> str:
    indexed = [n for n, _ in model.named_modules() if n and _block_index(n.split(".")) is not None]
    return repr(indexed[:3]) if indexed else "['blocks.*.attn', 'blocks.*.mlp']"


def _nothing_found_message(model: nn.Module, components: Sequence[str], block_classes: Sequence[type] | None) -> str:
    blocks: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if name and parts[-1].isdigit():
            children = {child for child, _ in module.named_children()}
            blocks.setdefault(type(module).__name__, set()).update(children)
    where = f" in blocks of {[c.__name__ for c in block_classes]}" if block_classes else ""
    if blocks:
        found = "; ".join(f"{cls} with children {sorted(children)}" for cls, children in blocks.items())
        hint = f"it has indexed blocks: {found}"
    else:
        hint = f"its top-level children are {[n for n, _ in model.named_children()]}"
    return (
        f"No cacheable layer of {type(model).__name__} matches components {list(components)}{where}; {hint}. "
        "Pass components= with names of those children or module-path patterns like 'blocks.*.attn'"
    )
