"""SmoothCache through diffusers' ``transformer.enable_cache(...)``, next to its own caches."""

import subprocess
import sys

import pytest
import torch
from models.conftest import STEPS
from models.test_flux import generate, make_pipeline

from smoothcache import Schedule, SmoothCacheConfig

PLAN = (1, 0, 1, 0, 1, 1)


def test_enable_cache_takes_a_smoothcache_config_and_disable_restores(tmp_path):
    pipe = make_pipeline()
    uncached = generate(pipe)
    path = Schedule({"attn": PLAN, "ff": PLAN}).save(tmp_path / "s.json")
    calls = []
    hook = pipe.transformer.transformer_blocks[0].ff.register_forward_hook(lambda *a: calls.append(1))

    config = SmoothCacheConfig(str(path))  # created first: it teaches enable_cache about itself
    pipe.transformer.enable_cache(config)
    assert pipe.transformer.is_cache_enabled
    with pytest.raises(ValueError, match="already been enabled with SmoothCacheConfig"):
        pipe.transformer.enable_cache(config)
    cached, again = generate(pipe), generate(pipe)
    pipe.transformer.disable_cache()
    hook.remove()

    assert torch.equal(cached, again) and not torch.equal(cached, uncached)
    assert not pipe.transformer.is_cache_enabled and "_cache_config" not in pipe.transformer.__dict__
    assert torch.equal(generate(pipe), uncached)
    assert STEPS == len(PLAN)


def test_importing_smoothcache_after_diffusers_installs_the_dispatch():
    code = (
        "import diffusers.models.cache_utils as cu; import smoothcache; "
        "print(cu.CacheMixin.enable_cache.__qualname__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "_install" in result.stdout


def test_diffusers_own_caches_still_work_after_ours_is_installed():
    from diffusers import FirstBlockCacheConfig

    SmoothCacheConfig({"attn": PLAN})  # installs the dispatch
    pipe = make_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    assert isinstance(pipe.transformer._cache_config, FirstBlockCacheConfig)
    generate(pipe)
    pipe.transformer.disable_cache()
    assert not pipe.transformer.is_cache_enabled
