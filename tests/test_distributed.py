"""Data-parallel calibration and generation with two gloo ranks on the CPU, and how a job ends when one rank fails.

The ranks are forked from the test process with torchrun's environment variables set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so they skip re-importing diffusers; one test runs
the real ``torchrun`` launcher.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import smoothcache
from smoothcache import CalibrationProfile, distributed
from smoothcache.cli import main
from smoothcache.demo.assets import load_demo_pipeline

COMMON = ["--model", "demo", "--steps", "4", "--quiet"]
RANKS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, folder: str, target, timeout_s: float) -> None:
    """One forked rank: torchrun's variables, output captured to files, the result as JSON."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(RANKS), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), distributed.TIMEOUT_ENV: str(timeout_s)})
    out = Path(folder)
    sys.stdout = open(out / f"stdout{rank}.txt", "w")  # noqa: SIM115 - the process ends right after
    sys.stderr = open(out / f"stderr{rank}.txt", "w")  # noqa: SIM115
    try:
        result = target(rank)
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which asserts on it
        result = {"raised": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    (out / f"result{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # skip the forked copy of pytest's exit handlers


def run_ranks(target, folder: Path, timeout_s: float = 20, join_s: float = 60, wait_for=range(RANKS)) -> list[dict]:
    """Run ``target(rank)`` on two forked ranks; each rank's result, stdout and stderr.

    Fails if a rank of ``wait_for`` is still running after ``join_s``; the others are killed then.
    """
    context = multiprocessing.get_context("fork")
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, port, str(folder), target, timeout_s)) for rank in range(RANKS)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + join_s
    for rank in wait_for:
        processes[rank].join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank in wait_for if processes[rank].is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    assert not hung, f"ranks {hung} still running after {join_s}s"
    results = []
    for rank in range(RANKS):
        result_file = folder / f"result{rank}.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {"exitcode": processes[rank].exitcode}
        result["stdout"] = (folder / f"stdout{rank}.txt").read_text()
        result["stderr"] = (folder / f"stderr{rank}.txt").read_text()
        results.append(result)
    return results


@pytest.fixture(scope="module", autouse=True)
def demo_loaded():
    """Import diffusers and the demo before forking, so every rank starts warm."""
    load_demo_pipeline(progress_bar=False)


# ---- sharding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_in_rank_order_are_the_items_in_order(count, size):
    items = list(range(count))
    shards = [distributed.World(rank, size).shard(items) for rank in range(size)]
    assert [item for shard in shards for item in shard] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_cuda_means_this_ranks_gpu_under_torchrun():
    assert distributed.World(1, 2, local_rank=1).device("cuda") == "cuda:1"
    assert distributed.World(1, 2, local_rank=1).device("cuda:3") == "cuda:3"
    assert distributed.World().device("cuda") == "cuda"


