"""prefetch_timesteps: the loop's per-step host-to-device copy is answered from one copy made per
generation, and the pipeline's output does not change by a bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import Schedule
from smoothcache.bench import count_host_syncs
from smoothcache.prefetch import HostTimesteps


def received_timesteps(pipe) -> list[torch.Tensor]:
    """The timestep tensors the transformer is called with, in order."""
    seen: list[torch.Tensor] = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    return seen


def test_outputs_are_bit_identical_and_every_step_is_served(dit_pipe) -> None:
    plain = generate(dit_pipe)
    host_timesteps = received_timesteps(dit_pipe)
    generate(dit_pipe)
    with smoothcache.prefetch_timesteps(dit_pipe, device="cpu") as prefetch:
        prefetched = generate(dit_pipe)
        assert type(dit_pipe.scheduler.timesteps) is HostTimesteps
    assert torch.equal(prefetched, plain)
    assert prefetch.served == STEPS  # DiTPipeline's t[None].to(device), once a step
    # the model got the same values, each in a fresh plain tensor (it may write to it)
    served = host_timesteps[STEPS:]
    assert all(type(t) is torch.Tensor for t in served)
    assert [t.tolist() for t in served] == [t.tolist() for t in host_timesteps[:STEPS]]
    assert len({t.data_ptr() for t in served}) == STEPS


def test_disable_restores_the_scheduler(dit_pipe) -> None:
    scheduler = dit_pipe.scheduler
    prefetch = smoothcache.prefetch_timesteps(dit_pipe, device="cpu")
    generate(dit_pipe)
    prefetch.disable()
    assert "set_timesteps" not in vars(scheduler)
    assert type(scheduler.timesteps) is torch.Tensor
    scheduler.set_timesteps(STEPS)
    assert type(scheduler.timesteps) is torch.Tensor
    prefetch.disable()  # twice is harmless


def test_with_a_cache_on_top_outputs_match_the_cache_alone() -> None:
    pipe = make_dit_pipeline()
    schedule = Schedule.fixed_interval(["block"], STEPS, 2)
    with smoothcache.cache(pipe, schedule):
        cached = generate(pipe)
    with smoothcache.cache(pipe, schedule), smoothcache.prefetch_timesteps(pipe, device="cpu") as prefetch:
        both = generate(pipe)
    assert torch.equal(both, cached)
    assert prefetch.served == STEPS


def test_only_simple_indexes_keep_the_pairing() -> None:
    host = torch.arange(10, 0, -1)
    paired = HostTimesteps.pair(host, host * 1, None)
    assert type(paired[2]) is HostTimesteps and type(paired[None, 1:3]) is HostTimesteps
    assert type(paired[torch.tensor([0, 1])]) is torch.Tensor  # a tensor index: plain, as before
    assert type(paired - 1) is torch.Tensor and type(paired[0] * 2) is torch.Tensor  # nothing spreads
    assert [type(t) for t in paired][:2] == [HostTimesteps, HostTimesteps]
    assert paired[3].to(torch.float64).dtype == torch.float64  # a dtype change only: plain path


def test_the_device_default_leaves_a_cpu_pipeline_alone(dit_pipe) -> None:
    with smoothcache.prefetch_timesteps(dit_pipe) as prefetch:
        generate(dit_pipe)
        assert type(dit_pipe.scheduler.timesteps) is torch.Tensor
    assert prefetch.served == 0


def test_the_device_is_the_denoisers_own_where_its_weights_are_on_an_accelerator() -> None:
    """One parameter's device, not diffusers' lookup, which walks every module of every component at
    each generation; weights on the host (a CPU pipeline, offloading) ask diffusers."""
    from types import SimpleNamespace

    from smoothcache.prefetch import _execution_device

    class OnAnAccelerator(torch.nn.Module):
        def parameters(self, recurse: bool = True):
            yield SimpleNamespace(device=torch.device("cuda", 1))

    class AskingFails:
        transformer = OnAnAccelerator()

        @property
        def _execution_device(self):
            raise AssertionError("diffusers' lookup was asked")

    assert _execution_device(AskingFails()) == torch.device("cuda", 1)
    on_the_host = SimpleNamespace(unet=torch.nn.Linear(2, 2), _execution_device=torch.device("cuda", 0))
    assert _execution_device(on_the_host) == torch.device("cuda", 0)  # offloaded: diffusers knows
    placed = SimpleNamespace(hf_device_map={"transformer": 1}, transformer=OnAnAccelerator(),
                             _execution_device=torch.device("cuda", 0))
    assert _execution_device(placed) == torch.device("cuda", 0)  # over several devices: diffusers knows


def test_twice_on_one_scheduler_is_refused(dit_pipe) -> None:
    with smoothcache.prefetch_timesteps(dit_pipe, device="cpu"), pytest.raises(RuntimeError, match="already replaced"):
        smoothcache.prefetch_timesteps(dit_pipe, device="cpu")


def test_a_pipeline_without_a_scheduler_is_refused() -> None:
    with pytest.raises(TypeError, match="no scheduler with set_timesteps"):
        smoothcache.prefetch_timesteps(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits exist on CUDA only")
def test_on_cuda_the_per_step_waits_are_gone() -> None:
    pipe = make_dit_pipeline().to("cuda")

    def run() -> torch.Tensor:
        return generate(pipe)

    plain_output, plain_syncs = run(), count_host_syncs(run, torch.device("cuda"))
    with smoothcache.prefetch_timesteps(pipe) as prefetch:
        output, syncs = run(), count_host_syncs(run, torch.device("cuda"))
    assert torch.equal(output, plain_output)
    assert syncs <= plain_syncs - STEPS
    assert prefetch.served == 2 * STEPS


def test_bench_names_the_remedy_for_a_loop_that_waits_every_step() -> None:
    from smoothcache.bench import diagnose

    (waits,) = diagnose(1.8, 2.08, host_syncs=53, steps=50)
    assert "smoothcache.prefetch_timesteps(pipe)" in waits and "--prefetch-timesteps" in waits


def test_bench_prefetch_flag_runs_and_is_recorded(tmp_path, capsys, monkeypatch) -> None:
    from smoothcache import prefetch
    from smoothcache.cli import main

    applied = []  # the command line's own pipeline also gets the device memo

    def recorded(pipe, *args, **kwargs):
        made = real(pipe, *args, **kwargs)
        applied.append(made._device_memo is not None and made._device_memo.applied)
        return made

    real = prefetch.prefetch_timesteps
    monkeypatch.setattr(prefetch, "prefetch_timesteps", recorded)

    model, schedule, out = tmp_path / "model", tmp_path / "s.json", tmp_path / "bench.json"
    make_dit_pipeline().save_pretrained(model)
    Schedule.fixed_interval(["block"], STEPS, 2).save(schedule)
    argv = ["bench", "--model", str(model), "--schedule", str(schedule), "--classes", "1", "--repeats", "1",
            "--prefetch-timesteps", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    (record,) = json.loads(out.read_text())["cells"]
    assert record["prefetch_timesteps"] is True and record["speedup"] > 0
    assert "timesteps prefetched (0 device moves served)" in capsys.readouterr().out  # a CPU pipeline: nothing to move
    assert applied == [True]


def test_a_pipeline_with_device_timesteps_runs_unchanged() -> None:
    """FluxPipeline sets its timesteps through retrieve_timesteps, which reads set_timesteps'
    signature for "sigmas", and never moves one to the device in its loop: it runs as before."""
    from models import test_flux

    pipe = test_flux.make_pipeline()
    plain = test_flux.generate(pipe)
    with smoothcache.prefetch_timesteps(pipe, device="cpu") as prefetch:
        assert torch.equal(test_flux.generate(pipe), plain)
    assert prefetch.served == 0


def test_generate_takes_the_prefetch_flag_and_writes_the_same_images(tmp_path) -> None:
    from PIL import Image

    from smoothcache.cli import main

    model = tmp_path / "model"
    make_dit_pipeline().save_pretrained(model)
    common = ["generate", "--model", str(model), "--steps", "4", "--classes", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--prefetch-timesteps", "--out", str(tmp_path / "prefetched")]) == 0
    record = json.loads((tmp_path / "prefetched" / "generation.json").read_text())
    assert record["prefetch_timesteps"] is True
    (plain,), (prefetched,) = (sorted((tmp_path / d).glob("*.png")) for d in ("plain", "prefetched"))
    assert Image.open(plain).tobytes() == Image.open(prefetched).tobytes()


def test_a_copied_scheduler_sets_its_own_timesteps_and_copies_are_plain() -> None:
    """diffusers deep-copies schedulers: the copy sets (and pairs) its own timesteps, and the paired
    timesteps copy and pickle as the plain host tensors they are."""
    import copy
    import pickle

    pipe = make_dit_pipeline()
    with smoothcache.prefetch_timesteps(pipe, device="cpu"):
        generate(pipe)
        twin = copy.deepcopy(pipe.scheduler)
        twin.set_timesteps(4)
        assert len(twin.timesteps) == 4 and type(twin.timesteps) is HostTimesteps
        assert len(pipe.scheduler.timesteps) == STEPS  # the original's untouched
        timesteps = pipe.scheduler.timesteps
        assert type(copy.deepcopy(timesteps)) is torch.Tensor
        assert torch.equal(pickle.loads(pickle.dumps(timesteps)), timesteps.as_subclass(torch.Tensor))
