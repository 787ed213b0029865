"""Calibration says how much history it will keep before keeping it: after a generation's first
step it predicts the peak (logged once), and where the device cannot hold it, it refuses at once
with the layer_groups or lookahead that fits, leaving the model as it was."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import CalibrationMemoryError
from smoothcache import recorder as recorder_module
from smoothcache.ownership import holder

COMPONENTS = ["attn1", "ff"]


def one_step_bytes(pipe, run=generate) -> list[int]:
    """Each calibrated layer's output bytes in one model call of ``run(pipe, steps=2)``, counted by
    plain forward hooks."""
    layers = smoothcache.find_layers(pipe.transformer, COMPONENTS)
    sizes = [0] * len(layers)

    def count(index: int, output: torch.Tensor) -> None:
        sizes[index] = output.numel() * output.element_size()

    handles = [layer.module.register_forward_hook(lambda m, a, out, i=i: count(i, out)) for i, layer in enumerate(layers)]
    try:
        run(pipe, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


@pytest.mark.parametrize(
    ("lookahead", "groups", "forecast", "steps", "ring"),
    [
        (1, 1, "none", STEPS, 1),
        (3, 1, "none", STEPS, 3),
        (3, 2, "none", STEPS, 3),
        (2, 3, "none", STEPS, 2),  # 4 blocks in groups of 2, 1 and 1: the generations' peaks differ
        (3, 1, "linear", STEPS, 7),  # lookahead + gaps = 2 * 3 + 1
        (3, 1, "linear", 5, 5),  # no more steps than the generation has
    ],
)
def test_the_prediction_is_the_peak_the_rings_reach(lookahead, groups, forecast, steps, ring):
    pipe = make_dit_pipeline(num_layers=4)
    sizes = one_step_bytes(pipe)
    with smoothcache.calibration(pipe, components=COMPONENTS, lookahead=lookahead, layer_groups=groups,
                                 forecast=forecast) as rec:
        for seed in range(groups):
            generate(pipe, seed=seed, steps=steps)
    layers = smoothcache.find_layers(pipe.transformer, COMPONENTS)
    expected = ring * recorder_module.largest_group_bytes(sizes, recorder_module.group_of(layers, groups))
    assert rec.history_predicted_bytes == rec.history_peak_bytes == expected
    assert rec.profile.metadata["history_peak_mib"] == round(expected / 2**20, 3)


def test_the_prediction_is_logged_once_per_calibration(caplog):
    pipe = make_dit_pipeline(num_layers=4)
    step = sum(one_step_bytes(pipe))
    with caplog.at_level(logging.INFO, logger="smoothcache.recorder"), \
            smoothcache.calibration(pipe, components=COMPONENTS, lookahead=3) as rec:
        for seed in range(3):
            generate(pipe, seed=seed)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibration keeps about")]
    assert said == [(f"Calibration keeps about {3 * step / 1024:.2f} KiB of layer outputs (3 steps' outputs of 8 layers; "
                     f"lookahead 3); layer_groups=2 about {1.5 * step / 1024:.2f} KiB and layer_groups=4 about "
                     f"{0.75 * step / 1024:.2f} KiB, over that many generations")]
    assert rec.profile.num_runs == 3


def fake_device(monkeypatch, capacity: int, recorders: list) -> None:
    """A device of ``capacity`` bytes that the history alone fills: it can still give what the
    rings do not hold now (a generation's rings are dropped when the next one starts)."""
    monkeypatch.setattr(recorder_module, "_available_bytes",
                        lambda device: capacity - sum(r._history_bytes for r in recorders))


def test_a_history_too_big_for_the_device_is_refused_after_the_first_step(monkeypatch):
    pipe = make_dit_pipeline(num_layers=4)
    reference = generate(pipe)
    step = sum(one_step_bytes(pipe))  # lookahead 3 keeps 3 steps: 3 * step, half that with layer_groups=2
    recorders: list = []
    fake_device(monkeypatch, 2 * step, recorders)
    model = pipe.transformer
    finished_calls = []
    counter = model.register_forward_hook(lambda *a: finished_calls.append(1))
    recorders.append(smoothcache.calibration(pipe, components=COMPONENTS, lookahead=3))
    with pytest.raises(CalibrationMemoryError) as raised:  # no with block: the recorder itself lets go
        generate(pipe)
    counter.remove()
    message = str(raised.value)
    assert len(finished_calls) == 1  # refused at the second step's call, before the rings grew
    assert f"about {3 * step / 1024:.2f} KiB of layer outputs" in message
    assert f"about {2 * step / 1024:.2f} KiB for them ({step / 1024:.2f} KiB held now" in message
    assert "layer_groups=2 (each generation then measures the layers of one block in 2: run 2 generations, or a multiple of 2" in message
    assert "or lookahead=2" in message
    assert isinstance(raised.value, MemoryError)
    # the model is left clean: no hooks, no holder, and it generates as if never calibrated
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert holder(model) is None
    assert torch.equal(generate(pipe), reference)

    # what the message names fits on the same device
    for fix in ({"layer_groups": 2}, {"lookahead": 2}):
        recorders.clear()
        with smoothcache.calibration(pipe, components=COMPONENTS, **{"lookahead": 3, **fix}) as fitting:
            recorders.append(fitting)
            for seed in range(fix.get("layer_groups", 1)):
                generate(pipe, seed=seed)
        assert fitting.history_peak_bytes <= 2 * step and fitting.profile.num_runs == fix.get("layer_groups", 1)


def test_a_calibration_that_fits_is_not_refused(monkeypatch):
    pipe = make_dit_pipeline(num_layers=4)
    step = sum(one_step_bytes(pipe))
    recorders: list = []
    fake_device(monkeypatch, 3 * step, recorders)  # exactly the peak of lookahead 3
    with smoothcache.calibration(pipe, components=COMPONENTS, lookahead=3) as rec:
        recorders.append(rec)
        generate(pipe)
    assert rec.history_peak_bytes == 3 * step and rec.profile.num_runs == 1


def test_with_no_layer_groups_that_fits_the_message_says_to_free_memory(monkeypatch):
    pipe = make_dit_pipeline(num_layers=4)
    recorders: list = []
    fake_device(monkeypatch, 1, recorders)
    recorders.append(smoothcache.calibration(pipe, components=COMPONENTS, lookahead=2))
    with pytest.raises(CalibrationMemoryError, match="Even one block per generation would not fit: free memory"):
        generate(pipe)
    assert holder(pipe.transformer) is None


def test_off_cuda_there_is_nothing_to_ask():
    assert recorder_module._available_bytes(torch.device("cpu")) is None
    assert recorder_module._available_bytes(torch.device("meta")) is None


def test_a_call_slot_first_seen_after_the_first_step_joins_the_prediction():
    """SD3's skip-layer guidance adds a model call on a few middle steps only: its rings open after
    the first check, and the prediction grows to hold them when they do."""
    from models.test_sd3 import generate_slg, make_pipeline

    pipe = make_pipeline()
    with smoothcache.calibration(pipe, lookahead=3) as rec:
        generate_slg(pipe, seed=1)
    assert rec.history_predicted_bytes == rec.history_peak_bytes > 0


def test_groups_are_the_blocks_present_numbered_densely():
    """Blocks 1 and 3 alone make two groups, not four (a layer outside the blocks is a unit of its own)."""
    pipe = make_dit_pipeline(num_layers=4)
    odd = smoothcache.find_layers(pipe.transformer, ["transformer_blocks.[13].attn1"])
    assert [layer.block for layer in odd] == [1, 3]
    assert recorder_module.group_of(odd, 2) == [0, 1] and recorder_module.most_layer_groups(odd) == 2
    with smoothcache.calibration(pipe, components=["transformer_blocks.[13].attn1"], layer_groups=2) as rec:
        for seed in range(2):
            generate(pipe, seed=seed)
    assert rec.profile.num_runs == 2


def test_after_the_refusal_the_history_is_let_go_so_the_fix_fits_at_once(monkeypatch):
    """The refused recorder may outlive the error (its ``with`` name, a notebook's traceback): it must
    not keep the first step's outputs, or the suggested fix finds less room than the message said."""
    pipe = make_dit_pipeline(num_layers=4)
    step = sum(one_step_bytes(pipe))
    recorders: list = []
    fake_device(monkeypatch, 2 * step, recorders)
    with pytest.raises(CalibrationMemoryError, match="layer_groups=2"), \
            smoothcache.calibration(pipe, components=COMPONENTS, lookahead=3) as refused:
        recorders.append(refused)
        generate(pipe)
    assert refused._history_bytes == 0 and not refused._rings
    with smoothcache.calibration(pipe, components=COMPONENTS, lookahead=3, layer_groups=2) as fitting:
        recorders.append(fitting)
        for seed in range(2):
            generate(pipe, seed=seed)
    assert fitting.profile.num_runs == 2