# ---- calibration and generation ---------------------------------------------------------------
def test_distributed_calibration_equals_single_process(tmp_path, capsys):
    args = ["calibrate", *COMMON, "--samples", "3", "--batch", "1"]  # 3 calls: 2 on rank 0, 1 on rank 1
    assert main([*args, "--out", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()

    results = run_ranks(lambda rank: {"rc": main([*args, "--out", str(tmp_path / "ranks.json")])}, tmp_path)
    assert [r.get("rc") for r in results] == [0, 0], results
    single, ranks = CalibrationProfile.load(tmp_path / "single.json"), CalibrationProfile.load(tmp_path / "ranks.json")
    assert ranks.num_runs == single.num_runs == 3
    np.testing.assert_allclose(ranks.errors, single.errors, rtol=1e-6, atol=1e-9, equal_nan=True)
    assert ranks.total_flops == single.total_flops and ranks.layers == single.layers
    assert ranks.metadata["calibration_set"] == single.metadata["calibration_set"]
    assert ranks.metadata["run_labels"] == single.metadata["run_labels"] == ["call 0", "call 1", "call 2"]
    assert ranks.metadata["world_size"] == 2 and "world_size" not in single.metadata
    assert ranks.schedule(compute_fraction=0.6).plans == single.schedule(compute_fraction=0.6).plans
    assert "Calibrated 8 layers" in results[0]["stdout"] and "on 2 ranks" in results[0]["stdout"]
    assert results[1]["stdout"] == ""  # rank 0 prints once


def test_distributed_generation_writes_every_image_once(tmp_path, capsys):
    args = ["generate", *COMMON, "--classes", "1,2,3,4,5", "--batch", "2"]  # 3 calls: 4 images on rank 0, 1 on rank 1
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()

    results = run_ranks(lambda rank: {"rc": main([*args, "--out", str(tmp_path / "ranks")])}, tmp_path)
    assert [r.get("rc") for r in results] == [0, 0], results
    record = json.loads((tmp_path / "ranks" / "generation.json").read_text())
    names = [Path(f).name for f in record["files"]]
    assert names == sorted(p.name for p in (tmp_path / "ranks").glob("*.png"))  # each file listed once, in order
    assert names == sorted(p.name for p in (tmp_path / "single").glob("*.png"))
    assert names[0] == "0000-class1-seed0.png" and names[-1] == "0004-class5-seed2.png"
    for name in names:  # the same images as one process draws
        assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert record["world_size"] == 2
    assert "Wrote 5 images" in results[0]["stdout"] and results[1]["stdout"] == ""


# ---- faults -----------------------------------------------------------------------------------
def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, monkeypatch):
    from smoothcache import cli_pipelines

    real = cli_pipelines.run_request

    def failing_on_rank_1(pipe, request, *args, **kwargs):
        if os.environ["RANK"] == "1":
            raise ValueError("prompt 3 is empty")
        return real(pipe, request, *args, **kwargs)

    monkeypatch.setattr(cli_pipelines, "run_request", failing_on_rank_1)
    args = ["calibrate", *COMMON, "--samples", "2", "--batch", "1", "--out", str(tmp_path / "p.json")]
    started = time.monotonic()
    results = run_ranks(lambda rank: {"rc": main(args)}, tmp_path, join_s=40)
    assert time.monotonic() - started < 40
    assert [r.get("rc") for r in results] == [1, 1], results  # a failure, not a usage error
    assert "error: [rank 0/2] 1 of 2 ranks failed, so every rank stopped. rank 1: ValueError: prompt 3 is empty" in results[0]["stderr"]
    assert "error: [rank 1/2] prompt 3 is empty" in results[1]["stderr"]
    assert not (tmp_path / "p.json").exists()


def test_a_rank_that_dies_ends_the_wait_of_the_others(tmp_path):
    def work(rank):
        world = distributed.init()

        def die_on_rank_1():
            if rank == 1:
                os._exit(3)  # killed: no error report reaches the collective
            return rank

        try:
            world.run(die_on_rank_1)
        except distributed.RankFailedError as exc:
            return {"error": str(exc), "failed_ranks": exc.failed_ranks}
        return {}

    started = time.monotonic()
    results = run_ranks(work, tmp_path, timeout_s=20, join_s=30)
    assert time.monotonic() - started < 20  # gloo sees the closed connection; no timeout needed
    assert "rank 0 of 2 lost contact with the other ranks" in results[0]["error"] and results[0]["failed_ranks"] == []
    assert results[1] == {"exitcode": 3, "stdout": "", "stderr": ""}


def test_a_rank_that_hangs_is_given_up_on_after_the_timeout(tmp_path):
    def work(rank):
        world = distributed.init()
        started = time.monotonic()
        try:
            world.run(lambda: time.sleep(30) if rank == 1 else rank)
        except distributed.RankFailedError as exc:
            return {"error": str(exc), "waited": time.monotonic() - started}
        return {}

    rank0 = run_ranks(work, tmp_path, timeout_s=2, join_s=20, wait_for=[0])[0]  # rank 1 is killed after
    assert "hung past the 2s timeout" in rank0["error"] and "Timed out" in rank0["error"]
    assert 1.5 < rank0["waited"] < 10


def test_under_torchrun_a_killed_rank_ends_the_job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os\n"
        "from smoothcache import distributed\n"
        "world = distributed.init()\n"
        "world.run(lambda: os._exit(3) if world.rank == 1 else world.rank)\n"
    )
    env = {**os.environ, distributed.TIMEOUT_ENV: "60", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )
    assert time.monotonic() - started < 45
    assert result.returncode != 0
    assert "exitcode  : 3" in result.stderr  # torchrun names the rank that died


def test_context_parallel_ranks_with_different_schedules_fail_at_once(tmp_path):
    from smoothcache import Schedule

    def work(rank):
        distributed.init()
        model = torch.nn.Module()
        model.blocks = torch.nn.ModuleList([torch.nn.Module()])
        model.blocks[0].attn1 = torch.nn.Linear(2, 2)
        model._parallel_config = object()  # what diffusers' enable_parallelism sets
        plan = (1, 0, 1) if rank == 0 else (1, 1, 1)
        try:
            smoothcache.cache(model, Schedule({"attn1": plan}), components=["attn1"])
        except smoothcache.ScheduleError as exc:
            return {"error": str(exc)}
        return {}

    results = run_ranks(work, tmp_path, timeout_s=20, join_s=30)
    for result in results:
        assert "ranks of the context-parallel Module hold different schedules" in result.get("error", result.get("raised", ""))
