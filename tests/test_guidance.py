"""Guidance-aware calibration and caching: the two halves of a CFG batch measured and cached apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline
from torch import nn

import smoothcache
from smoothcache.errors import GuidanceError, ScheduleError
from smoothcache.keys import Key, key_for

ONES = [1] * STEPS
REUSE = [1, 1, 0, 1, 0, 1, 0, 1, 0, 1]  # reuse at steps 2, 4, 6, 8
BRANCH_KEYS = ["attn1@cond", "attn1@uncond", "ff@cond", "ff@uncond"]


@pytest.fixture(scope="module")
def pipe():
    return make_dit_pipeline()


@pytest.fixture(scope="module")
def profiles(pipe):
    """The same calibration call recorded without and with branches."""
    recorded = []
    for branches in (None, "auto"):
        with smoothcache.calibration(pipe, branches=branches) as rec:
            generate(pipe, seed=3)
        recorded.append(rec.profile)
    return recorded


def test_keys_parse_and_print_one_grammar():
    for text, key in [("attn1", Key("attn1")), ("attn1-3", Key("attn1", 3)), ("attn1@uncond", Key("attn1", None, "uncond")),
                      ("ff@cond-12", Key("ff", 12, "cond")), ("single_attn-0", Key("single_attn", 0))]:
        assert Key.parse(text) == key and str(key) == text
    assert Key.parse("attn1@uncond-3").without_branch() == Key("attn1", 3)
    assert str(Key("attn1", 3, "cond")) == "attn1@cond-3"
    assert Key.parse("attn1@cond-3").typed == "attn1@cond"
    assert Key.parse("transformer_blocks.*.attn1").layer_type == "transformer_blocks.*.attn1"
    with pytest.raises(GuidanceError, match="names no guidance branch"):
        Key.parse("attn1@negative")


def test_a_per_block_key_governs_its_block_before_the_type_key():
    plans = {"attn1": [1], "attn1-3": [1], "ff@cond-2": [1]}
    assert key_for(plans, "attn1", 3) == "attn1-3"
    assert key_for(plans, "attn1", 4) == "attn1"
    assert key_for(plans, "ff@cond", 2) == "ff@cond-2"
    assert key_for(plans, "ff", 2) is None


def test_split_profile_keeps_the_whole_batch_curves(pipe, profiles):
    whole, split = profiles
    n = len(whole.layers)
    assert split.keys() == ["attn1", "ff"]  # the whole-batch keys by default: budgets count them alone
    assert split.keys(branches=True) == ["attn1@cond", "ff@cond", "attn1@uncond", "ff@uncond"]
    split.check_compatible(pipe, split.num_steps)  # branch entries name real modules
    assert split.metadata["branches"] == ["cond", "uncond"]  # DiTPipeline: labels first, then the null class
    np.testing.assert_allclose(split.errors[:, :n], whole.errors, rtol=1e-6, equal_nan=True)
    for key in ("attn1", "ff"):
        assert list(np.argsort(split.curves(key)[0, :-1])) == list(np.argsort(whole.curves(key)[0, :-1]))
    # Each half's error differs from the whole batch's, which lies between the two (a mediant of them).
    cond, uncond, both = split.errors[:, n : 2 * n], split.errors[:, 2 * n :], split.errors[:, :n]
    measured = np.isfinite(both)
    assert not np.allclose(cond[measured], uncond[measured])
    assert np.all(both[measured] >= np.minimum(cond, uncond)[measured] - 1e-6)
    assert np.all(both[measured] <= np.maximum(cond, uncond)[measured] + 1e-6)
    # Each branch entry costs half its layer.
    assert split.key_costs()["attn1@uncond"] == pytest.approx(split.key_costs()["attn1"] / 2)


def test_split_profile_saves_loads_and_solves(profiles, tmp_path):
    split = profiles[1]
    loaded = smoothcache.CalibrationProfile.load(split.save(tmp_path / "profile.json"))
    np.testing.assert_allclose(loaded.errors, split.errors, equal_nan=True)
    assert loaded.keys(per_block=True)[-1] == "ff-1"
    assert loaded.keys(per_block=True, branches=True)[-1] == "ff@uncond-1"
    schedule = loaded.schedule(compute_fraction=0.5, keys=BRANCH_KEYS, solver="optimal")
    assert schedule.keys == BRANCH_KEYS
    assert schedule.compute_fraction() <= 0.5
    assert loaded.schedule(alpha=0.3, keys=BRANCH_KEYS).keys == BRANCH_KEYS
    # Half-cost entries: skipping every branch at half the steps saves what the whole keys would.
    halves = smoothcache.Schedule({key: REUSE for key in BRANCH_KEYS})
    wholes = smoothcache.Schedule({key: REUSE for key in ("attn1", "ff")})
    assert loaded.estimated_speedup(halves) == pytest.approx(loaded.estimated_speedup(wholes))


def test_all_ones_branch_schedule_equals_uncached(pipe):
    reference = generate(pipe)
    with smoothcache.cache(pipe, {key: ONES for key in BRANCH_KEYS}):
        assert torch.equal(generate(pipe), reference)


class _Recorder:
    """Rows entering a Linear inside the layer, and the layer's outputs, per call."""

    def __init__(self, layer: nn.Module) -> None:
        self.rows: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = [
            layer.to_q.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0])),
            layer.register_forward_hook(lambda m, args, out: self.outputs.append(out.detach().clone())),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("reused", ["uncond", "cond"])
