"""SmoothCache against its peers on a Flux-dev-sized transformer (random weights: latency does not
depend on them), through the real ``FluxPipeline``.

The pipeline is built offline: no text encoders (fixed random T5 and CLIP embeddings are passed as
``prompt_embeds``/``pooled_prompt_embeds``) and no VAE (``output_type="latent"``, so the decode is
not timed). Flux-dev at 1024x1024: 19 double + 38 single blocks, width 3072, 4096 image + 512 text
tokens, bf16 (about 24 GB), guidance-distilled (one transformer call per step), 28 flow-matching
Euler steps with Flux-dev's shifted sigmas.

Every configuration runs on the same model, one after the other, each attached before and detached
after (dynamo reset and blocks recompiled between compiled ones):

- uncached; ours: a SmoothCache schedule at a compute fraction (calibrated here on one generation)
  and FORA (every 2nd step);
- diffusers' own caches through ``transformer.enable_cache``: FirstBlockCache, MagCache (Flux's
  published ``FLUX_MAG_RATIOS``), PyramidAttentionBroadcast, FasterCache, TaylorSeer (attention,
  and its lite whole-model mode);
- cache-dit's DBCache (dynamic threshold, and a static step mask), where cache-dit imports;
- eager for all of them; regional compile (each block compiled) for uncached and ours; with
  ``--whole``, whole-transformer compile for uncached and ours.

For each it reports the median latency of ``--repeats`` generations after one warm-up, speedup
against the uncached run of the same compile setting, the work it really did — FLOPs counted over
one whole generation with ``torch.utils.flop_counter`` (matmuls and attention: skipped work is never
dispatched) and the fraction of block executions (forward hooks on each block's first Linear) —,
the ideal speedup from those FLOPs, efficiency = speedup / ideal, peak memory, and the graphs dynamo
compiled and the recompilations it logged. Peers with a threshold have it searched (``--probes``
generations) for the FLOP fraction our schedule runs at, so methods compare at similar compute.

Order: eager uncached, calibration, ours eager, uncached and SmoothCache compiled, the peers, FORA
compiled. No configuration starts after ``--max-minutes``; ``peers.json`` is rewritten after each.

    python benchmarks/gpu_peers.py --out "$OUT"            # one H100/H200, about 7 minutes
    python benchmarks/gpu_peers.py --tiny --out /tmp/peers  # tiny Flux on the CPU (~1 min): the code paths

On the GPU machine (wheels for diffusers 0.42.1, cache-dit 1.5.3 and the plot's matplotlib carried
in ``.whl-peers/``; the image has torch, transformers, huggingface_hub, numpy, pyyaml)::

    pip install -q --no-index --no-deps --target /tmp/pydeps .whl-peers/*.whl &&
    PYTHONPATH=/tmp/pydeps:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_peers.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import smoothcache
from smoothcache import Schedule

STEPS = 28  # Flux-dev's default; MagCache's FLUX_MAG_RATIOS are for 28 steps
TINY_STEPS = 12  # the smoke test: same code paths, less CPU time
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TINY = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
FLUX_DEV_SCHEDULER = {  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


# ---- the model and one generation -------------------------------------------------------------
@dataclass
class Setup:
    """What a generation needs: the pipeline, its fixed text embeddings, the image size."""

    pipe: Any
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    size: int
    steps: int

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer


def build(tiny: bool, device: str, dtype: torch.dtype) -> Setup:
    """A random-weight Flux transformer made directly on ``device`` in ``dtype`` (no fp32 copy: the
    full model is 24 GB in bf16), with default PyTorch initialisation, inside a ``FluxPipeline``."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    config = FLUX_TINY if tiny else FLUX_DEV
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    uninitialised = [
        name for name, module in transformer.named_modules()
        if not hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False))
    ]
    if uninitialised:
        raise RuntimeError(f"no reset_parameters() to initialise {uninitialised[:3]}: build this model another way")
    transformer = transformer.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in transformer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    transformer.eval().requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    text_tokens = 8 if tiny else 512  # T5's max_sequence_length for Flux-dev
    g = torch.Generator().manual_seed(100)
    prompt = torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype)
    return Setup(pipe, prompt, pooled, 64 if tiny else 1024, TINY_STEPS if tiny else STEPS)


