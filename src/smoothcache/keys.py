"""Schedule keys: the one grammar ``<type>[@branch][-block]`` that names what a plan governs.

``"attn1"`` governs every ``attn1`` layer; ``"attn1-3"`` the one in block 3 (it wins over
``"attn1"`` there); ``"attn1@uncond"`` / ``"attn1@cond-3"`` one half of a classifier-free guidance
batch (:mod:`.guidance`). A profile's branch entries have the layer type ``"attn1@uncond"``, so a
branch key is also an ordinary ``<type>-<block>`` key of that type. Parsed and written here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .errors import GuidanceError

__all__ = ["BRANCHES", "Key", "key_for"]

BRANCHES: tuple[str, str] = ("cond", "uncond")


@dataclass(frozen=True)
class Key:
    """A parsed schedule key.

    >>> Key.parse("attn1@uncond-3")
    Key(layer_type='attn1', block=3, branch='uncond')
    >>> str(Key("ff", block=2))
    'ff-2'
    """

    layer_type: str
    block: int | None = None
    branch: str | None = None

    @classmethod
    def parse(cls, text: str) -> Key:
        head, _, tail = text.rpartition("-")
        block = int(tail) if head and tail.isdigit() else None
        layer_type, at, branch = (head if block is not None else text).partition("@")
        if not at:
            return cls(layer_type, block)
        if branch not in BRANCHES:
            raise GuidanceError(
                f"Key {text!r} names no guidance branch; write '<type>@cond', '<type>@uncond' or '<type>@uncond-<block>'"
            )
        return cls(layer_type, block, branch)

    def __str__(self) -> str:
        branch = f"@{self.branch}" if self.branch else ""
        block = f"-{self.block}" if self.block is not None else ""
        return f"{self.layer_type}{branch}{block}"

    @property
    def typed(self) -> str:
        """The layer type a profile records this key's branch under: ``"attn1@uncond"``, or ``"attn1"``."""
        return f"{self.layer_type}@{self.branch}" if self.branch else self.layer_type

    def without_branch(self) -> Key:
        return replace(self, branch=None)


def key_for(plans: Mapping[str, object], layer_type: str, block: int | None) -> str | None:
    """The key of ``plans`` that governs ``layer_type`` in block ``block`` (per-block first), or None.

    >>> key_for({"attn1": [1], "attn1-3": [1]}, "attn1", 3)
    'attn1-3'
    """
    if block is not None:
        per_block = str(Key(layer_type, block))
        if per_block in plans:
            return per_block
    return layer_type if layer_type in plans else None