def test_one_half_reusing_runs_the_other_half_only(pipe, reused):
    reference = generate(pipe)
    computed = "cond" if reused == "uncond" else "uncond"
    layer = pipe.transformer.transformer_blocks[0].attn1
    recorder = _Recorder(layer)
    try:
        with smoothcache.cache(pipe, {f"attn1@{computed}": ONES, f"attn1@{reused}": REUSE, "ff": ONES}):
            images = generate(pipe)
    finally:
        recorder.remove()
    full, half = 4, 2  # two labels, guidance doubles them
    assert recorder.rows == [half if v == 0 else full for v in REUSE]
    assert not torch.allclose(images, reference)
    kept = slice(2, 4) if reused == "uncond" else slice(0, 2)  # DiTPipeline: cond rows first
    fresh = slice(0, 2) if reused == "uncond" else slice(2, 4)
    for step, value in enumerate(REUSE):
        if value == 0:  # the reused half is the previous step's, exactly; the computed half is new
            assert torch.equal(recorder.outputs[step][kept], recorder.outputs[step - 1][kept])
            assert not torch.equal(recorder.outputs[step][fresh], recorder.outputs[step - 1][fresh])


def test_both_halves_reusing_skips_the_layer(pipe):
    layer = pipe.transformer.transformer_blocks[1].ff
    calls = []
    handle = layer.net[0].proj.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with smoothcache.cache(pipe, {"attn1": ONES, "ff@cond": REUSE, "ff@uncond": REUSE}):
            generate(pipe)
    finally:
        handle.remove()
    assert calls == [4] * sum(REUSE)


def test_a_call_without_guidance_batching_is_refused(pipe):
    unguided = {"class_labels": [1, 2], "num_inference_steps": STEPS, "guidance_scale": 1.0, "output_type": "pt"}
    with smoothcache.cache(pipe, {"attn1": ONES, "attn1@uncond": REUSE}), pytest.raises(GuidanceError, match="not a classifier-free guidance batch"):
        pipe(**unguided)
    with pytest.raises(GuidanceError, match="guidance_scale <= 1"), smoothcache.calibration(pipe, branches="auto"):
        pipe(**unguided)
    assert torch.equal(generate(pipe), generate(make_dit_pipeline()))  # both detached cleanly


def test_schedules_that_leave_a_half_unplanned_are_refused(pipe):
    with pytest.raises(ScheduleError, match="no key plans its cond half; add 'attn1@cond' or 'attn1'"):
        smoothcache.cache(pipe, {"attn1@uncond": REUSE})
    with pytest.raises(ScheduleError, match=r"\['attn1@uncond-7'\] match no cached layer"):
        smoothcache.cache(pipe, {"attn1": ONES, "attn1@uncond-7": REUSE})


class _FoldingBlock(nn.Module):
    """A block that folds its tokens into the batch before its layer, as temporal blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _FoldingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_FoldingBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_a_layer_whose_rows_are_not_the_batch_is_refused():
    model, x = _FoldingModel(), torch.randn(1, 3, 4)
    batch = torch.cat([x, x])
    with pytest.raises(GuidanceError, match="Cannot tell the order"):
        smoothcache.cache(model, {"mlp": [1, 1], "mlp@uncond": [1, 0]}, components=["blocks.*.mlp"])
    handle = smoothcache.cache(
        model, {"mlp": [1, 1], "mlp@uncond": [1, 0]}, components=["blocks.*.mlp"], branches=("cond", "uncond")
    )
    with handle:
        model(batch)
        with pytest.raises(GuidanceError, match=r"blocks\.0\.mlp gets an input of shape \(6, 4\), not the 2 rows"):
            model(batch)
