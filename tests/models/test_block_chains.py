"""A module list cached whole on one key is reused as one chain (one kept residual per stream):
for every family, outputs match the same plan reused block by block, with less memory held."""

import importlib

import pytest
import torch

import smoothcache
from smoothcache import Schedule
from smoothcache.keys import key_for

from .test_whole_blocks import FAMILIES, blocks_of_family


@pytest.mark.parametrize("name", FAMILIES)
def test_a_list_reused_as_one_matches_its_blocks_reused_one_by_one(name):
    pipe, generate, _, schedule, layers = blocks_of_family(name)
    one_by_one = Schedule({
        f"{layer.layer_type}-{layer.block}": schedule.plans[key_for(schedule.plans, layer.layer_type, layer.block)]
        for layer in layers
    })
    with smoothcache.cache(pipe, schedule) as handle:
        chained = generate(pipe)
        chained_bytes = sum(handle.state.kept_bytes().values())
        chains = sum(layer_plan.chain is not None for layer_plan in handle.plan.layers)
    with smoothcache.cache(pipe, one_by_one) as handle:
        per_block = generate(pipe)
        per_block_bytes = sum(handle.state.kept_bytes().values())
    assert chains > 0, name  # (a list of one block does not chain: HunyuanVideo's token refiner here)
    torch.testing.assert_close(chained, per_block, rtol=1e-4, atol=1e-4)
    # Latte interleaves its spatial and temporal lists: no block's input is its list predecessor's
    # output, so every block is a run of its own and holds what it held before
    assert 0 < chained_bytes < per_block_bytes or (name == "latte" and chained_bytes == per_block_bytes), name


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_a_call_that_skips_the_lists_last_block_closes_its_run_in_its_own_slot(forecast):
    """SD3's skip-layer guidance skipping the last block: that call slot's run ends early, and is
    closed at the next model call in the slot that opened it (not in the next call's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .conftest import tiny_pipeline, tiny_vae
    from .test_sd3 import generate
    from .tiny_configs import SD3_TRANSFORMER

    blocks = 4
    pipe = tiny_pipeline(StableDiffusion3Pipeline, transformer=SD3_TRANSFORMER.with_config(num_layers=blocks),
                         scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                         vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035))
    guidance = {"skip_guidance_layers": [blocks - 1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    plan = (1, 0, 0, 1, 0, 1)
    with smoothcache.cache(pipe, Schedule({"block": plan}), forecast=forecast):
        chained = generate(pipe, **guidance)
    with smoothcache.cache(pipe, Schedule({f"block-{i}": plan for i in range(blocks)}), forecast=forecast):
        per_block = generate(pipe, **guidance)
    torch.testing.assert_close(chained, per_block, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_double_and_single_stream_lists_on_the_same_steps_are_one_chain(name):
    """Flux's and HunyuanVideo's single-stream blocks run right after the double-stream ones on the
    same streams: cached on the same steps, both lists are one chain, which keeps one residual per
    stream (half of what two chains keep) and reuses as the blocks reused one by one do."""
    family_test = importlib.import_module(f".test_{name}", __package__)
    pipe, generate = family_test.make_pipeline(), family_test.generate
    transformer = pipe.transformer
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    plan = (1, 0, 1, 0, 0, 1)
    same = Schedule({"block": plan, "single_block": plan})
    apart = Schedule({"block": plan, "single_block": (1, 1, 0, 1, 0, 1)})

    def per_block(single_plan):
        return Schedule({
            **{f"block-{i}": plan for i in range(len(transformer.transformer_blocks))},
            **{f"single_block-{i}": single_plan for i in range(len(transformer.single_transformer_blocks))},
        })

    def run(schedule):
        with smoothcache.cache(pipe, schedule) as handle:
            output = generate(pipe)
            links = {layer_plan.chain for layer_plan in handle.plan.layers}
            return output, sum(handle.state.kept_bytes().values()), links

    one_chain, one_chain_bytes, links = run(same)
    assert {link.chain for link in links} == {0} and {link.length for link in links} == {blocks}
    assert sorted(link.position for link in links) == list(range(blocks))
    two_chains, two_chains_bytes, links = run(apart)
    assert {link.chain for link in links} == {0, 1}
    one_by_one, _, links = run(per_block(plan))
    assert links == {None}
    torch.testing.assert_close(one_chain, one_by_one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two_chains, run(per_block(apart.plans["single_block"]))[0], rtol=1e-4, atol=1e-4)
    # both streams, once: one block's residual, where two chains kept one each
    with smoothcache.cache(pipe, Schedule({"block": plan})) as handle:
        generate(pipe)
        double_only = sum(handle.state.kept_bytes().values())
    assert one_chain_bytes == double_only and two_chains_bytes > one_chain_bytes


def _randomise_control_projections(controlnet):
    """``controlnet`` with random control projections: diffusers zero-initialises them, which would
    make every control residual zero, reused or not."""
    for name, module in controlnet.named_modules():
        if name.startswith("controlnet_") and hasattr(module, "weight"):
            torch.nn.init.normal_(module.weight, std=0.2)
    return controlnet


def _flux_controlnet():
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                axes_dims_rope=(2, 2, 4))
    tokens, text = 16, 8
    inputs = {"hidden_states": torch.randn(1, tokens, 16), "controlnet_cond": torch.randn(1, tokens, 16),
              "encoder_hidden_states": torch.randn(1, text, 32), "pooled_projections": torch.randn(1, 16),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3)}
    lists = {"block": 2, "single_block": 3}
    return model, inputs, lists


def _sd3_controlnet():
    from diffusers import SD3ControlNetModel

    model = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8)
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "controlnet_cond": torch.randn(1, 4, 8, 8),
              "encoder_hidden_states": torch.randn(1, 6, 16), "pooled_projections": torch.randn(1, 32)}
    return model, inputs, {"block": 3}


@pytest.mark.parametrize("make", [_flux_controlnet, _sd3_controlnet], ids=["flux", "sd3"])
def test_a_controlnet_models_lists_never_chain_since_it_returns_every_blocks_output(make):
    """A ControlNet model returns each block's output (projected) as a control residual. A chain's
    inner blocks pass their input on when it reuses, which would make every residual the last
    block's: its blocks reuse one by one, and its residuals match per-block keys on every step."""
    torch.manual_seed(0)
    model, inputs, lists = make()
    _randomise_control_projections(model)
    plan = (1, 0, 1)

    def residuals(schedule):
        outputs = []
        with torch.no_grad(), smoothcache.cache(model.eval(), schedule) as handle:
            for step in range(len(plan)):  # the latents move from step to step, as they do in denoising
                step_inputs = {**inputs, "hidden_states": inputs["hidden_states"] * (1.0 - 0.2 * step)}
                samples = model(timestep=torch.tensor([1.0 - 0.3 * step]), return_dict=False, **step_inputs)
                outputs.append(torch.cat([s.flatten() for part in samples if part is not None for s in part]))
            chained = [layer_plan.layer.name for layer_plan in handle.plan.layers if layer_plan.chain is not None]
        return torch.stack(outputs), chained

    whole, chained = residuals(Schedule(dict.fromkeys(lists, plan)))
    one_by_one, _ = residuals(Schedule({f"{key}-{i}": plan for key, count in lists.items() for i in range(count)}))
    assert chained == []
    torch.testing.assert_close(whole, one_by_one, rtol=1e-5, atol=1e-5)


