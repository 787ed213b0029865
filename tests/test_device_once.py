"""device_once (prefetch_timesteps(..., device_once=True)): within one pipe(...) call diffusers' execution-device
lookup, a walk over every module, runs once and its answer serves the rest; outside a call, and
after disable(), every lookup asks diffusers again; outputs and the pipeline's class are unchanged."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline
from diffusers import DiffusionPipeline, DiTPipeline

import smoothcache
from smoothcache import device_once
from smoothcache.device_once import DeviceOnce, base_class

LOOKUP = inspect.getattr_static(DiffusionPipeline, "_execution_device")


@pytest.fixture
def walks(monkeypatch) -> list[str]:
    """Each time diffusers' own lookup runs (DiTPipeline asks three times per call)."""
    seen: list[str] = []

    def counted(self):
        seen.append(type(self).__name__)
        return LOOKUP.fget(self)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counted))
    return seen


def test_one_lookup_per_call_and_the_same_images(walks) -> None:
    pipe = make_dit_pipeline()
    plain = generate(pipe)
    assert len(walks) == 3  # DiTPipeline: latents, class labels, null class
    with smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True):
        walks.clear()
        images = [generate(pipe) for _ in range(2)]
        assert len(walks) == 2  # once per call
        assert type(pipe).__name__ == "DiTPipeline" and isinstance(pipe, DiTPipeline)
        walks.clear()
        assert pipe._execution_device == torch.device("cpu") and pipe._execution_device == torch.device("cpu")
        assert len(walks) == 2  # outside a call every lookup asks diffusers
    assert all(torch.equal(image, plain) for image in images)
    assert type(pipe) is DiTPipeline and "_smoothcache_device_once" not in vars(pipe)
    walks.clear()
    generate(pipe)
    assert len(walks) == 3


def test_a_call_that_fails_leaves_no_answer_behind(walks) -> None:
    pipe = make_dit_pipeline()

    def fail(*_):
        raise RuntimeError("stop")

    with smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True):
        hook = pipe.transformer.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="stop"):
            generate(pipe)  # after all three lookups
        hook.remove()
        memo = vars(pipe)["_smoothcache_device_once"]
        assert memo.depth == 0 and memo.answer is device_once._UNSET
        walks.clear()
        generate(pipe)  # the next call asks afresh (the device may have changed between calls)
        assert len(walks) == 1


def test_the_signature_the_class_name_and_copies_stay_the_pipelines() -> None:
    pipe = make_dit_pipeline()
    signature = inspect.signature(pipe.__call__)
    with smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True):
        assert inspect.signature(pipe.__call__) == signature  # pipelines and users read it (callbacks, from_pipe)
        assert type(pipe).__qualname__ == "DiTPipeline" and type(pipe).__module__ == DiTPipeline.__module__
        assert base_class(type(pipe)) is DiTPipeline
        twin = copy.deepcopy(pipe)  # a copy is its own pipeline, of the pipeline's own class
        assert type(twin) is DiTPipeline and "_smoothcache_device_once" not in vars(twin)
        assert torch.equal(generate(twin), generate(pipe))
        again = pickle.loads(pickle.dumps(pipe))  # the subclass cannot be found by name: pickled as the base
        assert type(again) is DiTPipeline and torch.equal(generate(again), generate(pipe))
        memo = vars(pipe)["_smoothcache_device_once"]
        assert copy.copy(memo).depth == 0 and copy.deepcopy(memo).on
    assert type(pipe) is DiTPipeline


def test_off_by_default_and_on_objects_without_the_lookup(walks) -> None:
    pipe = make_dit_pipeline()
    with smoothcache.prefetch_timesteps(pipe, device="cpu"):
        assert type(pipe) is DiTPipeline
        walks.clear()
        generate(pipe)
        assert len(walks) == 3

    class NotAPipeline:
        pass

    other = NotAPipeline()
    memo = DeviceOnce(other)
    assert not memo.applied and type(other) is NotAPipeline
    memo.restore()


