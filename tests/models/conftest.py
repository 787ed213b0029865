"""Shared pieces of the model-family tests: the ``FamilyCase`` row, pipeline helpers, a tiny VAE, the
``pipe`` fixture of a family file's own tests, one thread, and the checks every family passes (run
over every row by ``test_families.py``).

Each family's test builds a random-weight transformer from a tiny config (``tiny_configs.py``) and
runs it through its real diffusers pipeline, with precomputed prompt embeddings instead of text
encoders (no network). The checks also take a bare model in place of the pipeline (with ``steps=``
to calibrate it), for models sampled outside diffusers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import smoothcache
from smoothcache import CacheableLayer, Schedule, find_layers
from smoothcache.keys import key_for

from .tiny_configs import TinyModel, kl_vae

STEPS = 6

Generate = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FamilyCase:
    """One model family as ``test_families.py`` checks it: a row of data next to the family's builders.

    ``make`` builds a fresh pipeline (or bare model) for each test, since the checks attach to it;
    ``generate(pipe, seed=0)`` samples it for ``STEPS`` steps.
    """

    name: str  # the test id
    make: Callable[[], Any]
    generate: Generate
    default_keys: Sequence[str]  # the block keys ``find_layers`` picks with no components, in order
    schedule_keys: Collection[str]  # the keys of the schedule calibrated on those defaults
    calls_per_step: int | None = None  # handed to calibration and cache (None: found from the scheduler)
    steps: int | None = None  # a bare model's steps to calibrate for (a pipeline's scheduler knows)
    all_ones_components: Sequence[str] | None = None  # the layers an all-ones schedule covers
    disable_components: Sequence[str] | None = None  # the layers calibrated for the schedule that is disabled
    opt_in_components: Sequence[str] | None = None  # the defaults plus layers cached only when asked for
    true_cfg: Generate | None = None  # a generation with true CFG: two sequential model calls per step
    marks: Sequence[pytest.MarkDecorator] = ()  # on each shared check of the family (a warning filter, ...)


def tiny_pipeline(pipeline_class, **components):
    """``pipeline_class`` built from ``components``, with no text encoders or tokenizers (the tests pass
    prompt embeddings) and no progress bars.

    The ``TinyModel`` components are built here, in the order given, from seed 0: the same weights at
    every build. A component built beforehand (``tiny_vae()``, ...) keeps the weights of its own seed.
    """
    torch.manual_seed(0)
    components = {name: c.build() if isinstance(c, TinyModel) else c for name, c in components.items()}
    parameters = inspect.signature(pipeline_class).parameters
    text_models = [name for name in parameters if name.startswith(("text_encoder", "tokenizer"))]
    pipe = pipeline_class(**dict.fromkeys(text_models), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_embeddings(*shape: int) -> torch.Tensor:
    """Fixed random tensors standing in for a text encoder's output (the tests load no encoders)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100))


def sample(pipe, seed: int, output_type: str = "pt", **inputs) -> torch.Tensor:
    """The first output (images, frames, audio) of a diffusers pipeline run for ``STEPS`` steps from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(**inputs, num_inference_steps=STEPS, generator=generator, output_type=output_type)[0]


@pytest.fixture
def pipe(request: pytest.FixtureRequest) -> Any:
    """A fresh build of the family file's ``CASE`` for each of the file's own tests (they attach to it)."""
    return request.module.CASE.make()


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small gain nothing from threads, and on a busy CPU they run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(latent_channels: int = 4, levels: int = 1, **config):
    """The image pipelines' ``kl_vae``, with ``config`` added (shift, scaling), built from seed 0 wherever it is built."""
    torch.manual_seed(0)
    return kl_vae(latent_channels, levels).with_config(**config).build()


class WeightUses(TorchFunctionMode):
    """Counts the torch calls that use each watched weight: real executions of the layers owning them.

    Unlike a forward hook, this also counts a cached layer that is itself a Linear (Flux's proj_mlp):
    hooks on it run whether it computed or handed back its kept output.
    """

    def __init__(self, layers: Sequence[CacheableLayer]) -> None:
        super().__init__()
        self.weights = {id(_first_weight(layer.module)): layer.name for layer in layers}
        self.counts = dict.fromkeys(self.weights.values(), 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for arg in args[:2]:
            name = self.weights.get(id(arg)) if isinstance(arg, nn.Parameter) else None
            if name is not None:
                self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _first_weight(module: nn.Module) -> nn.Parameter:
    """The weight of the first Linear or Conv2d in ``module``, used exactly when ``module`` computes."""
    return next(m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def calibrated_schedule(
    pipe,
    generate: Generate,
    components: Sequence[str] | None = None,
    calls_per_step: int | None = None,
    steps: int | None = None,
) -> Schedule:
    """Calibrate on one generation, then a schedule computing at most 60% of the layer calls."""
    with smoothcache.calibration(pipe, components=components, calls_per_step=calls_per_step, steps=steps) as rec:
        generate(pipe, seed=1)
    schedule = rec.profile.schedule(compute_fraction=0.6)
    assert any(0 in plan for plan in schedule.plans.values()), schedule.summary()
    return schedule


def assert_skips_exactly_the_scheduled_calls(
    pipe,
    generate: Generate,
    schedule: Schedule,
    calls_per_step: int | None = None,
    components: Sequence[str] | None = None,
    calls: int | None = None,
) -> list[CacheableLayer]:
    """A cached generation runs each layer on exactly its plan's compute steps, and changes the output.

    ``calls_per_step`` is handed to the cache (None: found from the scheduler); ``calls`` is how
    many model calls the pipeline really makes per step (default: ``calls_per_step`` or 1).
    Returns the layers the schedule governs.
    """
    calls = calls or calls_per_step or 1
    uncached = generate(pipe)
    handle = smoothcache.cache(pipe, schedule, components=components, calls_per_step=calls_per_step)
    with handle, WeightUses(handle.layers) as uses:
        cached = generate(pipe)
    cached_layers = []
    for layer in handle.layers:
        key = key_for(schedule.plans, layer.layer_type, layer.block)
        computed = sum(schedule.plans[key]) if key is not None else STEPS  # a layer no key governs always runs
        assert uses.counts[layer.name] == computed * calls, layer.name
        if key is not None:
            cached_layers.append(layer)
    assert not torch.equal(cached, uncached)
    return cached_layers


def assert_all_ones_is_bit_identical(
    pipe, generate: Generate, components: Sequence[str] | None = None, calls_per_step: int | None = None
) -> None:
    uncached = generate(pipe)
    keys = {layer.layer_type for layer in find_layers(model_of(pipe), components, allow_repeated=True)}
    schedule = Schedule({key: (1,) * STEPS for key in keys})
    with smoothcache.cache(pipe, schedule, calls_per_step=calls_per_step):
        assert torch.equal(generate(pipe), uncached)


def assert_disable_restores_the_model(
    pipe, generate: Generate, schedule: Schedule, calls_per_step: int | None = None
) -> None:
    before = generate(pipe)
    handle = smoothcache.cache(pipe, schedule, calls_per_step=calls_per_step)
    cached = generate(pipe)
    handle.disable()
    for module in model_of(pipe).modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not torch.equal(cached, before)
    assert torch.equal(generate(pipe), before)


def model_of(pipe) -> nn.Module:
    """The pipeline's transformer, or the model itself."""
    return pipe if isinstance(pipe, nn.Module) else pipe.transformer
