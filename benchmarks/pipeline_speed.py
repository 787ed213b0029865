"""Speed of caching inside diffusers' own pipelines: a user's ordinary ``pipe(...)`` call (issue 20).

For each model, every cached configuration is timed against the UNCACHED pipeline with the same
compile setting, batch and prefetch setting, in the same process (random weights: latency does not
depend on them). Eager cells time their methods in turn on one pipeline set-up (``"timing":
"interleaved"``): a generation of each per round, each round starting one method later, because a
borrowed GPU host's speed drifts by up to 1.5x within a minute and eager DiT is bound by the host's
kernel launches, so rows timed one after the other did not compare. Each smoothcache schedule is
attached once and enabled for its own generations only; cache-dit is enabled before each of its
generations and disabled after. Plain compile cells time uncached and smoothcache's methods in turn
the same way on one compiled transformer (compiled, then cached, as a user does; cache-dit's docs
enable it before compiling, and enabled after, as switching it per turn would need, it fails on
DiTPipeline, so it is compiled alone after them). The other
settings time one configuration after another (``"sequential"``), since each compiles or captures
its own; so does every cell with ``--no-in-turn``, whose rows are then written one by one (an
in-turn cell's rows are written when the cell ends, which a command's time limit could cut where
a generation takes a minute).

Beside this script: ``pipeline_workloads.py`` builds the models' pipelines, ``pipeline_settings.py``
names the settings and methods, ``pipeline_methods.py`` puts each method in place and takes it
down, ``pipeline_measures.py`` measures one generation (time, FLOPs, steps, traces),
``pipeline_results.py`` reads result files (speedups, the verdict, the plot, merging); this script
runs the configurations, in turn or one after another, and keeps the result file.

Models:

- ``dit``: ``DiTPipeline`` with a DiT-XL/2-256 transformer (``gpu_bench.dit_xl``), fp16, 50 DDIM
  steps, classifier-free guidance as the pipeline does it (batched, ``guidance_scale`` 4.0).
  DiTPipeline always decodes, so its VAE is a stand-in module (``LatentsOut``) whose ``decode``
  returns a slice of the latents (three of four channels, no convolution): the call still runs to
  its end, and the transformer dominates. The outputs compared are the latents the pipeline handed
  to ``decode`` (what it returns is clamped to [0, 1]).
- ``flux``: ``FluxPipeline`` with a FLUX.1-dev transformer (``gpu_peers.build``: made on the meta
  device, initialised on the GPU), bf16, 1024x1024, 28 steps, guidance 3.5 (guidance-distilled: one
  transformer call per step), random T5 and CLIP embeddings passed as ``prompt_embeds``, no text
  encoders, ``output_type="latent"``.
- ``wan``: ``WanPipeline`` with a Wan 2.1 T2V 1.3B transformer (30 blocks, 12 heads x 128, ffn 8960,
  text 4096, patch (1, 2, 2)), bf16, 480x832, 81 frames, 30 steps of the UniPC flow scheduler Wan
  2.1 ships (``flow_shift`` 3.0 for 480p), guidance 5.0 (two transformer calls per step), random
  512-token prompt and negative-prompt embeddings, ``output_type="latent"``. Made on the device
  (not on the meta device: its rotary tables are buffers computed at construction, which a
  meta-device build leaves empty, and its modulation tables have no ``reset_parameters``), then in
  bf16 except the modules Wan keeps in float32, as ``from_pretrained(torch_dtype=torch.bfloat16)``
  loads it.

``--tiny`` swaps each for a few-block, narrow model on a small input with few steps: it checks the
code paths in seconds on a CPU and measures nothing. On the CPU the dtype is float32 and torch.compile
runs dynamo only (``--backend eager``: inductor's C++ builds would take minutes).

Methods, all computing the same steps (equal compute):

- ``uncached``;
- ``smoothcache blocks``: whole blocks, ``Schedule({"block": mask})`` (Flux: ``"block"`` and
  ``"single_block"``, its double- and single-stream blocks);
- ``smoothcache layers``: the family's default layer keys (docs/models.md): DiT ``attn1`` + ``ff``;
  Flux ``attn``, ``ff``, ``ff_context``, ``single_attn``, ``single_proj_mlp``; Wan ``attn1`` + ``ffn``;
- ``cache-dit F1B0 static mask``: ``DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
  steps_computation_mask=mask, steps_computation_policy="static")``. It computes its first block at
  every step, so its ideal speedup is a little lower.

The mask: DiT, the reference package's 50-step alpha=0.18 pattern (``gpu_bench.ALPHA_018``, 24 of 50
steps computed); Flux and Wan, ``cache_dit.steps_mask(mask_policy="medium")`` (15 of 28, 18 of 30),
given to smoothcache unchanged.

Compile settings: ``eager``; ``compile``, the transformer compiled whole (``pipe.transformer =
torch.compile(pipe.transformer)``, default mode); ``cudagraphs``, the same with
``mode="reduce-overhead"`` (which is ``options={"triton.cudagraphs": True}``, the form cache-dit's
docs/user_guide/CUDA_GRAPH.md shows); ``regional`` (not a default, name it), each block compiled on its
own, default mode (diffusers' ``compile_repeated_blocks``; DiT names no repeated blocks, so each of its
``transformer_blocks``). Each library is combined with compile its documented way:
smoothcache caches the compiled pipeline (docs/speed.md; its hooks sit on the model inside the
wrapper, as ``smoothcache bench --compile`` does); cache-dit is enabled first, then the transformer
compiled (cache-dit's docs/user_guide/COMPILE.md). Every configuration, or in-turn cell, starts
from a reset dynamo (``torch._dynamo.reset()``: no graphs, guards or CUDA graph trees left from the
last), and the compiled wrapper is removed after it; an in-turn compile cell's methods share one
wrapper and one dynamo, so its rows' ``graphs_compiled_in_warmup`` counts the graphs each method's
own turns compiled (what an earlier turn compiled is not compiled again), unlike a sequential row's. Under compile, every ``pipe(...)`` call is preceded by
``torch.compiler.cudagraph_mark_step_begin()``, as ``smoothcache bench`` does: once anything in the
process marked a step (smoothcache marks each generation's start, so that kept outputs survive its
steps), cudagraph trees start a new generation only at marks, for every compiled function.

``graphs``: compiled in the default mode, then ``smoothcache.step_graphs(pipe)`` after the cache (the
uncached row too): each step's transformer call replayed from a CUDA graph captured once, instead of
cudagraph trees (CUDA only; not a default, name it; cache-dit is skipped there, its CUDA graphs are
the ``cudagraphs`` cell; step_graphs warms up two generations, as the first may be the counting one run
eagerly). ``eager-graphs``: the same without torch.compile (one plain generation, then the capture),
for pipelines a user does not compile; step graphs replay the uncached pipeline's steps too, so
besides ``speedup`` (against the uncached pipeline with step graphs, as every cell compares like
with like) its rows say how far they are from plain eager. Rows of both carry the graphs' counts
(``step_graphs``) and, where the run has the cell they stand in for (``cudagraphs``, ``eager``) at
the same batch and prefetch, ``speedup_vs_cudagraphs_uncached`` or ``speedup_vs_eager_uncached``, and
``max_abs_diff_vs_plain_path``, the replayed output against one more generation on the same set-up
with the step graphs removed (0: bit-identical, as step graphs claim), and where the run has the same
method without step graphs (``compile``, ``eager``), ``max_abs_diff_vs_plain_cell`` against it (eager,
0 too; compiled, another compile, which can differ from this one, so not a claim);
``kept_mib`` is None there (the kept outputs live in the graphs' pool) and ``peak_reserved_mib``
(every row) includes the pools.

``--skip-guards`` runs every compiled configuration's timed, clocked and traced generations (after
its warm-up, which compiled every graph it needs) under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: dynamo checks only the guards that tell
its graphs apart (the cache's decisions among them), not every parameter's; the settings say so.
cache-dit's rows keep every guard: under the stance its compiled transformer recompiled after the
warm-up, which the stance refuses (a row of errors otherwise; tested on the CPU).

``--prefetch on`` applies ``smoothcache.prefetch_timesteps(pipe, device_once=True)`` (opt-in,
bit-identical outputs: it removes the per-step host wait of pipelines whose scheduler keeps
timesteps on the host, such as DiTPipeline, and answers the pipeline's repeated execution-device
lookups within a call from the first) to every configuration of the cell, uncached included
(cache-dit wraps the pipeline's class first, so there the device memo stays off, as for a user; an
eager cell, prefetched once for all its methods, suspends prefetch around each ``enable_cache`` to
keep that order); ``both`` (default) runs each configuration without and with it. Where this
smoothcache has no ``prefetch_timesteps``, only the rows without it run, and the JSON says so
(``settings.prefetch_available``).

Each row: the median of ``--repeats`` timed generations after warm-up (eager 1, compile 2,
cudagraphs 3: cudagraph trees record on a function's second call and replay from its third; graphs
4 and eager-graphs 3: plain, capture, one replay) and all run times (in turn, also when each
started, ``runs_at_s``, and ``speedup_per_round``, each round's uncached time over the method's,
with their median ``speedup_paired``); ``speedup`` against the uncached row of the same (compile,
batch, prefetch) cell and ``speedup_vs_plain_uncached`` against the uncached row without prefetch;
``speedup_of_fastest`` (fastest against fastest: host noise only ever slows a run); ``ideal_speedup``, from the FLOPs one
eager generation of each (batch, method) dispatches (``torch.utils.flop_counter``; skipped work is
never dispatched), and ``efficiency`` = speedup / ideal; ``computed_steps``, the steps that ran the
last block's self-attention, and ``attention_fraction``, the share of all blocks' self-attention
calls that ran (cache-dit's first block runs at every step); peak GPU memory over the timed runs;
``kept_mib``, the memory smoothcache's cache holds after a generation
(``handle.state.kept_bytes()``; cache-dit reports none); how often one generation made the host wait
for the GPU (``smoothcache.bench.count_host_syncs``, on the last warm-up); graphs compiled in warm-up
and while timed, recompiles while timed, graph breaks, CUDA graph skips; the largest difference of
the output from the uncached one (``max_abs_diff_vs_uncached``, same compile and batch, no
prefetch) and, with prefetch, from the same method without it (``max_abs_diff_vs_prefetch_off``: 0
means bit-identical); ``step_ms``, from one more generation whose transformer calls are marked on
the host clock and by CUDA events, the median milliseconds of a computing and of a reusing step on
the host and on the device (where the time goes: a host that waits for the GPU at every step shows
the device's time on both; None with ``--no-step-clock``, which saves that generation); with ``--trace METHOD...``, those methods' rows also write a profiler
trace of one more generation (``trace-*.json.gz``, each model call a range "step N computing" or
"step N reusing") and list their busiest host operators (``top_host_ops``); ``wall_s``, the seconds
the configuration took from set-up to teardown, warm-up and compiling included (an in-turn cell's
rows share its time), for planning a lease; and ``error`` where a configuration failed (the run goes on).

Cells run most wanted first, so that ``--max-minutes`` (no configuration or in-turn cell starts past
it) trims the least wanted: DiT: CUDA graphs at each batch (largest first), then step graphs on
compile at each, compile at the largest, eager at each, step graphs on eager at each, compile at the
others; Flux and Wan: eager, compile, CUDA graphs. The JSON is written after every
row, so a run cut short keeps what it measured. One line is printed per row; after the first
uncached generation, a guess at the run's length (from that generation, which counts FLOPs and so
errs long: 35 minutes guessed for a run of 17.6 on one H100); after each configuration or in-turn
cell, the minutes so far and what the rest should take at the run's own paces (per setting, batch
and timing; per setting where that is not measured yet).

    python benchmarks/pipeline_speed.py --model dit --tiny --out /tmp/ps     # CPU smoke: ~2 min on 2 cores
    python benchmarks/pipeline_speed.py --plot-from /tmp/ps/pipeline-speed-dit.json   # redraw its plot

On one H200 (a command may run 10 minutes at most, so one model's cells are split over commands;
minutes estimated from DiT-XL/2 ~0.2-0.6 s per compiled generation and ~2 s eager, ~30-60 s of
compiling per compiled DiT configuration (less for its prefetch twin, from inductor's cache) and
~2 min per Flux one, Flux-dev ~5-12 s and Wan 1.3B ~40-80 s per eager generation, plus ~0.5 min to
import and build)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-bench/*.whl &&
    export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
    # the GPU paths (inductor, CUDA graphs, host syncs) on the tiny DiT first: ~2 min
    python3 benchmarks/pipeline_speed.py --model dit --tiny --compile cudagraphs eager --batches 2 --out "$OUT/dit-tiny"
    # step_graphs against torch's CUDA graphs at batch 1, one process, with the plain compile cell for
    # bit-identity (~5 min: on one H100 each compiled b1 configuration took 35-40 s including its warm-up;
    # tests/test_step_graphs_cuda.py first; add eager eager-graphs for the pipeline without torch.compile: ~2 min more)
    python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs graphs compile --batches 1 --prefetch on --methods blocks --out "$OUT/graphs1"
    # the same with dynamo's guard check cut to the guards that tell graphs apart, traced (~3 min)
    python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs --batches 1 --prefetch on --methods blocks --skip-guards --trace uncached blocks --out "$OUT/skip1"
    # where batch 1's time goes: traces of the uncached and the cached generation (~2 min)
    python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs --batches 1 --prefetch on --methods blocks --trace uncached blocks --out "$OUT/trace1"
    python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs --batches 8 --out "$OUT/dit-cg8"  # ~5-8 min
    python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs --batches 1 --out "$OUT/dit-cg1"  # ~5-8 min
    python3 benchmarks/pipeline_speed.py --model dit --compile eager --out "$OUT/dit-eager"  # ~3-4 min (b8, b1)
    python3 benchmarks/pipeline_speed.py --model dit --compile compile --batches 8 --out "$OUT/dit-c8"      # ~5-7 min
    python3 benchmarks/pipeline_speed.py --model dit --compile compile --batches 1 --out "$OUT/dit-c1"      # ~5-7 min
    # Flux and Wan keep their timesteps on the device (nothing to prefetch): --prefetch off
    python3 benchmarks/pipeline_speed.py --model flux --compile eager --prefetch off --out "$OUT/flux-eager"  # ~2-3 min
    # uncached and blocks in turn, then cache-dit alone (one after another on one H100: 5.4 min with --repeats 2;
    # layers would add ~2 min to the in-turn cell, whose rows are written only when it ends)
    python3 benchmarks/pipeline_speed.py --model flux --compile compile --prefetch off --methods blocks cache-dit --repeats 2 --max-minutes 5.5 --out "$OUT/flux-c"
    python3 benchmarks/pipeline_speed.py --model flux --compile cudagraphs --prefetch off --methods blocks cache-dit --max-minutes 5.5 --out "$OUT/flux-cg"  # one H100: 4.1 min
    # Flux at batch 8, eager: one batch-8 generation per method, work counted at batch 1 (one H200: 2.2 min)
    python3 benchmarks/pipeline_speed.py --model flux --compile eager --batches 8 --prefetch off --repeats 1 --no-step-clock --no-in-turn --eager-warmup 0 --count-batch 1 --methods blocks cache-dit --max-minutes 6 --out "$OUT/flux-eager-b8"
    python3 benchmarks/pipeline_speed.py --model wan --compile eager --prefetch off --repeats 1 --no-step-clock --no-in-turn --methods blocks cache-dit --out "$OUT/wan-eager"  # ~5-8 min
    # batch 8, where a generation takes minutes: no eager warm-up and each method's work counted at batch 1,
    # so each method runs one batch-1 and one batch-8 generation (one H200: 5.0 min an uncached batch-8
    # generation, 3.0 with blocks; the three methods about 13 min; longer than one command: the setsid and
    # marker recipe below). A lease short of that may time uncached with one method (see below)
    python3 benchmarks/pipeline_speed.py --model wan --compile eager --batches 8 --prefetch off --repeats 1 --no-step-clock --no-in-turn --eager-warmup 0 --count-batch 1 --methods blocks cache-dit --max-minutes 20 --out "$OUT/wan-eager-b8"
    # Wan compiled at batch 8 does not fit one lease with all three methods (~25 min with one warm-up, by
    # estimate from eager batch 8's 5.0 and 3.0 min a generation on one H200). Flux's and Wan's target is each
    # method's efficiency against its own uncached pipeline, so a lease may time uncached with one method, with
    # the fewest warm-ups (--warmup; the rows still count recompiles while timed). Compile, uncached and
    # blocks, took 17.7 min on one H100 (warm-ups 5.4 and 4.2 min, generations 4.2 and 2.5), uncached and
    # cache-dit 16.4 (cache-dit's warm-up 2.7 min, generation 2.5); CUDA graphs (--compile cudagraphs
    # --warmup cudagraphs=2), uncached and blocks, 24.4 (warm-ups 9.8 and 6.5 min) with --max-minutes 16,
    # uncached and cache-dit 24.2 (cache-dit's warm-up 6.5 min): the two commands below with --compile cudagraphs
    # --warmup cudagraphs=2 --max-minutes 16, each a lease of its own
    python3 benchmarks/pipeline_speed.py --model wan --compile compile --batches 8 --prefetch off --repeats 1 --no-step-clock --no-in-turn --count-batch 1 --warmup compile=1 --methods blocks --max-minutes 14 --out "$OUT/wan-c8-blocks"
    python3 benchmarks/pipeline_speed.py --model wan --compile compile --batches 8 --prefetch off --repeats 1 --no-step-clock --no-in-turn --count-batch 1 --warmup compile=1 --methods cache-dit --max-minutes 14 --out "$OUT/wan-c8-cache-dit"
    # Wan under CUDA graphs at batch 1, the issue's column (one H200: 11 min, each method's warm-up 2.2-2.7 min;
    # the same recipe; add compile before cudagraphs for the plain compile cell, which the issue's table does not
    # have: about 20 min, and its uncached and blocks rows, timed in turn, are written only when that cell ends)
    python3 benchmarks/pipeline_speed.py --model wan --compile cudagraphs --prefetch off --repeats 1 --no-step-clock --methods blocks cache-dit --max-minutes 8 --out "$OUT/wan-cg1"
    # Flux compiled and under CUDA graphs at batch 8 with the fewest warm-ups (one H100: 10.3 min, 26-116 s
    # of warm-up per configuration; the same recipe)
    python3 benchmarks/pipeline_speed.py --model flux --compile compile cudagraphs --batches 8 --prefetch off --repeats 1 --no-step-clock --no-in-turn --count-batch 1 --warmup compile=1 cudagraphs=2 --methods blocks cache-dit --max-minutes 14 --out "$OUT/flux-compiled-b8"
    # every DiT cell in one process, longer than one command (one H100: 12.2 min with --max-minutes 18; on a
    # host that launched kernels half as fast, 17.6 min with 17, which left out cache-dit's compile b1;
    # --max-minutes gates starts only): a process in its own session outlives its command on the lent
    # machine, and a second command on the same warm machine (called within its idle time) waits for its
    # marker file and collects /tmp/all, whatever is written by then (a third collects the rest). Not $!:
    # setsid forks where it leads a process group, and on the lent machine $! was gone at once
    rm -f /tmp/all.done; setsid nohup bash -c 'python3 benchmarks/pipeline_speed.py --model dit --compile cudagraphs graphs compile eager \\
        eager-graphs --prefetch on --methods blocks layers cache-dit --max-minutes 18 --out /tmp/all > /tmp/all.log 2>&1;
        touch /tmp/all.done' < /dev/null > /dev/null 2>&1 &
    sleep 570; tail -5 /tmp/all.log
    # the second command
    timeout 585 bash -c 'until [ -e /tmp/all.done ]; do sleep 5; done'; cp /tmp/all/* /tmp/all.log "$OUT/"

Then ``--plot-from A/pipeline-speed-dit.json B/pipeline-speed-dit.json ... --out DIR`` merges one
model's parts into one JSON and plot (each cell's rows from one file: every speedup within one process;
each row's ``from_file`` indexes ``merged_from``).

``targets`` in the JSON is issue 20's verdict, drawn from the rows and printed as a table at the end of
a run and of ``--plot-from``. One entry per column, a user's compile setting (eager, compile,
cudagraphs) and batch, step-graph rows counted in the setting they stand in for, as smoothcache's:
smoothcache's fastest row and cache-dit's, each against the column's fastest plain uncached row
(prefetch off or on, never the step-graph uncached rows: conservative on purpose); their ratio
(target 1.05); the slowest smoothcache row against its own cell's uncached row (target 1.0); DiT's
CUDA graphs speedup (1.9 at batch 8, 1.6 at batch 1) or Flux's and Wan's efficiency (0.95; the
fastest row's own-cell speedup over its ideal, so a step-graph row is held against the step-graph
uncached row and the graphs' own gain over plain eager is not counted as caching's); and
whether those rows came from one process. ``bit_identical``: whether every row that has
``max_abs_diff_vs_plain_path`` has 0 there. Missing rows give None, not a verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench
import gpu_peers

# the seams the tests replace, called through their modules (never from-imported here, which would
# bypass a patch): pipeline_methods.configured and .enabled, pipeline_measures.step_clock (reached
# through pipeline_measures.clocked_steps)
import pipeline_measures
import pipeline_methods
from pipeline_measures import (
    clocked,
    counted_generation,
    counts_between,
    error_fields,
    error_text,
    host_syncs_of,
    max_abs_diff,
    peaks_mib,
    reset_peaks,
    sync,
    traced_generation,
)
from pipeline_methods import (
    CACHE_DIT_HOW,
    PREFETCH_HOW,
    SWITCHED_HOW,
    Attached,
    cache_dit_on,
    cached_switched_off,
    compile_transformer_of,
    never_runs,
    prefetch_available,
    smoothcache_how,
    undo_all,
    unwrapped,
)
from pipeline_results import (
    EXACTNESS_REFERENCE,
    merge,
    plot,
    read_result,
    targets,
    targets_table,
    with_speedups,
)
from pipeline_settings import (
    BLOCKS,
    CACHE_DIT,
    COMPILES,
    DEFAULT_BATCHES,
    DEFAULT_COMPILES,
    DEFAULT_REPEATS,
    FEWEST_WARMUPS,
    LAYERS,
    METHOD_NAMES,
    METHOD_TAGS,
    MODELS,
    PLAIN_PATH,
    STEP_GRAPHS,
    UNCACHED,
    WARMUP,
    Config,
    is_compiled,
)
from pipeline_workloads import BUILDERS, Workload

import smoothcache
from smoothcache.bench import unchecked
from smoothcache.files import atomic_write_text


# ---- configurations ----------------------------------------------------------------------------
def cells(model: str, compiles: Sequence[str], batches: Sequence[int]) -> list[tuple[str, int]]:
    """The (compile, batch) cells, most wanted first (issue 20): DiT, CUDA graphs at each batch
    (largest first), step graphs on compile at each, compile at the largest, eager at each, step
    graphs on eager at each, compile at the others, regional compile at each; Flux and Wan, the
    settings in ``COMPILES`` order."""
    big_first = sorted(set(batches), reverse=True)
    if model == "dit":
        order = [("cudagraphs", b) for b in big_first] + [("graphs", b) for b in big_first] + [("compile", big_first[0])]
        order += [("eager", b) for b in big_first] + [("eager-graphs", b) for b in big_first]
        order += [("compile", b) for b in big_first[1:]] + [("regional", b) for b in big_first]
    else:
        order = [(c, b) for c in COMPILES for b in big_first]
    return [cell for cell in order if cell[0] in compiles]


IN_TURN_COMPILES = ("eager", "compile")  # settings whose cells can time their methods in turn


def timed_in_turn(config: Config, in_turn: bool = True) -> bool:
    """Whether ``config`` takes turns with its cell's other methods on one set-up (unless ``in_turn``
    is off): eager, every method; plain compile, uncached and smoothcache's, on one compiled
    transformer, as a user compiles once and caches after (dynamo keeps each method's graphs; the
    cache's decisions pick them). cache-dit's docs enable it before compiling; switched on and off per
    turn it would be enabled after, which fails on DiTPipeline (its block container replaces the
    blocks the transformer's own forward reads; tested): under compile it is timed alone after the cell, as every configuration of the other settings is (each compiles or
    captures its own), so its speedup and the column's ratio to it still compare times taken
    minutes apart."""
    if not in_turn or config.compile not in IN_TURN_COMPILES:
        return False
    return config.compile == "eager" or config.method != CACHE_DIT


def timing_groups(plan: Sequence[Config], in_turn: bool = True) -> list[list[Config]]:
    """The plan as it is timed, in the order of first appearance: the configurations of each
    (compile, batch, prefetch) cell that take turns (``timed_in_turn``) together, every other
    configuration alone."""
    groups: dict[tuple[Any, ...], list[Config]] = {}
    for config in plan:
        groups.setdefault(config[:3] if timed_in_turn(config, in_turn) else config, []).append(config)
    return list(groups.values())


def timing_of(config: Config, in_turn: bool = True) -> str:
    """How ``config`` is timed, as its row says: "interleaved" (``timed_in_turn``) or "sequential"."""
    return "interleaved" if timed_in_turn(config, in_turn) else "sequential"


def row_head(model: str, config: Config, in_turn: bool = True) -> dict[str, Any]:
    """What every row of ``config`` says, measured or not."""
    return {"model": model, **config._asdict(),
            "implementation": {UNCACHED: "none", CACHE_DIT: "cache-dit"}.get(config.method, "smoothcache"),
            "timing": timing_of(config, in_turn)}


def skips_guards(args: argparse.Namespace, config: Config) -> bool:
    """Whether ``config``'s runs after the warm-up go under ``skip_guard_eval_unsafe``: with
    ``--skip-guards``, compiled configurations but cache-dit's (it recompiled after its warm-up)."""
    return args.skip_guards and is_compiled(config.compile) and config.method != CACHE_DIT


# ---- the run: configurations one after another -------------------------------------------------
@dataclass
class Runner:
    """Measures one model's configurations in order and keeps the result file current."""

    work: Workload
    args: argparse.Namespace
    out: Path
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)  # (batch, method) -> counted work
    outputs: dict[Config, torch.Tensor] = field(default_factory=dict)  # every configuration's, for the differences
    plan: list[Config] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # (compile, batch, timing) -> seconds per configuration: in turn, a cell shares one compile; alone, each compiles its own
    paces: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)

    def elapsed_min(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def run(self) -> dict[str, Any]:
        groups = timing_groups(self.plan, self.args.in_turn)
        for index, configs in enumerate(groups):
            in_turn = timed_in_turn(configs[0], self.args.in_turn)
            started = time.perf_counter()
            rows = InTurnCell(self, configs).measure() if in_turn else [self.measure(configs[0])]
            elapsed = time.perf_counter() - started
            ran = [row for row in rows if "skipped" not in row]  # measured or failed
            for row in ran:  # an in-turn cell's configurations share its time
                row["wall_s"] = elapsed / len(ran)
                if "ms" in row:  # a failure's seconds say nothing of the pace
                    self.paces.setdefault((row["compile"], row["batch"], row["timing"]), []).append(row["wall_s"])
            for row in rows:
                self.add(row)
            if ran and index + 1 < len(groups):
                print_progress(self, [config for group in groups[index + 1:] for config in group])
        return self.result()

    def over_budget(self) -> str | None:
        """Why nothing more may start, or None."""
        if self.elapsed_min() > self.args.max_minutes:
            return f"over the time budget (--max-minutes {self.args.max_minutes})"
        return None

    def generation(self, batch: int, compiled: bool) -> Callable[[], torch.Tensor]:
        """One ``pipe(...)`` call with a fixed seed; marked as its own CUDA graph generation under compile."""

        def run() -> torch.Tensor:
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            return self.work.generate(batch, torch.Generator(self.device).manual_seed(0))

        return run

    def measure(self, config: Config) -> dict[str, Any]:
        """Set up, count the work (first time per batch and method), warm up, time, take down: one row."""
        row, skip = row_head(self.work.model, config, self.args.in_turn), self.over_budget()
        if skip:
            row["skipped"] = skip
            return row
        never = never_runs(config, self.device)
        if never:
            row["skipped"] = never
            return row
        attached = None
        try:
            with pipeline_methods.configured(self.work, config, self.args.backend) as attached:
                row["how"] = "; then ".join(attached.how) or "pipe(...)"
                row.update(self.timed(config, attached))
        except Exception as error:  # noqa: BLE001 - a configuration that cannot run here is recorded, not fatal
            row.update(error_fields(error))
        if attached is not None and attached.teardown_errors:
            row["teardown_errors"] = attached.teardown_errors
        return row

    def timed(self, config: Config, attached: Attached) -> dict[str, Any]:
        """The configuration in place: its work counted where not yet, warmed up, then timed."""
        generate = self.generation(config.batch, compiled=is_compiled(config.compile))
        before = gpu_bench.dynamo_counts()
        syncs, warmup_s = self.warm_up(config, generate)
        after_warmup = gpu_bench.dynamo_counts()
        if skips_guards(self.args, config):
            generate = unchecked(generate)
        reset_peaks()
        times, output = [], None
        for _ in range(self.args.repeats):
            output, _, seconds = clocked(generate)
            times.append(seconds)
        peaks = peaks_mib()  # the timed generations' peaks, before the clocked and traced ones add their own
        step_ms = pipeline_measures.clocked_steps(self.work, generate, self.device) if self.args.step_clock else None
        traced = {}
        if config.method in self.args.trace:
            traced = traced_generation(self.work, generate, self.device, self.trace_path(config))
        end = gpu_bench.dynamo_counts()
        self.outputs[config] = output.detach().float().cpu()
        plain_path = {} if attached.graphs is None else self.plain_path_difference(config, attached.graphs)
        # replays do not refill the cache's Python state (it forgets its kept outputs at each
        # generation's start), so under step_graphs its kept memory is in the graphs' pool, unread
        kept = attached.handle.state.kept_bytes() if attached.handle is not None and attached.graphs is None else None
        return self.row_fields(
            config, times=times, warmup_s=warmup_s, syncs=syncs, peaks=peaks, kept=kept,
            step_ms=step_ms, traced=traced, warmup_counts=counts_between(before, after_warmup),
            timed_counts=counts_between(after_warmup, end),
            step_graphs=None if attached.graphs is None else dataclasses.asdict(attached.graphs.stats)) | plain_path

    def plain_path_difference(self, config: Config, graphs: smoothcache.StepGraphs) -> dict[str, Any]:
        """``max_abs_diff_vs_plain_path``: the replayed output against one more generation on the same
        set-up with the step graphs removed: the same compiled graphs (or eager kernels), the same
        cache, not replayed. 0 means bit-identical, as step graphs claim. Another cell's output is no
        reference under compile: a fresh compile of the same model can differ
        (``max_abs_diff_vs_plain_cell``; benchmarks/compile_variation.py). The extra generation checks
        every guard (not ``--skip-guards``' stance: it may not recompile); if dynamo compiled anything
        for it, the comparison is not with the same graphs and the field is None, with the count."""
        found: dict[str, Any] = {"max_abs_diff_vs_plain_path": None}
        try:
            graphs.disable()
            before = gpu_bench.dynamo_counts()
            plain = self.generation(config.batch, compiled=is_compiled(config.compile))()
            graphs_compiled = counts_between(before, gpu_bench.dynamo_counts())["graphs"]
        except Exception as error:  # noqa: BLE001 - the timed row stands; only this check is lost
            return found | {"plain_path_error": error_text(error)}
        if graphs_compiled:
            return found | {"plain_path_graphs_compiled": graphs_compiled}
        return {"max_abs_diff_vs_plain_path": max_abs_diff(self.outputs[config], plain.detach().float().cpu())}

    def row_fields(self, config: Config, *, times: Sequence[float], warmup_s: float, syncs: int | None,
                   peaks: tuple[float | None, float | None], kept: dict[str, int] | None, step_ms: dict[str, Any] | None,
                   traced: dict[str, Any], warmup_counts: dict[str, int], timed_counts: dict[str, int],
                   step_graphs: dict[str, Any] | None = None) -> dict[str, Any]:
        """A measured row's fields, timed one configuration after another or in turn alike: times
        (seconds), peak memory (allocated, reserved; graph pools' memory is reserved at capture and
        not allocated again by replays), what the cache kept (bytes by device), and dynamo's counts
        in the warm-up and after it (``counts_between``)."""
        return {
            "ms": 1000 * statistics.median(times), "runs_ms": [1000 * t for t in times], "warmup_s": warmup_s,
            "warmup_generations": self.warmups(config.compile), "repeats": self.args.repeats,
            "peak_mib": peaks[0], "peak_reserved_mib": peaks[1],
            "kept_mib": None if kept is None else sum(kept.values()) / 2**20, "kept_bytes_by_device": kept,
            "host_syncs_per_generation": syncs,
            "step_graphs": step_graphs,
            "step_ms": step_ms,
            **traced,
            "graphs_compiled_in_warmup": warmup_counts["graphs"],
            "graphs_compiled_while_timed": timed_counts["graphs"],
            "recompiles_while_timed": timed_counts["frames"],
            "graph_breaks": warmup_counts["graph_breaks"] + timed_counts["graph_breaks"],
            "cudagraph_skips": warmup_counts["cudagraph_skips"] + timed_counts["cudagraph_skips"],
            **self.counts[(config.batch, config.method)],
            **self.differences(config),
        }

    def warmups(self, compile_mode: str) -> int:
        """Warm-up generations before the timed ones: ``--warmup``'s (``--eager-warmup``'s), else ``WARMUP``'s."""
        return self.args.warmup.get(compile_mode, WARMUP[compile_mode])

    def count_batch(self, config: Config) -> int:
        """The batch ``config``'s work is counted at: ``--count-batch``, else its own. Step-graph cells
        count at their own: a generation at another batch would be one of the graphs' warm-ups."""
        if config.compile in STEP_GRAPHS:
            return config.batch
        return self.args.count_batch or config.batch

    def warm_up(self, config: Config, generate: Callable[[], Any]) -> tuple[int | None, float]:
        """Warm-up generations (the last one counting the host's waits for the GPU) and their
        seconds. The first of each (batch, method) is also counted (FLOPs, steps): eagerly, the
        warm-up is that generation; compiled, it is an extra one run eagerly before anything compiles."""
        warmups = self.warmups(config.compile)
        first = self.counting_first((config.batch, config.method), generate, is_compiled(config.compile), warmups,
                                    self.count_batch(config))
        if warmups == 0:
            return None, 0.0
        calls: list[Callable[[], Any]] = [first] + [generate] * (warmups - 1)
        start = time.perf_counter()
        for call in calls[:-1]:
            call()
        syncs = host_syncs_of(calls[-1], self.device)
        sync()
        return syncs, time.perf_counter() - start

    def counting_first(self, key: tuple[int, str], generate: Callable[[], Any], compiled: bool,
                       warmups: int, batch: int) -> Callable[[], Any]:
        """The first warm-up generation of ``key`` (batch, method): where the run has not counted its
        work yet, eagerly it is the counted generation; else (compiled, no warm-up, or counted at
        another ``batch``: ``count_batch``) the counted one runs now, eagerly (``force_eager``: before
        anything compiles), outside the warm-up's seconds, and it is ``generate``. FLOPs scale with
        the batch alike for every method, so counts at one batch give another's ideal speedups."""
        if key in self.counts:
            return generate
        same = self.counts.get((batch, key[1]))
        if same is not None and same["counted_at_batch"] == batch:  # that batch's own count serves
            self.counts[key] = same
            return generate
        if not compiled and warmups > 0 and batch == key[0]:
            return partial(self.count, key, generate, batch)
        counted = generate if batch == key[0] else self.generation(batch, compiled)
        with torch.compiler.set_stance("force_eager"):
            self.count(key, counted, batch)
        return generate

    def count(self, key: tuple[int, str], generate: Callable[[], Any], batch: int) -> None:
        """The counted generation of ``key``, at ``batch``; the run's first one also sets the time estimate."""
        start = time.perf_counter()
        self.counts[key] = {**counted_generation(self.work, generate), "counted_at_batch": batch}
        sync()
        if "first_generation_s" not in self.extra:
            self.extra["first_generation_s"] = time.perf_counter() - start
            self.extra["first_generation_batch"] = batch
            print_estimate(self)

    def trace_path(self, config: Config) -> Path:
        on = "on" if config.prefetch else "off"
        return self.out.parent / f"trace-{self.work.model}-{config.compile}-b{config.batch}-{METHOD_TAGS[config.method]}-prefetch-{on}.json.gz"

    def differences(self, config: Config) -> dict[str, float | None]:
        out = self.outputs[config]
        plain = self.outputs.get(config._replace(prefetch=False, method=UNCACHED))
        found = {"max_abs_diff_vs_uncached": max_abs_diff(out, plain)}
        if config.prefetch:
            found["max_abs_diff_vs_prefetch_off"] = max_abs_diff(out, self.outputs.get(config._replace(prefetch=False)))
        return found

    def add(self, row: dict[str, Any]) -> None:
        """Keep ``row``, rewrite the result file, print the row's line."""
        self.rows.append(row)
        self.compare_plain_paths()
        result = self.result()
        atomic_write_text(self.out, json.dumps(result, indent=1) + "\n")
        print(row_line(result["rows"][-1]), flush=True)

    def compare_plain_paths(self) -> None:
        """Each step-graphs row against the same method in the cell without step graphs
        (``PLAIN_PATH``), once both have run in whichever order. Eager, the same kernels: 0 there too.
        Compiled, another compile, and two compiles of one model can differ (benchmarks/
        compile_variation.py; the cause is not established), so the exactness claim is
        ``max_abs_diff_vs_plain_path``, from the row's own set-up."""
        for row in self.rows:
            if row["compile"] in PLAIN_PATH and "ms" in row and "max_abs_diff_vs_plain_cell" not in row:
                config = Config(row["compile"], row["batch"], row["prefetch"], row["method"])
                plain = self.outputs.get(config._replace(compile=PLAIN_PATH[row["compile"]]))
                if plain is not None:
                    row["max_abs_diff_vs_plain_cell"] = max_abs_diff(self.outputs[config], plain)

    def result(self) -> dict[str, Any]:
        rows = with_speedups(self.rows)
        return {
            "benchmark": "pipeline_speed: pipe(...) on diffusers' own pipelines, cached against uncached (issue 20)",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": self.settings(),
            **self.extra,
            "minutes": self.elapsed_min(),
            "targets": targets(rows, self.work.model),
            "rows": rows,
        }

    def settings(self) -> dict[str, Any]:
        work, args = self.work, self.args
        return {
            "model": work.model, "tiny": args.tiny, **work.settings, "steps": work.steps, "mask": list(work.mask),
            "computed_steps_in_mask": sum(work.mask), "calls_per_step": work.calls_per_step,
            "block_keys": list(work.block_keys), "layer_keys": list(work.layer_keys),
            "batches": args.batches, "compile": args.compile, "prefetch": args.prefetch, "methods": list(args.methods),
            "traced": sorted(args.trace),
            "prefetch_available": prefetch_available(), "repeats": args.repeats,
            "warmup": {compile_mode: self.warmups(compile_mode) for compile_mode in WARMUP},
            "count_batch": args.count_batch or "each configuration's own",
            "backend": args.backend, "max_minutes": args.max_minutes,
            "skip_guard_eval_unsafe": ("timed, clocked and traced runs of compiled configurations but cache-dit's"
                                       if args.skip_guards else False),
            "recompile_limit": torch._dynamo.config.recompile_limit,
            "accumulated_recompile_limit": torch._dynamo.config.accumulated_recompile_limit,
            "compile_how": {
                "smoothcache": "pipe.transformer = torch.compile(pipe.transformer[, mode='reduce-overhead']), then "
                               "smoothcache.cache(pipe, schedule) (docs/speed.md; as smoothcache bench --compile)",
                "cache-dit": "cache_dit.enable_cache(pipe, ...), then pipe.transformer = torch.compile(pipe.transformer"
                             "[, mode='reduce-overhead']) (cache-dit docs/user_guide/COMPILE.md; reduce-overhead is "
                             "options={'triton.cudagraphs': True}, its docs/user_guide/CUDA_GRAPH.md)",
                "regional": "pipe.transformer.compile_repeated_blocks() (DiT: block.compile() for each of its "
                            "transformer_blocks) in place of torch.compile(pipe.transformer), in the same order",
                "every configuration": "torch._dynamo.reset() before and after; under compile each pipe(...) call "
                                       "follows torch.compiler.cudagraph_mark_step_begin()",
            },
            "step_clock": self.args.step_clock,
            "exactness_reference": EXACTNESS_REFERENCE,
            "timing": {"eager": ("interleaved: the cell's methods in turn on one set-up, each round starting one method later"
                                 if self.args.in_turn else "sequential (--no-in-turn)"),
                       "compile": ("interleaved: uncached and smoothcache's methods in turn on one compiled transformer, "
                                   "each round starting one method later; cache-dit compiled alone after them"
                                   if self.args.in_turn else "sequential (--no-in-turn)"),
                       "others": "sequential: one configuration after another, each compiling or capturing its own"},
            "ideal_speedup": "FLOPs of one eager uncached generation / FLOPs of one eager generation of the method "
                             "(torch.utils.flop_counter), same batch",
        }


# ---- eager and plain compile cells: the methods in turn -----------------------------------------
@dataclass
class Turn:
    """One method of an in-turn cell: how it is switched on for its own generations only, and what
    those generations measured."""

    config: Config
    how: list[str] = field(default_factory=list)
    switched_on: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    handle: Any = None  # smoothcache's, where the method is smoothcache's
    warmup_s: float = 0.0
    host_syncs: int | None = None
    times: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # seconds after the cell's first timed generation
    peak_mib: float | None = None
    peak_reserved_mib: float | None = None
    kept: dict[str, int] | None = None  # by device, read after its last generation
    dynamo: dict[str, Counter[str]] = field(default_factory=lambda: {"warmup": Counter(), "timed": Counter()})
    output: torch.Tensor | None = None  # its last timed generation's
    step_ms: dict[str, Any] | None = None
    after_rounds_error: str | None = None  # the step-clocked or traced generation failed; the timings stand
    traced: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None  # set: the method has left the rounds

    @property
    def method(self) -> str:
        return self.config.method


class InTurnCell:
    """A (compile, batch, prefetch) cell's methods on one pipeline set-up, taking turns (which
    methods: ``timed_in_turn``): after the warm-up rounds, ``--repeats`` rounds of one generation
    each, every round starting one method later. Eager DiT and plain compile at small batches are
    bound by the host, and a borrowed host's speed drifts within a minute (one H100 timed compiled
    whole blocks above their ideal speedup, one configuration after the other), so methods timed
    one after the other would not compare; in turn, the drift hits them alike."""

    def __init__(self, runner: Runner, configs: Sequence[Config]) -> None:
        self.runner, self.work = runner, runner.work
        self.compile_mode = configs[0].compile
        self.compiled = is_compiled(self.compile_mode)
        self.warmup = runner.warmups(self.compile_mode)
        self.generate = runner.generation(configs[0].batch, compiled=self.compiled)
        self.skip_guards = skips_guards(runner.args, configs[0])  # the same for every method taking turns
        self.turns = [Turn(config) for config in configs]
        self.timed_since: float | None = None  # when the first timed generation started
        self.teardown_errors: list[str] = []

    def after_warmup(self) -> Callable[[], torch.Tensor]:
        """The generation the timed, clocked and traced runs make: with ``--skip-guards`` under the
        stance (the warm-up compiled every graph), else ``generate`` as it is."""
        return unchecked(self.generate) if self.skip_guards else self.generate

    def measure(self) -> list[dict[str, Any]]:
        """A row per method, in the cell's order; a failed set-up fails every row."""
        heads = [row_head(self.work.model, turn.config) for turn in self.turns]
        skip = self.runner.over_budget()
        if skip:
            return [{**head, "skipped": skip} for head in heads]
        try:
            with self.set_up():
                self.take_rounds()
                self.finish()
            for turn in self.turns:  # every output first: the rows compare them
                if turn.error is None:
                    self.runner.outputs[turn.config] = turn.output
            rows = [{**head, **self.row(turn)} for head, turn in zip(heads, self.turns, strict=True)]
        except Exception as error:  # noqa: BLE001 - a cell that cannot run here is recorded, not fatal
            rows = [{**head, **error_fields(error)} for head in heads]
        if self.teardown_errors:
            rows = [{**row, "teardown_errors": self.teardown_errors} for row in rows]
        return rows

    @contextlib.contextmanager
    def set_up(self) -> Iterator[None]:
        """The transformer compiled where the cell is compiled, prefetch where it has it, then each
        method made ready and switched off; all of it undone afterwards in reverse (what cache-dit
        leaves on the transformer put back last)."""
        pipe, undo = self.work.pipe, []
        torch._dynamo.reset()
        try:
            undo.append(gpu_peers.restorer(pipe.transformer))
            compiled_how = compile_transformer_of(pipe, self.compile_mode, self.runner.args.backend, undo)
            prefetch = None
            if self.turns[0].config.prefetch:
                prefetch = smoothcache.prefetch_timesteps(pipe, device_once=True)
                undo.append(prefetch.disable)
            for turn in self.turns:
                turn.how = [how for how in (compiled_how, PREFETCH_HOW if prefetch else None) if how]
                self.make_ready(turn, prefetch)
                if turn.handle is not None:
                    undo.append(turn.handle.disable)
            yield
        finally:
            undo_all(undo, self.teardown_errors)

    def make_ready(self, turn: Turn, prefetch: Any) -> None:
        """smoothcache: the schedule cached, then disabled at once (disabled handles coexist, one
        may be enabled at a time), enabled for its own generations only. cache-dit: enabled for each
        of its generations and disabled after. An error is the method's: it leaves the rounds."""
        method = turn.config.method
        try:
            if method in (BLOCKS, LAYERS):
                turn.handle = cached_switched_off(self.work, method)
                turn.switched_on = partial(pipeline_methods.enabled, turn.handle)
                turn.how += [smoothcache_how(self.work, method), SWITCHED_HOW]
            elif method == CACHE_DIT:
                import cache_dit  # noqa: F401 - missing, the method fails here, not in its first turn

                turn.switched_on = partial(cache_dit_on, self.work, prefetch)
                suspended = " (prefetch suspended around it: cache-dit wraps the pipeline's class first)" if prefetch else ""
                turn.how += [f"{CACHE_DIT_HOW} before each of its generations{suspended}",
                             "cache_dit.disable_cache(pipe) after, and the forward it leaves on the transformer put back"]
        except Exception as error:  # noqa: BLE001 - this method's row records it; the others go on
            turn.error = error_fields(error)

    def take_rounds(self) -> None:
        """The warm-up rounds, then the timed ones (``take_rounds``); without warm-up rounds, each
        method's work is counted first, in a round of its own."""
        if self.warmup == 0:
            take_rounds(self.turns, 1, self.counting_turn, self.left_on)
        take_rounds(self.turns, self.warmup + self.runner.args.repeats, self.take_turn, self.left_on)

    def counting_turn(self, turn: Turn, _: int) -> None:
        """``turn``'s method counted (``Runner.counting_first``), switched on for it alone."""
        with self.switched_on(turn, "warmup"):
            self.runner.counting_first((turn.config.batch, turn.config.method), self.generate, self.compiled, 0,
                                       self.runner.count_batch(turn.config))

    def left_on(self) -> list[str]:
        """What a method left switched on: an enabled smoothcache handle, cache-dit's pipeline class
        or the forward it puts on the transformer."""
        found = [f"{t.config.method} (its handle)" for t in self.turns if t.handle is not None and t.handle.enabled]
        if "_original_call" in vars(type(self.work.pipe)):
            found.append("cache-dit's pipeline __call__")
        if "forward" in vars(unwrapped(self.work.pipe.transformer)):  # torch.compile's wrapper sets its own
            found.append("a forward set on the transformer")
        return found

    def take_turn(self, turn: Turn, round_index: int) -> None:
        """One generation of ``turn``'s method, switched on for it alone."""
        warming_up = round_index < self.warmup
        with self.switched_on(turn, "warmup" if warming_up else "timed"):
            if warming_up:
                self.warm_up_generation(turn, round_index)
            else:
                self.timed_generation(turn)

    def warm_up_generation(self, turn: Turn, round_index: int) -> None:
        """As ``Runner.warm_up`` does: the run's first generation of a (batch, method) is counted,
        eagerly (compiled: one more, under ``force_eager``, before the method's first compiled
        one); the last warm-up counts the host's waits for the GPU."""
        run = self.generate
        if round_index == 0:
            run = self.runner.counting_first((turn.config.batch, turn.config.method), self.generate, self.compiled,
                                             self.warmup, self.runner.count_batch(turn.config))
        start = time.perf_counter()
        if round_index == self.warmup - 1:
            turn.host_syncs = host_syncs_of(run, self.runner.device)
        else:
            run()
        sync()
        turn.warmup_s += time.perf_counter() - start

    def timed_generation(self, turn: Turn) -> None:
        """One timed generation: its time and start, and the peak memory of it alone."""
        sync()
        reset_peaks()
        output, start, seconds = clocked(self.after_warmup())
        turn.times.append(seconds)
        self.timed_since = start if self.timed_since is None else self.timed_since
        turn.starts.append(start - self.timed_since)
        turn.output = output.detach().float().cpu()  # off the GPU: the next methods' peaks are their own
        allocated, reserved = peaks_mib()
        if allocated is not None:
            turn.peak_mib = max(turn.peak_mib or 0.0, allocated)
            turn.peak_reserved_mib = max(turn.peak_reserved_mib or 0.0, reserved)

    @contextlib.contextmanager
    def switched_on(self, turn: Turn, phase: str) -> Iterator[None]:
        """``turn``'s method on for one generation; dynamo's counts in it go to ``phase``. What its
        cache keeps is read before it is switched off, which releases it."""
        before = gpu_bench.dynamo_counts()
        with turn.switched_on():
            yield
            if turn.handle is not None:
                turn.kept = turn.handle.state.kept_bytes()
        turn.dynamo[phase].update(counts_between(before, gpu_bench.dynamo_counts()))

    def finish(self) -> None:
        """After the rounds, per method: one generation with its steps clocked, and one traced where asked."""
        args = self.runner.args
        for turn in self.turns:
            if turn.error is not None:
                continue
            try:
                if args.step_clock:
                    with self.switched_on(turn, "timed"):
                        turn.step_ms = pipeline_measures.clocked_steps(self.work, self.after_warmup(), self.runner.device)
                if turn.config.method in args.trace:
                    with self.switched_on(turn, "timed"):
                        turn.traced = traced_generation(self.work, self.after_warmup(), self.runner.device,
                                                        self.runner.trace_path(turn.config))
            except Exception as error:  # noqa: BLE001 - its timed runs stand; the row says what failed after them
                turn.after_rounds_error = error_text(error)

    def row(self, turn: Turn) -> dict[str, Any]:
        """``turn``'s fields as ``Runner.timed`` gives a configuration's, and when each run started."""
        how = "; then ".join(turn.how) or "pipe(...)"
        if turn.error is not None:
            return {"how": how, **turn.error}
        fields = self.runner.row_fields(
            turn.config, times=turn.times, warmup_s=turn.warmup_s, syncs=turn.host_syncs,
            peaks=(turn.peak_mib, turn.peak_reserved_mib), kept=turn.kept, step_ms=turn.step_ms, traced=turn.traced,
            warmup_counts=turn.dynamo["warmup"], timed_counts=turn.dynamo["timed"])
        after_rounds = {"after_rounds_error": turn.after_rounds_error} if turn.after_rounds_error else {}
        return {"how": how, **fields, "runs_at_s": turn.starts, **after_rounds}


def take_rounds(turns: Sequence[Any], rounds: int, take_turn: Callable[[Any, int], None],
                left_on: Callable[[], list[str]]) -> None:
    """``rounds`` rounds in which each method still in (``turn.error`` None) takes its turn
    (``take_turn(turn, round_index)``), each round starting one method later (``in_rotation``). A
    turn that raises takes its method out of the rounds, its error on ``turn.error``, and the others
    go on; unless it left something switched on (``left_on()``, what the cell would otherwise time
    the other methods with): then the cell stops. Shared by pipeline_speed's and stacking_speed's cells."""
    for round_index in range(rounds):
        for turn in in_rotation(turns, round_index):
            if turn.error is not None:
                continue
            try:
                take_turn(turn, round_index)
            except Exception as error:
                turn.error = error_fields(error)
                left = left_on()
                if left:  # switching it off failed: every later turn would run with it on
                    raise RuntimeError(
                        f"{turn.method}'s turn failed and left {', '.join(left)} switched on, which the other "
                        "methods' turns would run with; the cell stops") from error


def in_rotation(turns: Sequence[Any], round_index: int) -> list[Any]:
    """``turns`` in the order round ``round_index`` takes them: each round starts one later than the
    last, so that no method always runs first (after the previous round's last) or last."""
    shift = round_index % len(turns)
    return [*turns[shift:], *turns[:shift]]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "cuda": torch.version.cuda, "smoothcache": smoothcache.__version__}
    for name in ("diffusers", "cache-dit"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def row_line(row: dict[str, Any]) -> str:
    head = f"{row['model']} {row['compile']:10} b{row['batch']:<2} prefetch {'on ' if row['prefetch'] else 'off'} {row['method']:27}"
    if "ms" not in row:
        return f"{head} {row.get('skipped') or 'FAILED ' + row.get('error', '')[:300]}"
    speed = f"{row['speedup']:.2f}x" if "speedup" in row else "  -  "
    ideal = f"{row['ideal_speedup']:.2f}x" if "ideal_speedup" in row else "-"
    in_turn = ""
    if row.get("timing") == "interleaved":
        in_turn = ", in turn" + (f" {row['speedup_paired']:.2f}x round by round" if "speedup_paired" in row else "")
    line = (f"{head} {row['ms']:9.1f} ms {speed} (ideal {ideal}){in_turn}, {row['graphs_compiled_in_warmup']} graphs, "
            f"{row['recompiles_while_timed']} recompiles timed, {row['host_syncs_per_generation']} syncs, "
            f"warm-up {row['warmup_s']:.0f} s; {step_line(row['step_ms'])}")
    return line + (f"; teardown failed: {row['teardown_errors']}" if "teardown_errors" in row else "")


def step_line(step_ms: dict[str, Any] | None) -> str:
    """A step's median milliseconds, computing / reusing, on the host and (on a GPU) the device."""
    if step_ms is None:
        return "steps not clocked (--no-step-clock)"

    def pair(where: str) -> str:
        values = [step_ms[f"{where}_{kind}"] for kind in ("computing", "reusing")]
        return "/".join("-" if v is None else f"{v:.2f}" for v in values)

    return f"step ms computing/reusing: host {pair('host')}, device {pair('device')}"


def guessed_seconds(runner: Runner, config: Config, counted: bool) -> float:
    """A configuration's seconds guessed from the run's first (eager, counted) uncached generation:
    scaled by batch (never below a quarter: small batches are bound by the host), by the model's
    compiled factor where compiled, by the computed share where cached; plus a compile allowance,
    and the counting generation where ``counted``. The counted generation is slower than a plain
    one (its FLOP counter), so this errs long: a guess until the run has its own paces."""
    work, first_s, first_batch = runner.work, runner.extra["first_generation_s"], runner.extra["first_generation_batch"]
    share = sum(work.mask) / work.steps + 0.1
    compiled = is_compiled(config.compile)
    one = first_s * max(config.batch / first_batch, 0.25) * (1.0 if config.method == UNCACHED else share)
    clocked = 1 if runner.args.step_clock else 0
    warmups = runner.warmups(config.compile)
    seconds = (warmups + runner.args.repeats + clocked) * one * (work.compiled_factor if compiled else 1.0)
    count_batch = runner.count_batch(config)
    counted_apart = counted and (compiled or warmups == 0 or count_batch != config.batch)
    per_batch = 1.0 if config.method == UNCACHED else share  # the counted generation at count_batch, scaled as ``one``
    counting = first_s * max(count_batch / first_batch, 0.25) * per_batch if counted_apart else 0.0
    return seconds + counting + (work.compile_guess_s if compiled else 0.0)


def remaining_seconds(runner: Runner, configs: Sequence[Config]) -> float | None:
    """``configs``' seconds: each at the run's median pace for its setting, batch and timing where
    one has been measured, else for its setting, else guessed (``guessed_seconds``); configurations
    that never run cost nothing. None while there is neither a pace nor a first generation to go by."""
    seen = set(runner.counts)  # (batch, method) pairs whose counting generation has run
    total = 0.0
    for config in configs:
        if never_runs(config, runner.device):
            continue
        paces = runner.paces.get((config.compile, config.batch, timing_of(config, runner.args.in_turn))) or [
            seconds for key, values in runner.paces.items() if key[0] == config.compile for seconds in values]
        counted = (config.batch, config.method) not in seen
        seen.add((config.batch, config.method))
        if paces:
            total += statistics.median(paces)
        elif "first_generation_s" in runner.extra:
            total += guessed_seconds(runner, config, counted)
        else:
            return None
    return total


def runnable(runner: Runner, configs: Sequence[Config]) -> int:
    return sum(not never_runs(config, runner.device) for config in configs)


def print_estimate(runner: Runner) -> None:
    """The whole run's expected length, from the first generation only (``guessed_seconds``)."""
    total = remaining_seconds(runner, runner.plan) or 0.0
    first_s, first_batch = runner.extra["first_generation_s"], runner.extra["first_generation_batch"]
    print(f"first uncached generation {first_s:.2f} s (eager, batch {first_batch}); {runnable(runner, runner.plan)} "
          f"configurations, expected about {total / 60:.1f} min (a guess); none starts after {runner.args.max_minutes} min",
          flush=True)
    if total / 60 > runner.args.max_minutes:
        print(f"  the guess runs past --max-minutes {runner.args.max_minutes}: configurations due after it will not "
              f"start (the guess errs long); raise --max-minutes to time them all", flush=True)


def print_progress(runner: Runner, remaining: Sequence[Config]) -> None:
    """After each configuration or in-turn cell: the time so far and what the rest should take at
    this run's paces (``remaining_seconds``), against the ``--max-minutes`` gate."""
    left = remaining_seconds(runner, remaining)
    total, to_go = runnable(runner, runner.plan), runnable(runner, remaining)
    rest = "" if left is None else f"; about {left / 60:.1f} min more"
    print(f"  {runner.elapsed_min():.1f} min so far, {total - to_go} of {total} configurations{rest} "
          f"(none starts after {runner.args.max_minutes} min)", flush=True)


# ---- the command line --------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def warmup_setting(text: str) -> tuple[str, int]:
    """``--warmup``'s ``SETTING=N``: a compile setting and its warm-up generations, no fewer than it needs."""
    setting, _, count = text.partition("=")
    if setting not in FEWEST_WARMUPS or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected SETTING=N with SETTING one of {', '.join(COMPILES)}")
    if int(count) < FEWEST_WARMUPS[setting]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {setting} needs at least {FEWEST_WARMUPS[setting]} warm-up generations, or a timed one "
            "would still compile, record or capture")
    return setting, int(count)