def test_applied_once_and_a_class_changed_since_is_left_alone(caplog) -> None:
    pipe = make_dit_pipeline()
    first = DeviceOnce(pipe)
    second = DeviceOnce(pipe)  # the memo is on already: not stacked
    assert first.applied and not second.applied and base_class(type(pipe)) is DiTPipeline

    class Users(DiTPipeline):
        pass

    pipe.__class__ = Users
    first.restore()
    assert type(pipe) is Users and "kept as it is" in caplog.text


def test_each_pipeline_has_its_own_subclass_and_a_patched_one_is_kept_with_the_memo_off(walks, caplog) -> None:
    """cache-dit wraps ``type(pipe).__call__``: on the memo's subclass that concerns one pipeline,
    and swapping the class back at disable() would drop the wrap, so the subclass stays (memo off)
    until a later prefetch turns it on again."""
    pipe, other = make_dit_pipeline(), make_dit_pipeline()
    prefetch, other_prefetch = (smoothcache.prefetch_timesteps(p, device="cpu", device_once=True) for p in (pipe, other))
    assert type(pipe) is not type(other) and type(pipe).__name__ == type(other).__name__ == "DiTPipeline"
    calls = []
    wrapped = type(pipe).__call__

    def counting_call(self, *args, **kwargs):  # as cache-dit's enable_cache patches the class
        calls.append(1)
        return wrapped(self, *args, **kwargs)

    type(pipe).__call__ = counting_call
    generate(other)
    assert calls == []  # the other pipeline is untouched
    prefetch.disable()
    other_prefetch.disable()
    assert type(other) is DiTPipeline and "kept as it is" in caplog.text
    assert base_class(type(pipe)) is DiTPipeline  # kept: the patch still runs
    walks.clear()
    generate(pipe)
    assert calls == [1] and len(walks) == 3  # memo off
    with smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True):
        walks.clear()
        generate(pipe)
        assert calls == [1, 1] and len(walks) == 1  # on again
    generate(pipe)  # and its restore keeps the patch again (the subclass is still not as made)
    assert calls == [1, 1, 1] and base_class(type(pipe)) is DiTPipeline


def cache_dit_on(pipe) -> None:
    import cache_dit

    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=STEPS))


@pytest.mark.parametrize("first", ["cache-dit", "prefetch"])
def test_with_cache_dit_either_way_round_undone_in_reverse_the_outputs_and_classes_are_cache_dits(first, caplog) -> None:
    """cache-dit wraps ``type(pipe).__call__`` (its context resets per call) and undoes it on the same
    class. Applied first, it wraps DiTPipeline: the memo then stays off (cache-dit's disable must find
    its wrapper on the pipeline's class). Applied second, it wraps the memo's subclass."""
    import cache_dit

    pipe, alone = make_dit_pipeline(), make_dit_pipeline()
    cache_dit_on(alone)
    expected = [generate(alone) for _ in range(2)]
    cache_dit.disable_cache(alone)
    original = DiTPipeline.__call__
    if first == "cache-dit":
        cache_dit_on(pipe)
        prefetch = smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True)
        assert not prefetch._device_memo.applied and "wrapped by cache-dit" in caplog.text
    else:
        prefetch = smoothcache.prefetch_timesteps(pipe, device="cpu", device_once=True)
        cache_dit_on(pipe)
        assert DiTPipeline.__call__ is original  # the wrap concerns this pipeline only
    assert all(torch.equal(generate(pipe), image) for image in expected)
    undo = [prefetch.disable, lambda: cache_dit.disable_cache(pipe)]  # in the reverse of applying them
    for step in undo if first == "cache-dit" else reversed(undo):
        step()
    assert type(pipe) is DiTPipeline and DiTPipeline.__call__ is original
    assert torch.equal(generate(pipe), generate(make_dit_pipeline()))