@torch.no_grad()
def generate(setup: Setup, seed: int = 0) -> torch.Tensor:
    """One FluxPipeline call (guidance 3.5, the pipeline's own loop and scheduler), latents out."""
    device = setup.prompt_embeds.device
    return setup.pipe(
        prompt_embeds=setup.prompt_embeds, pooled_prompt_embeds=setup.pooled_prompt_embeds,
        height=setup.size, width=setup.size, num_inference_steps=setup.steps, guidance_scale=3.5,
        generator=torch.Generator(device).manual_seed(seed), output_type="latent",
    ).images


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


# ---- measuring ---------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_blocks(transformer: nn.Module) -> Iterator[list[int]]:
    """Count block executions: a hook on each block's first Linear (its AdaLN projection), which a
    cache that skips the block never reaches (hooks on the block itself fire for skipped calls too)."""
    count = [0]
    handles = []
    for block in blocks_of(transformer):
        first = next(m for m in block.modules() if isinstance(m, nn.Linear))
        handles.append(first.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)))
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def counted_generation(setup: Setup) -> dict[str, Any]:
    """One generation under FlopCounterMode and the block counter: the work really done."""
    from torch.utils.flop_counter import FlopCounterMode

    with counting_blocks(setup.transformer) as blocks, FlopCounterMode(display=False) as flops:
        latents = generate(setup)
    total_blocks = len(blocks_of(setup.transformer)) * setup.steps
    return {
        "flops": float(flops.get_total_flops()), "block_fraction": blocks[0] / total_blocks,
        "latents": latents.float(), "finite": bool(torch.isfinite(latents).all()),
    }


class RecompileLog(logging.Handler):
    """Counts dynamo's recompilation messages (the ``recompiles`` log artifact) and keeps them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.reasons.append(record.getMessage()[:400])

    @classmethod
    def install(cls) -> RecompileLog:
        torch._logging.set_logs(recompiles=True)
        logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        logger.handlers.clear()
        logger.propagate = False
        handler = cls()
        logger.addHandler(handler)
        return handler


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(setup: Setup, repeats: int) -> tuple[list[float], float | None]:
    """Seconds of ``repeats`` generations and the peak memory (MiB) over them."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        generate(setup)
        sync()
        times.append(time.perf_counter() - start)
    return times, peak_mib()


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


# ---- configurations ----------------------------------------------------------------------------
Detach = Callable[[], None]


@dataclass
class Method:
    """A cache to attach; ``threshold`` names the knob a search may set for a compute budget."""

    name: str
    implementation: str
    attach: Callable[[Setup, float | None], Detach]
    settings: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None  # the starting value of a searched threshold


def no_cache(setup: Setup, _: float | None) -> Detach:
    return lambda: None


def smoothcache_method(name: str, schedule: Schedule, forecast: str = "none") -> Method:
    def attach(setup: Setup, _: float | None) -> Detach:
        return smoothcache.cache(setup.pipe, schedule, forecast=forecast).disable  # type: ignore[arg-type]

    settings = {"compute_fraction_of_cached_layers": schedule.compute_fraction(), "forecast": forecast}
    return Method(name, "smoothcache", attach, settings)


def diffusers_method(name: str, make_config: Callable[[Setup, float | None], Any], threshold: float | None = None) -> Method:
    def attach(setup: Setup, value: float | None) -> Detach:
        config = make_config(setup, value)
        setup.transformer.enable_cache(config)
        attach.config = repr(config)  # type: ignore[attr-defined]
        return setup.transformer.disable_cache

    return Method(name, "diffusers", attach, threshold=threshold)


