"""The names pipeline_speed.py's configurations are made of: models, compile settings, methods and
each setting's warm-up. A module of their own because the measuring script and the readers of its
result files (``pipeline_results.py``) both speak them."""

from __future__ import annotations

from typing import NamedTuple

from smoothcache.bench import FEWEST_WARMUPS_COMPILED, FEWEST_WARMUPS_CUDA_GRAPHS

MODELS = ("dit", "flux", "wan")
DEFAULT_BATCHES = {"dit": (1, 8), "flux": (1,), "wan": (1,)}  # each model's batches unless --batches
DEFAULT_REPEATS = {"dit": 5, "flux": 3, "wan": 2}  # timed generations per configuration unless --repeats
COMPILES = ("eager", "compile", "cudagraphs", "graphs", "eager-graphs", "regional")  # regional: each block compiled
EAGER_COMPILES = ("eager", "eager-graphs")  # the settings that run the transformer without torch.compile
DEFAULT_COMPILES = ("eager", "compile", "cudagraphs")  # the step-graphs settings need CUDA: asked for by name
COLUMNS = (*DEFAULT_COMPILES, "regional")  # the settings a user picks without step graphs: the verdict's columns
STEP_GRAPHS = {"graphs": 2, "eager-graphs": 1}  # the settings that replay step graphs: their plain warm-up generations
STANDS_IN_FOR = {"graphs": "cudagraphs", "eager-graphs": "eager"}  # what a user without step graphs runs
PLAIN_PATH = {"graphs": "compile", "eager-graphs": "eager"}  # the same kernels without step graphs
UNCACHED, BLOCKS, LAYERS, CACHE_DIT = "uncached", "smoothcache blocks", "smoothcache layers", "cache-dit F1B0 static mask"
METHODS = (UNCACHED, BLOCKS, LAYERS, CACHE_DIT)
METHOD_NAMES = {"uncached": UNCACHED, "blocks": BLOCKS, "layers": LAYERS, "cache-dit": CACHE_DIT}
METHOD_TAGS = {method: tag for tag, method in METHOD_NAMES.items()}
# cudagraph trees record on the 2nd call and replay from the 3rd; step graphs warm up (STEP_GRAPHS), capture,
# then replay once more untimed, so that the last warm-up (where host syncs are counted) is a replay
WARMUP = {"eager": 1, "compile": 2, "cudagraphs": 3, "graphs": 4, "eager-graphs": 3, "regional": 2}
# the fewest that still leave nothing to compile, record or capture in a timed generation (``--warmup``, where one
# generation takes minutes): the library's own floors for compile and CUDA graphs; step graphs' as WARMUP's
FEWEST_WARMUPS = {"eager": 0, "compile": FEWEST_WARMUPS_COMPILED, "cudagraphs": FEWEST_WARMUPS_CUDA_GRAPHS,
                  "graphs": 4, "eager-graphs": 3, "regional": FEWEST_WARMUPS_COMPILED}


class Config(NamedTuple):
    """One configuration, a row of the result: compile setting, batch, prefetch on or off, method."""

    compile: str
    batch: int
    prefetch: bool
    method: str


def is_compiled(compile_mode: str) -> bool:
    """Whether the setting runs the transformer under torch.compile."""
    return compile_mode not in EAGER_COMPILES