def result_path(out: Path, model: str) -> Path:
    return out / f"pipeline-speed-{model}.json"


def run_model(model: str, args: argparse.Namespace) -> Path:
    """Build ``model``'s pipeline, run its configurations in order, plot; returns the JSON's path."""
    args.batches = args.batches or list(DEFAULT_BATCHES[model])
    args.repeats = args.repeats or (1 if args.tiny else DEFAULT_REPEATS[model])
    started = time.perf_counter()
    work = BUILDERS[model](args.tiny, args.device)
    runner = Runner(work, args, result_path(args.out, model), started=started)
    runner.extra["build_s"] = time.perf_counter() - started
    print(f"{model}: built in {runner.extra['build_s']:.1f} s, "
          f"{sum(p.numel() for p in work.pipe.transformer.parameters()) / 1e6:,.1f} M parameters", flush=True)
    prefetches = {"off": [False], "on": [True], "both": [False, True]}[args.prefetch]
    if not prefetch_available():
        print("smoothcache.prefetch_timesteps is not in this smoothcache: running without prefetch only", flush=True)
        prefetches = [False]
    runner.plan = [Config(c, b, p, m) for c, b in cells(model, args.compile, args.batches) for m in args.methods for p in prefetches]
    result = runner.run()
    print(targets_table(result["targets"]), flush=True)
    try:
        plot(result, runner.out.with_suffix(".png"))
    except ImportError as error:  # the GPU machine may lack matplotlib: the JSON is the result
        print(f"no plot ({error}); draw it where matplotlib is: --plot-from {runner.out}", flush=True)
    return runner.out


