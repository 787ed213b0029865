"""SmoothCache under diffusers' context parallelism (CP): speed, and the same output as one GPU.

A random-weight Wan 2.1 T2V transformer (1.3B by default, 14B with ``--size 14b``) at 480x832,
81 frames (21x60x104 latents, 32,760 tokens) runs WanPipeline's denoising loop: UniPC with flow
shift 3, classifier-free guidance as two sequential calls per step, bf16, no text encoder and no
VAE (random prompt embeddings). Configurations:

    1 GPU uncached, 1 GPU cached, and per CP mode (ulysses, ring) 2 GPUs uncached and cached

with a FORA-style schedule (``Schedule.fixed_interval`` on ``attn1`` and ``ffn``). Checks, written
to the JSON next to the timings:
  * CP cached output == 1-GPU cached output, within the bf16 noise that CP itself adds (the
    uncached CP-vs-1-GPU difference) or ``--tolerance``;
  * every rank ran the cached layers at exactly the scheduled steps (traced by hooks on a child
    each cached layer runs only when it computes), so all ranks took the same decisions;
  * every rank ended with the same latents.

One command runs everything: under torchrun, rank 0 runs the 1-GPU configurations while the other
ranks wait, then all ranks run CP. With one process only the 1-GPU configurations run.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/context_parallel.py --out OUT
    python benchmarks/context_parallel.py --out OUT                    # 1 GPU only
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/context_parallel.py --tiny --out OUT

``--tiny`` is a 2-block model on a few tokens: on CPU (gloo) it checks the script and the CP
agreement in seconds and measures nothing. On CPU only Ulysses runs: diffusers 0.42.1 has no CPU
attention backend that returns the log-sum-exp ring attention needs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

import smoothcache
from smoothcache import Schedule

# Wan 2.1 T2V transformer configs (the checkpoints' transformer/config.json).
WAN_CONFIGS = {
    "1.3b": {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30},
    "14b": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40},
    "tiny": {"num_attention_heads": 2, "attention_head_dim": 8, "ffn_dim": 32, "num_layers": 2},
}
COMMON = {"patch_size": (1, 2, 2), "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
          "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
TINY = {"in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 16, "rope_max_seq_len": 32}
TEXT_TOKENS = 512  # Wan pads prompts to 512 UMT5 tokens
CACHED_KEYS = ("attn1", "ffn")
ASSUMED_TFLOPS = 350.0  # effective bf16 throughput for the up-front time estimate only


def log(*parts: Any) -> None:
    if rank() == 0:
        print(*parts, flush=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---- model and inputs ----------------------------------------------------------------------------
def wan_config(size: str) -> dict:
    return COMMON | WAN_CONFIGS[size] | (TINY if size == "tiny" else {})


def wan_transformer(size: str, device: torch.device, dtype: torch.dtype, backend: str):
    """Random weights, identical on every rank (rank 0's are broadcast); fp32 where from_pretrained keeps it."""
    from diffusers import WanTransformer3DModel

    config = wan_config(size)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval()
    model.to(dtype)
    for name, param in model.named_parameters():
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules):
            param.data = param.data.float()
    if dist.is_initialized():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, 0)
    model.set_attention_backend(backend)
    return model


