"""One smoothcache user per model: a second handle or a calibration of a cached model is refused
with what to do, nested ``with`` blocks count, and a lost handle can still be ended."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import ModelInUseError, Schedule

SKIPPING = Schedule({"attn1": (1, 0) * (STEPS // 2), "ff": (1, 1, 0) * (STEPS // 3) + (1,) * (STEPS % 3)})
OTHER = Schedule({"attn1": (1,) * (STEPS - 1) + (0,)})


@pytest.fixture(scope="module")
def pipe():
    return make_dit_pipeline()


@pytest.fixture(scope="module")
def uncached(pipe):
    return generate(pipe)


def test_a_cell_run_twice_is_refused_and_the_lost_handle_can_be_ended(pipe, uncached):
    smoothcache.cache(pipe, SKIPPING)  # the handle is not kept, as in a notebook cell
    with pytest.raises(ModelInUseError, match=r"already cached by a smoothcache handle \(keys attn1, ff\).*smoothcache.disable\(pipe\)"):
        smoothcache.cache(pipe, SKIPPING)
    assert smoothcache.disable(pipe) is True
    assert torch.equal(generate(pipe), uncached)  # exactly uncached again
    assert smoothcache.disable(pipe) is False  # nothing holds it now


def test_two_schedules_cannot_apply_at_once(pipe):
    with smoothcache.cache(pipe, SKIPPING), pytest.raises(ModelInUseError, match="cannot also be cached"):
        smoothcache.cache(pipe, OTHER)
    with smoothcache.cache(pipe, OTHER):  # after the first ends, the second may start
        pass


def test_a_nested_with_on_the_same_handle_keeps_it_enabled_until_the_outer_block_ends(pipe, uncached):
    handle = smoothcache.cache(pipe, SKIPPING)
    with handle:
        with handle:
            pass
        assert handle.enabled
        cached = generate(pipe)
    assert not handle.enabled
    assert not torch.equal(cached, uncached) and torch.equal(generate(pipe), uncached)


def test_a_with_block_refused_at_its_start_does_not_count_as_entered(pipe, uncached):
    """A ``with`` refused on entry (another handle holds the model) never ran its exit, so a later
    ``with`` on the same handle must still be the outermost and disable it at its end."""
    waiting = smoothcache.cache(pipe, OTHER)
    waiting.disable()
    with smoothcache.cache(pipe, SKIPPING), pytest.raises(ModelInUseError), waiting:
        pass
    with waiting:
        assert waiting.enabled
    assert not waiting.enabled
    assert torch.equal(generate(pipe), uncached)


def test_calibrating_a_cached_model_is_refused_and_caching_a_calibrated_one_too(pipe):
    with (smoothcache.cache(pipe, SKIPPING),
          pytest.raises(ModelInUseError, match="cannot also be being calibrated.*Disable that handle first"),
          smoothcache.calibration(pipe)):
        pass
    with smoothcache.calibration(pipe) as recorder:
        with pytest.raises(ModelInUseError, match="already being calibrated.*End that calibration first"):
            smoothcache.cache(pipe, SKIPPING)
        generate(pipe)
    assert recorder.profile.num_steps == STEPS  # the refused cache() left the calibration intact


def test_disable_refuses_to_drop_a_forward_replaced_after_it_attached(pipe, uncached):
    handle = smoothcache.cache(pipe, SKIPPING)
    attn = pipe.transformer.transformer_blocks[0].attn1
    ours = attn.forward
    attn.forward = lambda *args, **kwargs: ours(*args, **kwargs)  # another wrapper, added later
    with pytest.raises(ModelInUseError, match=r"transformer_blocks\.0\.attn1.*was replaced after smoothcache attached"):
        handle.disable()
    assert handle.enabled  # nothing was undone
    attn.forward = ours  # the other wrapper removed, as the message says
    handle.disable()
    assert torch.equal(generate(pipe), uncached)


def test_a_second_thread_mid_generation_is_refused_and_nothing_comes_out_wrong(pipe):
    """Two threads sharing one cached pipeline: the second thread's call is refused, and since its
    pipeline call reset the scheduler both share, the first generation stops with an error too,
    instead of finishing on the wrong steps. Afterwards the handle serves one thread as before."""
    import threading

    with smoothcache.cache(pipe, SKIPPING):
        expected = generate(pipe)
    errors: dict[str, BaseException] = {}
    real_step = pipe.scheduler.step
    calls = []

    def step_then_intrude(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-generation: another thread calls the same pipeline
            def intruder():
                try:
                    generate(pipe)
                except BaseException as error:  # noqa: BLE001 (recorded for the assertion)
                    errors["second"] = error
            thread = threading.Thread(target=intruder)
            thread.start()
            thread.join()
        return real_step(*args, **kwargs)

    with smoothcache.cache(pipe, SKIPPING):
        pipe.scheduler.step = step_then_intrude
        try:
            with pytest.raises(ModelInUseError, match="reset the scheduler both share"):
                generate(pipe)
        finally:
            del pipe.scheduler.step
        assert isinstance(errors.get("second"), ModelInUseError)
        assert "called from another thread while a generation runs" in str(errors["second"])
        assert torch.equal(generate(pipe), expected)  # one thread again: exactly as before