def replot(files: Sequence[Path], out: Path) -> list[Path]:
    """One result file: its plot redrawn beside it (the file is left as it is). Several: merged into
    ``out``, then plotted. Either way issue 20's verdict is printed, drawn from the rows."""
    if len(files) == 1:
        result = read_result(files[0])
        print(targets_table(targets(result["rows"], result["settings"]["model"])), flush=True)
        return [plot(result, files[0].with_suffix(".png"))]
    result = merge(files)
    print(targets_table(result["targets"]), flush=True)
    path = result_path(out, result["settings"]["model"])
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return [path, plot(result, path.with_suffix(".png"))]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS, default=["dit"], help="one run per model, in turn")
    parser.add_argument("--compile", nargs="+", choices=COMPILES, default=list(DEFAULT_COMPILES),
                        help="graphs: compiled in the default mode, then smoothcache.step_graphs(pipe); "
                             "eager-graphs: step_graphs without compiling (both CUDA only)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: DiT 1 8; Flux and Wan 1")
    parser.add_argument("--prefetch", choices=["off", "on", "both"], default="both",
                        help="smoothcache.prefetch_timesteps on every configuration of a cell: off, on, or both in turn")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_NAMES), default=list(METHOD_NAMES),
                        help="which to run in each cell, in this order (uncached always runs, first)")
    parser.add_argument("--trace", nargs="*", choices=list(METHOD_NAMES), default=[],
                        help="these methods' rows also write a profiler trace of one generation (trace-*.json.gz "
                             "beside the JSON; each model call a range 'step N computing|reusing') and their "
                             "busiest host operators")
    parser.add_argument("--repeats", type=int, help="timed generations per configuration (default: DiT 5, Flux 3, Wan 2; 1 with --tiny)")
    parser.add_argument("--max-minutes", type=float, default=7.5,
                        help="per model, start no configuration after this many minutes (the last may take a few more)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"),
                        help="writes OUT/pipeline-speed-<model>.json and .png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor; eager on the CPU, dynamo only)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="compiled configurations (uncached too) run their timed generations under "
                             "torch.compiler.set_stance(skip_guard_eval_unsafe=True), after the warm-up")
    parser.add_argument("--in-turn", action=argparse.BooleanOptionalAction, default=True,
                        help="eager and plain compile cells time their methods in turn (default; under compile "
                             "cache-dit alone after them); --no-in-turn times them one after "
                             "another, each row written as it ends (a Wan cell's generations take a minute each)")
    parser.add_argument("--eager-warmup", type=int, choices=range(10), metavar="N",
                        help=f"warm-up generations of eager cells (default {WARMUP['eager']}); 0 where one generation "
                             "takes minutes and its first-call costs are lost in it (Wan at batch 8)")
    parser.add_argument("--warmup", type=warmup_setting, nargs="+", metavar="SETTING=N",
                        help=f"warm-up generations of a compile setting's cells (default {WARMUP}), at least "
                             f"{FEWEST_WARMUPS}: fewer where a generation takes minutes (Wan at batch 8); each row "
                             "still counts recompiles while timed")
    parser.add_argument("--count-batch", type=positive_int, metavar="B",
                        help="count each method's work (FLOPs, steps) in a generation at batch B, not at each "
                             "configuration's batch: the ideal speedups do not depend on it, a small batch costs less")
    parser.add_argument("--step-clock", action=argparse.BooleanOptionalAction, default=True,
                        help="one more generation per configuration with its steps clocked (step_ms); "
                             "--no-step-clock saves it where a generation takes a minute (Wan)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, few steps: checks the code paths, measures nothing")
    parser.add_argument("--plot-from", type=Path, nargs="+",
                        help="only redraw the plot of a result JSON; several (parts of one model's run): merge into --out")
    args = parser.parse_args(argv)
    args.methods = [UNCACHED, *(METHOD_NAMES[m] for m in dict.fromkeys(args.methods) if m != "uncached")]
    args.trace = {METHOD_NAMES[m] for m in args.trace}
    args.warmup = dict(args.warmup or ())
    if args.eager_warmup is not None:
        args.warmup["eager"] = args.eager_warmup
    if args.backend is None:
        args.backend = "eager" if torch.device(args.device).type == "cpu" else "inductor"
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.plot_from:
        paths = replot(args.plot_from, args.out)
        print(*paths, sep="\n")
        return paths
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared CPU: spinning thread pools cost far more than they give
    # every configuration adds graphs (smoothcache: one per compute/reuse pattern; cache-dit: its own);
    # keep them compiled rather than falling back to eager (cache-dit's set_compile_configs values)
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 8192
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is first imported: no table per generation
    paths = []
    for model in args.model:
        paths.append(run_model(model, argparse.Namespace(**vars(args))))
        print(paths[-1], flush=True)
    return paths


if __name__ == "__main__":
    main()