def test_a_controlnet_subclass_under_another_name_is_known_by_its_projections_and_never_chains():
    """A user's subclass named without "ControlNet" still returns every block's output through its
    ``controlnet_blocks``: its lists never chain either."""
    model, _, lists = _flux_controlnet()
    model.__class__ = type("BrandedControlModel", (type(model),), {})
    with smoothcache.cache(model.eval(), Schedule(dict.fromkeys(lists, (1, 0, 1)))) as handle:
        layers = handle.plan.layers
        assert layers and all(layer_plan.chain is None for layer_plan in layers)


def test_flux_controlnet_pipeline_with_both_models_cached_whole_matches_per_block_keys():
    """The user's path: FluxControlNetPipeline with its transformer and its ControlNet each cached
    on whole blocks. The transformer's lists take a residual after every block (its chain splits
    into one-block runs) and the ControlNet's never chain; both match per-block keys exactly."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
    )

    from .conftest import STEPS, text_embeddings, tiny_pipeline, tiny_vae
    from .tiny_configs import FLUX_TRANSFORMER

    shared = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
              "axes_dims_rope")  # fmt: skip
    torch.manual_seed(1)
    controlnet = _randomise_control_projections(FluxControlNetModel(**{name: FLUX_TRANSFORMER[name] for name in shared}))
    pipe = tiny_pipeline(FluxControlNetPipeline, scheduler=FlowMatchEulerDiscreteScheduler(), controlnet=controlnet,
                         vae=tiny_vae(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035),
                         transformer=FLUX_TRANSFORMER)
    control_image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    prompt, pooled = text_embeddings(2, 6, FLUX_TRANSFORMER["joint_attention_dim"]), text_embeddings(2, 16)

    def generate(schedule):
        with smoothcache.cache(pipe, schedule), smoothcache.cache(pipe.controlnet, schedule):
            return pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, control_image=control_image, height=16,
                        width=16, guidance_scale=3.5, controlnet_conditioning_scale=0.7, num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(0), output_type="pt")[0]

    plan = tuple(int(step in (0, 2, STEPS - 1)) for step in range(STEPS))
    lists = {"block": FLUX_TRANSFORMER["num_layers"], "single_block": FLUX_TRANSFORMER["num_single_layers"]}
    whole = generate(Schedule(dict.fromkeys(lists, plan)))
    per_block = generate(Schedule({f"{key}-{i}": plan for key, count in lists.items() for i in range(count)}))
    torch.testing.assert_close(whole, per_block, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_chain_of_blocks_compiled_one_by_one_reuses_and_keeps_as_it_does_eagerly(name):
    """Regional compile, each chained block compiled on its own after cache() (as diffusers'
    compile_repeated_blocks does): the chain runs around the blocks' compiled calls, with the same
    outputs and the same kept memory as eagerly."""
    pipe, generate, _, schedule, _ = blocks_of_family(name)
    with smoothcache.cache(pipe, schedule) as handle:
        eager = generate(pipe)
        eager_bytes = sum(handle.state.kept_bytes().values())
        chained = [plan.layer.module for plan in handle.plan.layers if plan.chain is not None]
        torch._dynamo.reset()
        try:
            for block in chained:
                block.compile(backend="eager")
            regional = generate(pipe)
            regional_bytes = sum(handle.state.kept_bytes().values())
        finally:
            for block in chained:
                block._compiled_call_impl = None
            torch._dynamo.reset()
    torch.testing.assert_close(regional, eager, rtol=1e-5, atol=1e-5)
    assert regional_bytes == eager_bytes > 0, name