def make_inputs(latent_shape: tuple[int, ...], text_dim: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Initial noise and prompt embeddings from a CPU generator: the same on every rank."""
    generator = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(latent_shape, generator=generator).to(device),  # float32, as WanPipeline
        "prompt": torch.randn(1, TEXT_TOKENS, text_dim, generator=generator).to(device, dtype),
        "negative": torch.randn(1, TEXT_TOKENS, text_dim, generator=generator).to(device, dtype),
    }


def make_pipe(model) -> SimpleNamespace:
    """What smoothcache needs of a pipeline: the transformer and the scheduler the loop steps."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SimpleNamespace(transformer=model, scheduler=scheduler)


@torch.no_grad()
def denoise(pipe: SimpleNamespace, inputs: dict, steps: int, guidance: float) -> torch.Tensor:
    """WanPipeline's loop: conditional, then unconditional call per step, UniPC step on fp32 latents."""
    model, scheduler = pipe.transformer, pipe.scheduler
    latents = inputs["latents"].clone()
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        x = latents.to(inputs["prompt"].dtype)
        timestep = t.expand(x.shape[0])
        # return_dict=False as WanPipeline: the CP hook on the model's inputs also checks its output,
        # and refuses a Transformer2DModelOutput
        noise = model(x, timestep, inputs["prompt"], return_dict=False)[0]
        if guidance > 1:
            uncond = model(x, timestep, inputs["negative"], return_dict=False)[0]
            noise = uncond + guidance * (noise - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


def forward_flops(config: dict, tokens: int) -> float:
    """Matmul FLOPs of one transformer call (patch embedding and norms left out)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    per_block = (
        2 * tokens * 4 * d * d + 4 * tokens * tokens * d  # self-attention: q, k, v, o and the attention
        + 2 * tokens * 2 * d * d + 2 * TEXT_TOKENS * 2 * d * d + 4 * tokens * TEXT_TOKENS * d  # cross-attention
        + 2 * tokens * 2 * d * config["ffn_dim"]  # feed-forward
    )
    return config["num_layers"] * per_block


# ---- decisions -----------------------------------------------------------------------------------
class DecisionTrace:
    """Per model call, how many blocks really computed ``attn1`` and ``ffn``.

    The hooks sit on a child each cached layer runs only when it computes (``attn1.to_q``,
    ``ffn.net.0``), so they see what ran, not what the runtime meant to run. Also records how many
    tokens ``attn1`` saw: the rank's shard under CP.
    """

    def __init__(self, model) -> None:
        self.calls: list[list[int]] = []
        self.tokens: int | None = None
        self._handles = [model.register_forward_pre_hook(lambda module, args: self.calls.append([0, 0]))]
        for block in model.blocks:
            self._handles.append(block.attn1.to_q.register_forward_pre_hook(self._count(0)))
            self._handles.append(block.ffn.net[0].register_forward_pre_hook(self._count(1)))

    def _count(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            self.calls[-1][index] += 1
            if index == 0:
                self.tokens = args[0].shape[1]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.calls).encode()).hexdigest()[:16]


def expected_calls(schedule: Schedule | None, steps: int, calls_per_step: int, blocks: int) -> list[list[int]]:
    """The trace a schedule asks for: every block computes a key at its steps with a 1."""
    plans = [schedule.plans[key] if schedule else (1,) * steps for key in CACHED_KEYS]
    return [[blocks * plan[step] for plan in plans] for step in range(steps) for _ in range(calls_per_step)]


# ---- one configuration ---------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(model, inputs: dict, args: argparse.Namespace, schedule: Schedule | None, group_size: int) -> dict:
    """Time ``--repeats`` generations (the fastest is kept; in CP the slowest rank's time) and trace the last."""
    device = inputs["latents"].device
    times, trace = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.repeats):
        pipe = make_pipe(model)
        trace = DecisionTrace(model)
        handle = smoothcache.cache(pipe, schedule) if schedule is not None else None
        if group_size > 1:
            dist.barrier()
        sync(device)
        start = time.perf_counter()
        latents = denoise(pipe, inputs, args.steps, args.guidance)
        sync(device)
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
        if handle is not None:
            handle.disable()
        trace.remove()
        if group_size > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    assert trace is not None
    return {
        "seconds": min(times),
        "runs_s": times,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tokens_per_rank": trace.tokens,
        "trace": trace.calls,
        "decisions_sha": trace.digest(),
        "latents": latents,
    }


def warm_up(model, inputs: dict, args: argparse.Namespace) -> float:
    """Two uncached steps (kernels, allocator, NCCL communicators); returns seconds per model call."""
    device = inputs["latents"].device
    denoise(make_pipe(model), inputs, 2, args.guidance)
    sync(device)
    start = time.perf_counter()
    denoise(make_pipe(model), inputs, 2, args.guidance)
    sync(device)
    return (time.perf_counter() - start) / (2 * calls_per_step(args))


def calls_per_step(args: argparse.Namespace) -> int:
    return 2 if args.guidance > 1 else 1


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().sum() / b.abs().sum()).item()


def output_sha(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.float().cpu().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def cpu_device_count_for_diffusers(device: torch.device) -> Iterator[None]:
    """diffusers 0.42.1 ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``,
    a ZeroDivisionError on a machine without an accelerator; on CPU, pretend there is one."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def context_parallel(model, mode: str, device: torch.device):
    """A copy of ``model`` with diffusers' CP over all ranks (its ``_cp_plan``: split at ``blocks.0``, gather at ``proj_out``)."""
    from diffusers import ContextParallelConfig

    degree = {"ulysses_degree": world()} if mode == "ulysses" else {"ring_degree": world()}
    cp_model = copy.deepcopy(model)
    with cpu_device_count_for_diffusers(device):
        cp_model.enable_parallelism(config=ContextParallelConfig(**degree))
    return cp_model


def hooked_modules(model) -> dict[str, list[str]]:
    """The modules diffusers' CP hooks (its split/gather), by name: none of them is a cached layer."""
    return {name or "<model>": list(m._diffusers_hook.hooks) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")}


# ---- the run -------------------------------------------------------------------------------------
def main() -> int:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "experimental" notices, once per rank
    args = parse_args()
    device = setup_distributed(args)
    dtype = getattr(torch, args.dtype)
    config = wan_config(args.size)
    latent_shape = (1, config["in_channels"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
    schedule = Schedule.fixed_interval(CACHED_KEYS, args.steps, args.interval)
    compute_fraction = sum(schedule.plans[CACHED_KEYS[0]]) / args.steps
    modes = [m for m in args.modes.split(",") if m] if world() > 1 else []
    if args.backend == "native" and "ring" in modes:
        log("ring skipped: the native attention backend does not return the LSE ring attention needs "
            "(and on CPU diffusers 0.42.1 has no backend that does)")
        modes.remove("ring")
    flops = forward_flops(config, tokens)
    calls = args.steps * calls_per_step(args)
    work = 1 + compute_fraction + len(modes) * (1 + compute_fraction) / world()
    log(f"Wan {args.size}: {tokens} tokens ({'x'.join(map(str, latent_shape[2:]))} latents), {args.steps} steps x "
        f"{calls_per_step(args)} calls, {flops / 1e12:.0f} TFLOP per call; {world()} process(es) on {device.type}; "
        f"CP modes {modes or 'none'}; schedule fixed_interval {args.interval} on {CACHED_KEYS} "
        f"(computes {compute_fraction:.2f} of the steps)")
    log(f"expected: about {flops * calls * work * args.repeats / (ASSUMED_TFLOPS * 1e12):.0f} s of generation at an assumed "
        f"{ASSUMED_TFLOPS:.0f} TFLOP/s, plus model set-up and warm-up")

    model = wan_transformer(args.size, device, dtype, args.backend)
    inputs = make_inputs(latent_shape, config["text_dim"], device, dtype)
    single: dict[str, dict] = {}
    started = time.perf_counter()
    if rank() == 0:
        per_call = warm_up(model, inputs, args)
        log(f"1 GPU: {per_call:.3f} s per model call -> expected about "
            f"{per_call * calls * work * args.repeats:.0f} s of timed generation")
        for name, sched in (("uncached", None), ("cached", schedule)):
            single[name] = run_config(model, inputs, args, sched, group_size=1)
            log(f"1 GPU {name:8} {single[name]['seconds']:8.2f} s")
    if world() > 1:
        dist.barrier()

    parallel: dict[str, dict[str, dict]] = {}
    hooks: dict[str, list[str]] = {}
    for mode in modes:
        cp_model = context_parallel(model, mode, device)
        hooks = hooked_modules(cp_model)
        warm_up(cp_model, inputs, args)
        parallel[mode] = {}
        for name, sched in (("uncached", None), ("cached", schedule)):
            result = run_config(cp_model, inputs, args, sched, group_size=world())
            result["per_rank"] = gather_per_rank(result)
            parallel[mode][name] = result
            log(f"{world()} GPUs {mode:7} {name:8} {result['seconds']:8.2f} s")
        del cp_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - started
    if rank() != 0:
        return 0
    report = build_report(args, device, config, latent_shape, tokens, schedule, compute_fraction, single, parallel, hooks, elapsed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context_parallel.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "context_parallel.png")
    print(json.dumps({"rows": report["rows"], "checks": report["checks"]}, indent=1))
    failed = [mode for mode, check in report["checks"].items() if not check["pass"]]
    if failed:
        print(f"FAILED checks: {failed}", file=sys.stderr)
        return 1
    return 0


def gather_per_rank(result: dict) -> list[dict]:
    """Every rank's decisions trace digest, attn1 token count and output digest, on every rank."""
    mine = {"decisions_sha": result["decisions_sha"], "tokens": result["tokens_per_rank"],
            "trace": result["trace"], "output_sha": output_sha(result["latents"])}
    everyone: list[Any] = [None] * world()
    dist.all_gather_object(everyone, mine)
    return everyone


def build_report(args, device, config, latent_shape, tokens, schedule, compute_fraction, single, parallel, hooks, elapsed) -> dict:
    steps, cps, blocks = args.steps, calls_per_step(args), config["num_layers"]
    base = single["uncached"]["seconds"]
    rows = [{"config": f"1 GPU {name}", "gpus": 1, "seconds": r["seconds"], "speedup": base / r["seconds"],
             "peak_gib": r["peak_gib"], "tokens_per_rank": r["tokens_per_rank"]} for name, r in single.items()]
    checks: dict[str, dict] = {}
    want = {name: expected_calls(sched, steps, cps, blocks) for name, sched in (("uncached", None), ("cached", schedule))}
    for mode, results in parallel.items():
        for name, r in results.items():
            rows.append({"config": f"{world()} GPUs {mode} {name}", "gpus": world(), "seconds": r["seconds"],
                         "speedup": base / r["seconds"], "peak_gib": r["peak_gib"], "tokens_per_rank": r["tokens_per_rank"]})
        cached, uncached = results["cached"], results["uncached"]
        cached_diff = rel_l1(cached["latents"], single["cached"]["latents"])
        uncached_diff = rel_l1(uncached["latents"], single["uncached"]["latents"])
        cache_effect = rel_l1(single["cached"]["latents"], single["uncached"]["latents"])
        to_single_uncached = rel_l1(cached["latents"], single["uncached"]["latents"])
        allowed = max(args.tolerance, 3 * uncached_diff)
        decisions = {
            "every_rank_ran_the_schedule": all(p["trace"] == want["cached"] for p in cached["per_rank"]),
            "same_digest_on_every_rank": len({p["decisions_sha"] for p in cached["per_rank"]}) == 1,
            "same_as_1_gpu": all(p["trace"] == single["cached"]["trace"] for p in cached["per_rank"]),
            "uncached_computes_everything": all(p["trace"] == want["uncached"] for p in uncached["per_rank"]),
        }
        sharded = all(p["tokens"] * world() == tokens for p in cached["per_rank"])
        same_output = len({p["output_sha"] for p in cached["per_rank"]}) == 1
        cp_speedup = single["uncached"]["seconds"] / uncached["seconds"]
        cache_speedup = single["uncached"]["seconds"] / single["cached"]["seconds"]
        checks[mode] = {
            "output_rel_l1_cp_cached_vs_1gpu_cached": cached_diff,
            "output_rel_l1_cp_uncached_vs_1gpu_uncached": uncached_diff,
            "output_rel_l1_1gpu_cached_vs_uncached": cache_effect,
            "allowed_rel_l1": allowed,
            # when caching moves the output less than CP's own noise, the output check proves little
            "output_check_discriminates": cache_effect > 3 * allowed,
            "closer_to_1gpu_cached_than_to_1gpu_uncached": cached_diff < to_single_uncached,
            "decisions": decisions,
            "decisions_sha_per_rank": [p["decisions_sha"] for p in cached["per_rank"]],
            "sequence_sharded": sharded,
            "same_latents_on_every_rank": same_output,
            "speedup_cp_cached": base / cached["seconds"],
            "speedup_product_cp_times_cache": cp_speedup * cache_speedup,
            "speedup_cp_uncached": cp_speedup,
            "pass": cached_diff <= allowed and all(decisions.values()) and sharded and same_output,
        }
    from diffusers import __version__ as diffusers_version

    return {
        "benchmark": "context_parallel: SmoothCache under diffusers context parallelism",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "model": {"class": "WanTransformer3DModel", "size": args.size, "weights": "random", **WAN_CONFIGS[args.size]},
        "settings": {
            "frames": args.frames, "height": args.height, "width": args.width, "latents": list(latent_shape),
            "tokens": tokens, "steps": steps, "calls_per_step": cps, "guidance": args.guidance,
            "scheduler": "UniPCMultistepScheduler flow_shift=3", "dtype": args.dtype, "attention_backend": args.backend,
            "repeats": args.repeats, "schedule": f"fixed_interval({list(CACHED_KEYS)}, {steps}, {args.interval})",
            "compute_fraction": compute_fraction, "tflop_per_call": forward_flops(config, tokens) / 1e12,
        },
        "notes": "seconds: one generation (fastest of repeats; under CP the slowest rank), VAE and text encoder "
                 "excluded. peak_gib under CP includes a second copy of the weights: each rank keeps the 1-GPU "
                 "model its CP copy is made from.",
        "cp_hooked_modules": hooks,
        "cached_layers": [f"blocks.*.{key}" for key in CACHED_KEYS],
        "rows": rows,
        "checks": checks,
        "wall_seconds_after_setup": elapsed,
    }


def plot(report: dict, path: Path) -> Path:
    """Seconds per configuration, speedup over 1-GPU uncached on each bar."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.8))
    colors = ["#9e9e9e" if "uncached" in r["config"] else "#1f77b4" for r in rows]
    bars = ax.bar(range(len(rows)), [r["seconds"] for r in rows], color=colors)
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["config"].replace("GPU ", "GPU\n").replace("GPUs ", "GPUs\n") for r in rows], fontsize=8)
    ax.set_ylabel("seconds per generation")
    s = report["settings"]
    ax.set_title(f"Wan {report['model']['size']} (random), {s['tokens']} tokens, {s['steps']} steps x {s['calls_per_step']} "
                 f"calls, {s['dtype']}, {report['device']}\n{s['schedule']}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def setup_distributed(args: argparse.Namespace) -> torch.device:
    """torchrun sets WORLD_SIZE: then NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # rank 0 runs the 1-GPU configurations alone while the others wait at a barrier
        timeout = datetime.timedelta(seconds=args.timeout)
        if use_cuda:
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return device


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for context_parallel.json/.png (rank 0)")
    parser.add_argument("--size", default="1.3b", choices=["1.3b", "14b"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0, help="> 1: two sequential calls per step (Wan's CFG)")
    parser.add_argument("--interval", type=int, default=2, help="fixed-interval schedule: compute every N-th step")
    parser.add_argument("--modes", default="ulysses,ring", help="CP modes to run, comma-separated")
    parser.add_argument("--backend", help="diffusers attention backend for every configuration; ring needs one that "
                        "returns the LSE (default: _native_flash on CUDA, native on CPU)")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="allowed rel-L1 of CP cached vs 1-GPU cached, or 3x that of CP uncached vs 1 GPU if larger")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a collective may wait (rank 0 runs 1 GPU alone)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="2 blocks, 48 tokens, 4 steps: a smoke test")
    args = parser.parse_args()
    cuda = args.device == "cuda" and torch.cuda.is_available()
    args.backend = args.backend or ("_native_flash" if cuda else "native")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.tiny:
        args.size, args.frames, args.height, args.width, args.steps = "tiny", 9, 64, 64, 4
    return args


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
