"""The cache at run time: ``Schedule`` -> :mod:`.plan` -> :mod:`.handle` -> :mod:`.forwards`.

:mod:`.plan` turns a schedule and the model's layers into one plan per layer (pure);
:mod:`.handle` attaches the forwards those plans ask for and sets their decisions at each model
call; :mod:`.state` holds what is kept between calls; :mod:`.forwards` and :mod:`.streams` are
what a cached layer or block runs; :mod:`.compile` is what the cache knows about torch.compile, and
:mod:`.regional` how a chain of blocks runs where each block is compiled on its own.
"""

from .handle import CacheHandle, cache

__all__ = ["CacheHandle", "cache"]