def diffusers_methods() -> list[Method]:
    """diffusers' caches on Flux, at settings near half the compute where a setting is fixed."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    def timestep(setup: Setup) -> Callable[[], Any]:
        return lambda: setup.pipe.current_timestep

    return [
        diffusers_method("FirstBlockCache", lambda s, t: FirstBlockCacheConfig(threshold=t), threshold=0.05),
        diffusers_method(
            "MagCache (FLUX_MAG_RATIOS)",
            lambda s, t: MagCacheConfig(threshold=t, num_inference_steps=s.steps, mag_ratios=FLUX_MAG_RATIOS),
            threshold=0.06,
        ),
        diffusers_method(
            "PyramidAttentionBroadcast 2",  # its documented recipe: attention every 2nd step within t in (100, 800)
            lambda s, _: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=timestep(s),
            ),
        ),
        diffusers_method(
            "FasterCache 2",  # Flux is guidance-distilled: no unconditional branch to skip
            lambda s, _: FasterCacheConfig(
                spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=timestep(s), is_guidance_distilled=True,
            ),
        ),
        diffusers_method(
            "TaylorSeer 2",  # attention extrapolated to first order, computed every 2nd step after 3
            lambda s, _: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=3, max_order=1),
        ),
        diffusers_method(
            "TaylorSeer lite 2",  # blocks skipped, the output projection extrapolated: whole-model compute
            lambda s, _: TaylorSeerCacheConfig(
                cache_interval=2, disable_cache_before_step=3, max_order=1, use_lite_mode=True
            ),
        ),
    ]


def restorer(model: nn.Module) -> Callable[[], None]:
    """Puts ``model``'s modules back as they are now: instance attributes added or replaced since
    are dropped or restored, and so are child modules. cache-dit 1.5.3's ``disable_cache`` leaves
    its patched ``forward`` on the transformer (``_is_patched``; DiT's also a ``_norm1_emb``
    child), which later configurations, uncached ones included, would otherwise run."""
    before = {module: (dict(vars(module)), dict(module._modules)) for module in model.modules()}

    def restore() -> None:
        for module, (attributes, children) in before.items():
            now = vars(module)
            for name in set(now) - set(attributes):
                del now[name]
            now.update(attributes)
            module._modules.clear()
            module._modules.update(children)

    return restore


def cache_dit_methods(setup: Setup) -> list[Method]:
    """cache-dit's DBCache: a residual-diff threshold (searched), and its 'medium' static step mask."""
    import cache_dit

    fn = 8 if len(blocks_of(setup.transformer)) > 16 else 1  # its default F8, where the model has the blocks

    def method(name: str, make_config: Callable[[Setup, float | None], Any], threshold: float | None = None) -> Method:
        def attach(setup: Setup, value: float | None) -> Detach:
            config = make_config(setup, value)
            restore = restorer(setup.transformer)
            cache_dit.enable_cache(setup.pipe, cache_config=config)
            attach.config = repr(config)  # type: ignore[attr-defined]

            def detach() -> None:
                try:
                    cache_dit.disable_cache(setup.pipe)
                finally:
                    restore()

            return detach

        return Method(name, "cache-dit", attach, {"version": cache_dit.__version__}, threshold)

    def dynamic(setup: Setup, threshold: float | None) -> Any:
        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=0, residual_diff_threshold=threshold, num_inference_steps=setup.steps
        )

    def static(setup: Setup, _: float | None) -> Any:
        mask = cache_dit.steps_mask(mask_policy="medium", total_steps=setup.steps)
        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=setup.steps,
            steps_computation_mask=mask, steps_computation_policy="static",
        )

    return [
        method(f"cache-dit DBCache F{fn}B0", dynamic, threshold=0.08),
        method("cache-dit DBCache F1B0 static mask", static),
    ]


# ---- compile settings --------------------------------------------------------------------------
def compile_model(transformer: nn.Module, mode: str, backend: str) -> None:
    """``regional``: every block compiled (one graph per block class); ``whole``: the transformer."""
    if mode == "regional":
        transformer.compile_repeated_blocks(backend=backend)
    elif mode == "whole":
        transformer.compile(backend=backend)


