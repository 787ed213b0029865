"""Save a diffusers DiTPipeline of DiT-XL/2-256 size with random weights, for ``smoothcache bench``
and ``calibrate`` on a machine without the model hub (latency does not depend on the weights).

    python benchmarks/make_dit_xl_pipeline.py /tmp/ditxl [--schedules-dir /tmp/schedules]

The VAE is one level (no upsampling), so that its decode is a small share of a call; the
transformer is ``gpu_bench.dit_xl``'s. ``--schedules-dir`` also writes ``gpu_bench``'s schedules
as JSON files, one per schedule (``block-alpha0.18.json``, ...).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import SCHEDULES, dit_xl

from smoothcache import Schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--schedules-dir", type=Path)
    args = parser.parse_args()
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(64,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    pipe = DiTPipeline(transformer=dit_xl("cpu", torch.float32), vae=vae, scheduler=DDIMScheduler(),
                       id2label={i: f"class {i}" for i in range(1000)})
    pipe.save_pretrained(args.out)
    print(f"saved {args.out}")
    if args.schedules_dir:
        args.schedules_dir.mkdir(parents=True, exist_ok=True)
        for name, plans in SCHEDULES.items():
            path = args.schedules_dir / (re.sub(r"[^a-z0-9.]+", "-", name.replace("=", "")) + ".json")
            Schedule(plans).save(path)
            print(f"saved {path}")


if __name__ == "__main__":
    main()