def uncompile(transformer: nn.Module) -> None:
    """Drop compiled wrappers and dynamo's caches, so the next configuration compiles afresh, and
    free what a detached cache left behind, so it does not count in the next one's peak memory."""
    for module in transformer.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class Runner:
    setup: Setup
    args: argparse.Namespace
    recompiles: RecompileLog
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)  # eager uncached: flops, latents
    started: float = field(default_factory=time.perf_counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > 60 * self.args.max_minutes

    def measure(self, method: Method, mode: str, target_fraction: float | None = None) -> dict[str, Any]:
        """Attach, (search the threshold,) warm up / count, time, detach: one row."""
        row: dict[str, Any] = {"method": method.name, "implementation": method.implementation, "compile": mode, **method.settings}
        if self.over_budget():
            row["skipped"] = f"over the time budget (--max-minutes {self.args.max_minutes})"
            return self.add(row)
        transformer = self.setup.transformer
        detach: Detach = lambda: None
        try:
            threshold = method.threshold
            if mode == "eager" and threshold is not None and target_fraction is not None and self.args.probes > 0:
                threshold, counts, row["threshold_search"] = self.search(method, target_fraction)
                detach = method.attach(self.setup, threshold)
            else:
                uncompile(transformer)
                detach = method.attach(self.setup, threshold)
                compile_model(transformer, mode, self.args.backend)
                graphs, recompiles = graphs_compiled(), self.recompiles.count
                sync()
                start = time.perf_counter()
                counts = counted_generation(self.setup) if mode == "eager" else {"latents": generate(self.setup).float()}
                sync()
                row["warmup_s"] = time.perf_counter() - start
                row["graphs_compiled_in_warmup"] = graphs_compiled() - graphs
                row["recompiles_in_warmup"] = self.recompiles.count - recompiles
                row["recompile_reasons"] = self.recompiles.reasons[recompiles:recompiles + 3]
            if threshold is not None:
                row["threshold"] = threshold
            if hasattr(method.attach, "config"):
                row["config"] = method.attach.config
            graphs, recompiles = graphs_compiled(), self.recompiles.count
            times, peak = timed(self.setup, self.args.repeats)
            row.update(
                ms=1000 * statistics.median(times), runs_ms=[1000 * t for t in times], peak_mib=peak,
                graphs_compiled_while_timed=graphs_compiled() - graphs,
                recompiles_while_timed=self.recompiles.count - recompiles,
            )
            if "flops" in counts:
                row.update(flops=counts["flops"], block_fraction=counts["block_fraction"], finite=counts["finite"])
            if self.baseline:
                row["latents_rel_l1_vs_uncached"] = rel_l1(counts["latents"], self.baseline["latents"])
            elif method.implementation == "none" and mode == "eager":
                self.baseline = {"latents": counts["latents"], "flops": counts["flops"]}
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            row["skipped"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=6)
        finally:
            try:
                detach()
            except Exception as exc:  # noqa: BLE001
                row["detach_error"] = f"{type(exc).__name__}: {exc}"
            uncompile(transformer)
        if self.args.tiny and "skipped" not in row and self.baseline:
            row["uncached_after_detach_identical"] = bool(torch.equal(generate(self.setup).float(), self.baseline["latents"]))
        return self.add(row)

    def search(self, method: Method, target: float) -> tuple[float, dict[str, Any], list[dict[str, float]]]:
        """Find the threshold whose FLOP fraction is nearest ``target``: each probe is one counted
        generation; step by x4 from the default until the target is bracketed, then interpolate
        linearly in log(threshold); stop within 0.03 of the target."""
        assert method.threshold is not None
        probes: list[tuple[float, float, dict[str, Any]]] = []
        low: tuple[float, float] | None = None  # (threshold, fraction) computing more than the target
        high: tuple[float, float] | None = None  # ... computing less
        threshold = method.threshold
        for _ in range(self.args.probes):
            uncompile(self.setup.transformer)
            detach = method.attach(self.setup, threshold)
            try:
                counts = counted_generation(self.setup)
            finally:
                detach()
            fraction = counts["flops"] / self.baseline["flops"]
            probes.append((threshold, fraction, counts))
            print(f"  probe {method.name}: threshold {threshold:.4g} -> FLOP fraction {fraction:.3f}", flush=True)
            if abs(fraction - target) < 0.03:
                break
            if fraction > target:
                low = (threshold, fraction)
            else:
                high = (threshold, fraction)
            if low is not None and high is not None:
                (t0, f0), (t1, f1) = low, high
                share = min(0.9, max(0.1, (f0 - target) / (f0 - f1)))  # stay inside the bracket
                threshold = math.exp(math.log(t0) + share * (math.log(t1) - math.log(t0)))
            else:
                threshold = threshold * 4 if high is None else threshold / 4
        best = min(probes, key=lambda p: abs(p[1] - target))
        return best[0], best[2], [{"threshold": t, "flop_fraction": f} for t, f, _ in probes]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        shown = row.get("skipped") or f"{row['ms']:9.1f} ms"
        print(f"{row['compile']:8} {row['method']:38} {shown}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        """Written after every row, so a run cut short still leaves its results."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "peers.json").write_text(json.dumps(self.result(), indent=1) + "\n")

    def result(self) -> dict[str, Any]:
        rows = [dict(r) for r in self.rows]
        base_flops = self.baseline.get("flops")
        flops_of = {r["method"]: r["flops"] for r in rows if "flops" in r}
        for row in rows:
            base = next((r for r in rows if r["compile"] == row["compile"] and r["implementation"] == "none" and "ms" in r), None)
            flops = flops_of.get(row["method"])  # compiled rows take the eager row's count
            if base_flops and flops:
                row["flop_fraction"] = flops / base_flops
                row["ideal_speedup"] = base_flops / flops
            if base and "ms" in row:
                row["speedup"] = base["ms"] / row["ms"]
                if "ideal_speedup" in row:
                    row["efficiency"] = row["speedup"] / row["ideal_speedup"]
        return {
            "benchmark": "gpu_peers Flux-dev-sized FluxTransformer2DModel" + (" (tiny)" if self.args.tiny else ""),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "settings": {
                "model": FLUX_TINY if self.args.tiny else FLUX_DEV, "steps": self.setup.steps, "dtype": self.args.dtype,
                "image": f"{self.setup.size}x{self.setup.size}", "text_tokens": self.setup.prompt_embeds.shape[1],
                "batch": 1, "guidance_scale": 3.5, "repeats": self.args.repeats, "warmup": 1,
                "compile_backend": self.args.backend, "driven_by": "diffusers FluxPipeline (prompt_embeds in, latents out)",
                "vae": "excluded (output_type='latent')",
                "ideal_speedup": "FLOPs of an uncached generation / FLOPs this configuration ran (torch.utils.flop_counter, eager)",
            },
            **self.extra,
            "seconds": time.perf_counter() - self.started,
            "rows": rows,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, getattr(torch, args.dtype)
    # every configuration adds graphs; keep them compiled rather than falling back to eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    started = time.perf_counter()
    setup = build(args.tiny, device, dtype)
    runner = Runner(setup, args, RecompileLog.install(), args.out, started=started)
    runner.extra["build_s"] = time.perf_counter() - started
    print(f"model built in {runner.extra['build_s']:.1f} s: "
          f"{sum(p.numel() for p in setup.transformer.parameters()) / 1e9:.2f} B parameters", flush=True)
    eager_uncached = Method("uncached", "none", no_cache)
    uncached = runner.measure(eager_uncached, "eager")
    if "ms" not in uncached:
        raise RuntimeError(f"the uncached run failed: {uncached['skipped']}\n{uncached.get('traceback', '')}")
    print_estimate(args, uncached["ms"] / 1000)
    if not uncached["finite"]:
        print("warning: the uncached latents are not finite; thresholds of adaptive caches mean little", flush=True)

    # ours: calibrate on one generation, then a schedule at the compute fraction
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with smoothcache.calibration(setup.pipe, lookahead=args.lookahead) as rec:
        generate(setup)
    sync()
    profile = rec.profile
    schedule = profile.schedule(compute_fraction=args.compute_fraction)
    keys, costs = profile.keys(), profile.key_costs()
    runner.extra["calibration"] = {
        "seconds": time.perf_counter() - start, "uncached_seconds": uncached["ms"] / 1000, "lookahead": args.lookahead,
        "peak_mib": peak_mib(),
        "flops_share": {k: v / profile.total_flops for k, v in costs.items()},
        "schedule": schedule.to_dict(), "estimated_speedup": profile.estimated_speedup(schedule),
    }
    schedules = {
        f"SmoothCache {args.compute_fraction:g}": schedule,
        "FORA 2 (ours)": Schedule.fixed_interval(keys, setup.steps, 2),
    }
    ours = [smoothcache_method(name, s) for name, s in schedules.items()]
    for method, s in zip(ours, schedules.values(), strict=True):
        method.settings["estimated_speedup_from_profile"] = profile.estimated_speedup(s)
    if args.blocks:  # whole blocks with forecasting, on a schedule planned for it
        with smoothcache.calibration(setup.pipe, components=["block", "single_block"], lookahead=args.lookahead,
                                     forecast="linear") as block_rec:
            generate(setup)
        blocks = block_rec.profile.schedule(compute_fraction=args.compute_fraction, forecast="linear")
        method = smoothcache_method(f"SmoothCache blocks + forecast {args.compute_fraction:g}", blocks, "linear")
        method.settings["estimated_speedup_from_profile"] = block_rec.profile.estimated_speedup(blocks)
        runner.extra["block_schedule"] = blocks.to_dict()
        for mode in ["eager", *args.compile]:
            runner.measure(method, mode)
    ours_row = runner.measure(ours[0], "eager")
    runner.measure(ours[1], "eager")
    target = ours_row.get("flops", 0) / runner.baseline["flops"] if "flops" in ours_row else None
    runner.extra["target_flop_fraction"] = target
    # the comparisons that matter most first; the time budget then trims peers and FORA compiled
    for mode in args.compile:
        for method in (eager_uncached, ours[0]):
            runner.measure(method, mode)

    peers: list[Method] = []
    for name, factory in (("diffusers", diffusers_methods), ("cache-dit", lambda: cache_dit_methods(setup))):
        try:
            peers += factory()
        except Exception as exc:  # noqa: BLE001 - e.g. cache-dit not installed
            runner.add({"method": name, "implementation": name, "compile": "eager", "skipped": f"{type(exc).__name__}: {exc}"})
    for method in peers:
        if args.only and not any(o.lower() in method.name.lower() for o in args.only):
            continue
        runner.measure(method, "eager", target)

    for mode in args.compile:
        runner.measure(ours[1], mode)
    result = runner.result()
    runner.save()
    plot(result, args.out / "peers.png")
    return result


def print_estimate(args: argparse.Namespace, uncached_s: float) -> None:
    """Expected run time from the uncached generation just measured: cached generations taken as
    0.6 of it, a counted one (FLOP counter) as 1.2, and a compile allowance per compiled graph."""
    per_config = 1.2 + args.repeats  # one counted warm-up, then the timed runs
    eager = 1.5 + 2 * 0.6 * per_config  # calibration, ours
    eager += 8 * 0.6 * per_config + 3 * (args.probes - 1) * 0.7  # diffusers' six, cache-dit's two, searches
    compiled = len(args.compile) * (1 + 2 * 0.6) * (1 + args.repeats)
    compile_s = 0.0 if args.tiny else 15.0 * 21 * len(args.compile)  # ~21 block graphs (ours: one per decision pattern)
    total = uncached_s * (eager + compiled) + compile_s
    print(f"uncached generation {uncached_s:.2f} s; expected total about {total / 60:.1f} min, "
          f"{compile_s:.0f} s of it compiling (a guess); no configuration starts after {args.max_minutes} min",
          flush=True)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Speedup over uncached (same compile setting) per configuration, ideal from FLOPs as ticks."""
    from smoothcache.plots import pyplot

    plt = pyplot()
    rows = [r for r in result["rows"] if "speedup" in r and r["implementation"] != "none"]
    colours = {"smoothcache": "tab:blue", "diffusers": "tab:orange", "cache-dit": "tab:green"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(rows) + 2), 4.4))
    xs = range(len(rows))
    ax.bar(xs, [r["speedup"] for r in rows], color=[colours.get(r["implementation"], "grey") for r in rows])
    ideal = [(i, r["ideal_speedup"]) for i, r in enumerate(rows) if "ideal_speedup" in r]
    if ideal:
        ax.scatter(*zip(*ideal, strict=True), marker="_", s=500, color="black", zorder=3, label="ideal (FLOPs)")
    for i, r in enumerate(rows):
        if "flop_fraction" in r:
            ax.annotate(f"{r['flop_fraction']:.2f}", (i, r["speedup"]), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    labels = [f"{r['method']}\n[{r['compile']}]" for r in rows]
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("speedup vs uncached (same compile)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend([*handles, *ax.get_legend_handles_labels()[0]], [*colours, *ax.get_legend_handles_labels()[1]], fontsize=7)
    s = result["settings"]
    model = "tiny Flux" if "tiny" in result["benchmark"] else "Flux-dev-sized transformer"
    ax.set_title(f"{model}, {s['image']}, {s['steps']} steps, {s['dtype']}, {result['device']}\n"
                 "numbers: FLOP fraction run", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu-peers-flux"))
    parser.add_argument("--repeats", type=int, help="timed generations per configuration (default 2; 1 with --tiny)")
    parser.add_argument("--compile", nargs="*", default=["regional"], choices=["regional", "whole"],
                        help="compile settings for uncached and ours, after eager (default: regional)")
    parser.add_argument("--whole", action="store_true", help="add whole-transformer compile")
    parser.add_argument("--compute-fraction", type=float, default=0.5, help="SmoothCache schedule budget")
    parser.add_argument("--lookahead", type=int, default=2, help="calibration lookahead (3 needs ~40 GB more)")
    parser.add_argument("--probes", type=int, default=3, help="generations spent per threshold search")
    parser.add_argument("--blocks", action="store_true", help="also whole blocks with forecasting (Flux: block, single_block)")
    parser.add_argument("--only", nargs="*", help="run only the peers whose name contains one of these")
    parser.add_argument("--max-minutes", type=float, default=5.5,
                        help="start no configuration after this many minutes (the last one may take ~1.5 more)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--tiny", action="store_true", help="tiny Flux on the CPU: checks the code paths, measures nothing")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot of a peers.json")
    args = parser.parse_args()
    if args.plot_from:
        print(plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png")))
        return
    if args.whole and "whole" not in args.compile:
        args.compile.append("whole")
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 2
    if args.tiny:
        torch.set_num_threads(1)  # a shared CPU: spinning thread pools cost 20x here
        args.device, args.dtype = "cpu", "float32"
        args.backend = "eager" if args.backend == "inductor" else args.backend  # dynamo's paths, no C++ builds
    result = run(args)
    for row in result["rows"]:
        keys = ("compile", "method", "ms", "speedup", "ideal_speedup", "efficiency", "flop_fraction", "block_fraction",
                "peak_mib", "graphs_compiled_in_warmup", "recompiles_in_warmup", "recompiles_while_timed", "skipped")
        print(json.dumps({k: round(row[k], 3) if isinstance(row.get(k), float) else row[k] for k in keys if k in row}))


if __name__ == "__main__":
    main()
