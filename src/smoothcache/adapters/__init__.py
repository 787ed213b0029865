"""Which layers of which model family are cacheable, and the schedule keys they answer to.

A layer is named by its module path (``transformer_blocks.3.attn1``); its *layer type* is the last
part (``attn1``) and its *block* the index before it (``3``), giving the schedule keys ``"attn1"``
and ``"attn1-3"``. Known block classes are recognised by class name, so this module imports no
model library.

Where one model holds two kinds of block whose layers share names, the family gives one of them a
prefix: Flux's single-stream ``single_transformer_blocks.3.attn`` is ``"single_attn"`` (keys
``"single_attn"``, ``"single_attn-3"``), apart from the double-stream ``transformer_blocks.3.attn``
(``"attn"``, ``"attn-3"``). Components name layers by these types: ``["attn", "single_attn"]``.
Where both kinds are one class, the prefix goes by the list holding the block: Latte's
``temporal_transformer_blocks.3.attn1`` is ``"temporal_attn1"``.

The component ``"block"`` names the blocks themselves, cached whole (``runtime/streams.py``):
``transformer_blocks.3`` is ``"block"``/``"block-3"``, Flux's single-stream blocks ``"single_block"``.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import NoCacheableLayersError
from ..keys import Key

__all__ = ["FAMILIES", "WHOLE_BLOCK", "BlockFamily", "CacheableLayer", "family_of", "find_layers",
           "whole_block_components"]

WHOLE_BLOCK = "block"  # the component naming the blocks themselves, cached whole


@dataclass(frozen=True)
class BlockFamily:
    """The transformer block classes of one model family and the sub-layers worth caching in them.

    ``prefixes`` pairs a block class name, or the name of the block list (``"temporal_blocks"``),
    with the prefix of its layer types, for models whose block kinds would otherwise give the same
    keys. ``uncacheable`` pairs a layer type that must not be cached with the reason, which the
    error for asking for it quotes. ``repeated`` names layer types the block calls several times
    per call, with how often and on what (CogView4's ff: 2, image then text tokens); they are found
    only for callers that keep one output per occurrence. ``model_class_names`` restricts the
    family to those models, for models built from another family's generic blocks (Latte's are
    ``BasicTransformerBlock``). ``back_to_back`` pairs two block lists (by list name) that the
    model's forward runs one right after the other, the first list's last outputs going into the
    second's first block and nowhere else (Flux's double-, then single-stream blocks): cached whole
    on the same steps, both are reused as one chain, with one kept residual per stream.
    """

    name: str
    block_class_names: tuple[str, ...]
    default_components: tuple[str, ...]
    components: tuple[str, ...]
    prefixes: tuple[tuple[str, str], ...] = ()
    uncacheable: tuple[tuple[str, str], ...] = ()
    repeated: tuple[tuple[str, int, str], ...] = ()
    model_class_names: tuple[str, ...] = ()
    streams: tuple[tuple[str, tuple[str, ...]], ...] = ()
    guidance_first: tuple[tuple[str, str], ...] = ()  # (pipeline class, "cond" or "uncond"): its CFG batch's first half
    back_to_back: tuple[tuple[str, str], ...] = ()  # (first list, second list), by list name

    def prefix_of(self, block: nn.Module, block_name: str) -> str:
        """The prefix of the layer types in ``block``, found at module path ``block_name``."""
        prefixes = dict(self.prefixes)
        block_list = block_name.rpartition(".")[0].rpartition(".")[2]
        return prefixes.get(type(block).__name__, prefixes.get(block_list, ""))

    def streams_of(self, block: nn.Module) -> tuple[str, ...] | None:
        """The input arguments ``block``'s outputs continue, if the family names them."""
        return dict(self.streams).get(type(block).__name__)

    def list_before(self, block_name: str) -> str | None:
        """The module path of the block list that runs right before the list holding ``block_name``
        (``transformer_blocks`` for ``single_transformer_blocks.0``), if the family names one."""
        list_path = block_name.rpartition(".")[0]
        parent, _, list_name = list_path.rpartition(".")
        before = next((first for first, second in self.back_to_back if second == list_name), None)
        if before is None:
            return None
        return f"{parent}.{before}" if parent else before


_VACE_CHILDREN = ("proj_in", "attn1", "attn2", "ffn", "proj_out", "block")
_TEXT_THEN_IMAGE = ("encoder_hidden_states", "hidden_states")
_IMAGE_THEN_TEXT = ("hidden_states", "encoder_hidden_states")
# Were VACE's control blocks ever cached: like a ControlNet, they hand every block's output on (as
# hints), so their list must not chain (``_hands_on_every_block_output`` knows ControlNets only)
_VACE_RUNS_FIRST = (
    "VACE's control blocks run before blocks.0 and feed it hints; caching them is not tested yet "
    "(the main blocks are cached)"
)

# Each cacheable layer is a child its block calls once per model call; a kept output stands in for
# its output while everything around it (norms, gates, residual adds) still runs. Defaults are
# attention and feed-forward (the paper's choice); cross-attention is opt-in.
FAMILIES: tuple[BlockFamily, ...] = (
    # diffusers' DiT / PixArt-α/Σ block: self-attention, optional cross-attention, feed-forward.
    BlockFamily(
        "diffusers-basic",
        ("BasicTransformerBlock",),
        ("attn1", "ff"),
        ("attn1", "attn2", "ff"),
        # DiTPipeline stacks class labels, then the null class; PixArt the negative prompt first
        guidance_first=(("DiTPipeline", "cond"), ("DemoDiTPipeline", "cond"), ("PixArtAlphaPipeline", "uncond"),
                        ("PixArtSigmaPipeline", "uncond")),
    ),
    # facebookresearch/DiT models.py: x + gate * attn(...), x + gate * mlp(...).
    BlockFamily("original-dit", ("DiTBlock",), ("attn", "mlp"), ("attn", "mlp")),
    # SD3/3.5 MMDiT: joint attention returns (image, context); attn2 is SD3.5's extra image
    # self-attention (some blocks only); the last block has no ff_context.
    BlockFamily(
        "sd3",
        ("JointTransformerBlock",),
        ("attn", "attn2", "ff", "ff_context"),
        ("attn", "attn2", "ff", "ff_context"),
        streams=(("JointTransformerBlock", _TEXT_THEN_IMAGE),),
        guidance_first=(("StableDiffusion3Pipeline", "uncond"),),
    ),
    # Flux: double-stream blocks like SD3's; single-stream blocks run attention and the MLP's input
    # projection in parallel and mix them in proj_out, which always runs.
    BlockFamily(
        "flux",
        ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        ("attn", "ff", "ff_context", "single_attn", "single_proj_mlp"),
        ("attn", "ff", "ff_context", "single_attn", "single_proj_mlp"),
        prefixes=(("FluxSingleTransformerBlock", "single_"),),
        streams=(("FluxTransformerBlock", _TEXT_THEN_IMAGE), ("FluxSingleTransformerBlock", _TEXT_THEN_IMAGE)),
        back_to_back=(("transformer_blocks", "single_transformer_blocks"),),
    ),
    # HunyuanDiT: self-attention, cross-attention, feed-forward, each added to the residual.
    BlockFamily("hunyuan-dit", ("HunyuanDiTBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff"), guidance_first=(("HunyuanDiTPipeline", "uncond"),)),
    # Sana: linear self-attention, cross-attention, GLUMBConv feed-forward.
    BlockFamily("sana", ("SanaTransformerBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff"), guidance_first=(("SanaPipeline", "uncond"),)),
    # AuraFlow: MMDiT joint blocks, then single blocks with the same child names.
    BlockFamily(
        "auraflow",
        ("AuraFlowJointTransformerBlock", "AuraFlowSingleTransformerBlock"),
        ("attn", "ff", "ff_context", "single_attn", "single_ff"),
        ("attn", "ff", "ff_context", "single_attn", "single_ff"),
        prefixes=(("AuraFlowSingleTransformerBlock", "single_"),),
        streams=(("AuraFlowJointTransformerBlock", _TEXT_THEN_IMAGE),),
        guidance_first=(("AuraFlowPipeline", "uncond"),),
    ),
    # CogView4: joint attention returns (image, text). Its one ff runs on the image tokens, then on
    # the text tokens, in every block call: the cache keeps both outputs (opt-in).
    BlockFamily(
        "cogview4",
        ("CogView4TransformerBlock",),
        ("attn1",),
        ("attn1", "ff"),
        repeated=(("ff", 2, "image tokens, then text tokens"),),
        streams=(("CogView4TransformerBlock", _IMAGE_THEN_TEXT),),
    ),
    # QwenImage MMDiT: joint attention returns (image, text); one MLP per stream.
    BlockFamily(
        "qwenimage",
        ("QwenImageTransformerBlock",),
        ("attn", "img_mlp", "txt_mlp"),
        ("attn", "img_mlp", "txt_mlp"),
        streams=(("QwenImageTransformerBlock", _TEXT_THEN_IMAGE),),
    ),
    # ---- video and audio ----------------------------------------------------------------------
    # Wan 2.1/2.2: self-attention, cross-attention (text, plus image tokens in I2V), feed-forward.
    # VACE's control blocks run before blocks.0 and feed it hints: left out until tested.
    BlockFamily(
        "wan",
        ("WanTransformerBlock", "WanVACETransformerBlock"),
        ("attn1", "ffn"),
        ("attn1", "attn2", "ffn"),
        prefixes=(("WanVACETransformerBlock", "vace_"),),
        uncacheable=tuple((f"vace_{child}", _VACE_RUNS_FIRST) for child in _VACE_CHILDREN),
    ),
    # CogVideoX: joint attention returns (video, text); one ff over the concatenated tokens.
    BlockFamily("cogvideox", ("CogVideoXBlock",), ("attn1", "ff"), ("attn1", "ff"), streams=(("CogVideoXBlock", _IMAGE_THEN_TEXT),), guidance_first=(("CogVideoXPipeline", "uncond"),)),
    # HunyuanVideo: double-stream blocks like Flux's, single-stream blocks with attention and the
    # MLP input projection in parallel (proj_out always runs); the I2V token-replace variants have
    # the same children. The text token refiner runs before them, on text only: opt-in.
    BlockFamily(
        "hunyuan-video",
        (
            "HunyuanVideoTransformerBlock",
            "HunyuanVideoTokenReplaceTransformerBlock",
            "HunyuanVideoSingleTransformerBlock",
            "HunyuanVideoTokenReplaceSingleTransformerBlock",
            "HunyuanVideoIndividualTokenRefinerBlock",
        ),
        ("attn", "ff", "ff_context", "single_attn", "single_proj_mlp"),
        ("attn", "ff", "ff_context", "single_attn", "single_proj_mlp", "refiner_attn", "refiner_ff"),
        prefixes=(
            ("HunyuanVideoSingleTransformerBlock", "single_"),
            ("HunyuanVideoTokenReplaceSingleTransformerBlock", "single_"),
            ("HunyuanVideoIndividualTokenRefinerBlock", "refiner_"),
        ),
        streams=tuple(
            (name, _IMAGE_THEN_TEXT)
            for name in (
                "HunyuanVideoTransformerBlock",
                "HunyuanVideoTokenReplaceTransformerBlock",
                "HunyuanVideoSingleTransformerBlock",
                "HunyuanVideoTokenReplaceSingleTransformerBlock",
            )
        ),
        back_to_back=(("transformer_blocks", "single_transformer_blocks"),),
    ),
    # LTX-Video: self-attention, cross-attention, feed-forward.
    BlockFamily("ltx-video", ("LTXVideoTransformerBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff"), guidance_first=(("LTXPipeline", "uncond"),)),
    # Mochi: joint attention returns (video, text); the last block has no ff_context.
    BlockFamily(
        "mochi",
        ("MochiTransformerBlock",),
        ("attn1", "ff", "ff_context"),
        ("attn1", "ff", "ff_context"),
        streams=(("MochiTransformerBlock", _IMAGE_THEN_TEXT),),
        guidance_first=(("MochiPipeline", "uncond"),),
    ),
    # Allegro: self-attention, cross-attention, feed-forward.
    BlockFamily("allegro", ("AllegroTransformerBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff"), guidance_first=(("AllegroPipeline", "uncond"),)),
    # Latte: a spatial and a temporal BasicTransformerBlock per depth, interleaved; the temporal
    # blocks have no cross-attention. Matched by model class: its blocks are diffusers-basic's.
    BlockFamily(
        "latte",
        ("BasicTransformerBlock",),
        ("attn1", "ff", "temporal_attn1", "temporal_ff"),
        ("attn1", "attn2", "ff", "temporal_attn1", "temporal_ff"),
        prefixes=(("temporal_transformer_blocks", "temporal_"),),
        model_class_names=("LatteTransformer3DModel",),
        guidance_first=(("LattePipeline", "uncond"),),
    ),
    # Stable Audio Open: self-attention, cross-attention, feed-forward.
    BlockFamily("stable-audio", ("StableAudioDiTBlock",), ("attn1", "ff"), ("attn1", "attn2", "ff"), guidance_first=(("StableAudioPipeline", "uncond"),)),
    # Stable Audio Open as stable-audio-tools samples it (models/dit.py DiffusionTransformer ->
    # models/transformer.py ContinuousTransformer.layers of TransformerBlock: self_attn, cross_attn,
    # ff). The block class name is generic, so the family is picked by the model class only.
    BlockFamily(
        "stable-audio-tools",
        ("TransformerBlock",),
        ("self_attn", "ff"),
        ("self_attn", "cross_attn", "ff"),
        model_class_names=("DiffusionTransformer", "DiTWrapper", "ConditionedDiffusionModelWrapper"),
    ),
    # Open-Sora 1.2 STDiT3 (hpcaitech/Open-Sora, opensora/models/stdit/stdit3.py): spatial_blocks and
    # temporal_blocks of one class, interleaved, each with attn, cross_attn and mlp.
    BlockFamily(
        "open-sora-stdit3",
        ("STDiT3Block",),
        ("spatial_attn", "spatial_mlp", "temporal_attn", "temporal_mlp"),
        ("spatial_attn", "spatial_cross_attn", "spatial_mlp", "temporal_attn", "temporal_cross_attn", "temporal_mlp"),
        prefixes=(("spatial_blocks", "spatial_"), ("temporal_blocks", "temporal_")),
    ),
)


@dataclass(frozen=True)
class CacheableLayer:
    """One layer that may be cached: where it is, what it is, and its schedule keys."""

    name: str
    module: nn.Module
    layer_type: str
    block: int | None
    repeats: int = 1  # calls per block call; more than one: keep an output per occurrence
    streams: tuple[str, ...] | None = None  # a whole block: the input arguments its outputs continue
    list_before: str | None = None  # a whole block: the list its own list runs right after (BlockFamily.back_to_back)
    chains: bool = True  # a whole block: whether its list may reuse as one chain (not where the model hands its output on)

    @property
    def block_key(self) -> str:
        return str(Key(self.layer_type, self.block))


def guidance_first_half(pipeline_class_name: str) -> str | None:
    """Which half of a classifier-free guidance batch a known pipeline stacks first: "cond" or "uncond"."""
    return next((half for family in FAMILIES for name, half in family.guidance_first if name == pipeline_class_name), None)


def family_of(model: nn.Module) -> BlockFamily | None:
    """The family naming ``model``'s class, else the first other known family with a block in ``model``."""
    named = next((f for f in FAMILIES if type(model).__name__ in f.model_class_names), None)
    if named is not None:
        return named
    names = {type(m).__name__ for m in model.modules()}
    return next((f for f in FAMILIES if not f.model_class_names and names.intersection(f.block_class_names)), None)


def whole_block_components(model: nn.Module) -> list[str]:
    """The components that cache every block list of ``model`` whole: ``"block"`` and its family's
    prefixed kinds that the model has (Flux: ``["block", "single_block"]``), never an uncacheable one."""
    family = family_of(model)
    prefixes = {prefix for _, prefix in family.prefixes} if family is not None else set()
    uncacheable = dict(family.uncacheable) if family is not None else {}
    candidates = [c for c in [WHOLE_BLOCK, *sorted(p + WHOLE_BLOCK for p in prefixes)] if c not in uncacheable]
    found = []
    for component in candidates:
        try:
            find_layers(model, [component])
        except NoCacheableLayersError:
            continue
        found.append(component)
    return found


def find_layers(
    model: nn.Module,
    components: Sequence[str] | None = None,
    block_classes: Sequence[type] | None = None,
    *,
    allow_repeated: bool = False,
) -> list[CacheableLayer]:
    """The cacheable layers of ``model``, in module order.

    ``components`` are layer types inside blocks (``["attn1", "ff"]``; with the family's prefix
    where it has one, ``"single_attn"``) or module-path patterns (``["transformer_blocks.*.attn1"]``).
    Without them, the known family's defaults apply. ``block_classes`` restricts plain names to
    blocks of those classes, whose layer types are then the bare child names (the reference
    package's ``block_classes`` argument); otherwise known families' blocks, then any indexed block,
    match. Asking for a layer the family marks uncacheable raises :class:`NoCacheableLayersError`;
    so does asking for one its block calls several times per call, unless ``allow_repeated`` (the
    caller keeps an output per occurrence, as the cache does).
    """
    family = family_of(model)
    if components is None:
        if family is None:
            known = dict.fromkeys(n for f in FAMILIES for n in f.block_class_names)
            raise NoCacheableLayersError(
                f"{type(model).__name__} has no block class smoothcache knows ({', '.join(known)}); pass components=, "
                f"e.g. {_example_patterns(model)}"
            )
        components = family.default_components
    patterns = [c for c in components if "." in c or any(ch in c for ch in "*?[")]
    plain = [c for c in components if c not in patterns]
    whole_blocks = [c for c in plain if c == WHOLE_BLOCK or c.endswith("_" + WHOLE_BLOCK)]

    modules = dict(model.named_modules())
    layers: list[CacheableLayer] = []
    for name, module in modules.items():
        if not name:
            continue
        parts = name.split(".")
        if whole_blocks and parts[-1].isdigit() and _is_block(module, name, family, block_classes, whole=True):
            owner = modules[name.rpartition(".")[0].rpartition(".")[0]]  # the module holding the block list
            layer = _whole_block(name, module, family, block_classes, whole_blocks, owner)
            if layer is not None:
                layers.append(layer)
            continue
        parent_name = ".".join(parts[:-1])
        parent = modules[parent_name]
        layer_type = parts[-1]
        if family is not None and block_classes is None:
            layer_type = family.prefix_of(parent, parent_name) + layer_type
        wanted = any(fnmatch.fnmatchcase(name, p) for p in patterns) or (
            layer_type in plain and _is_block(parent, parent_name, family, block_classes)
        )
        if wanted:
            repeats = _repeats(name, layer_type, parent, family, allow_repeated)
            layers.append(CacheableLayer(name, module, layer_type, _block_index(parts), repeats))
    if not layers:
        raise NoCacheableLayersError(_nothing_found_message(model, components, block_classes))
    return layers


def _repeats(
    name: str, layer_type: str, parent: nn.Module, family: BlockFamily | None, allow_repeated: bool
) -> int:
    """How often ``parent`` calls the layer per call; raises where it must not or cannot be cached."""
    if family is None or type(parent).__name__ not in family.block_class_names:
        return 1
    where = f"{name} ({layer_type!r} of {type(parent).__name__})"
    why = dict(family.uncacheable).get(layer_type)
    if why is not None:
        raise NoCacheableLayersError(
            f"{where} cannot be cached: {why}. Cacheable layers of this family: {list(family.components)}"
        )
    for repeated_type, repeats, what in family.repeated:
        if repeated_type != layer_type:
            continue
        if not allow_repeated:
            raise NoCacheableLayersError(
                f"{where} runs {repeats} times per block call ({what}); only smoothcache.cache and "
                "smoothcache.calibration, which keep one output per occurrence, take it"
            )
        return repeats
    return 1


def _whole_block(
    name: str,
    block: nn.Module,
    family: BlockFamily | None,
    block_classes: Sequence[type] | None,
    wanted: Sequence[str],
    owner: nn.Module,
) -> CacheableLayer | None:
    """The block at ``name``, in a list that ``owner`` holds, as one cacheable layer, if ``wanted``
    asks for its kind of block."""
    prefix = family.prefix_of(block, name) if family is not None and block_classes is None else ""
    layer_type = prefix + WHOLE_BLOCK
    if layer_type not in wanted:
        return None
    why = dict(family.uncacheable).get(layer_type) if family is not None else None
    if why is not None:
        raise NoCacheableLayersError(f"{name} ({layer_type!r} of {type(block).__name__}) cannot be cached: {why}")
    streams = family.streams_of(block) if family is not None else None
    if streams is None:  # the block continues its first argument, as DiT's does
        first = next(iter(inspect.signature(block.forward).parameters), None)
        if first is None:
            raise NoCacheableLayersError(f"{name} ({type(block).__name__}) takes no input, so it cannot be cached whole")
        streams = (first,)
    list_before = family.list_before(name) if family is not None and block_classes is None else None
    return CacheableLayer(name, block, layer_type, int(name.rpartition(".")[2]), streams=streams, list_before=list_before,
                          chains=not _hands_on_every_block_output(owner))


def _hands_on_every_block_output(model: nn.Module) -> bool:
    """Whether ``model``'s forward hands each block's output on beyond the next block: diffusers'
    ControlNet models (``FluxControlNetModel``, ``SD3ControlNetModel``, ...) return every block's
    output, projected by their ``controlnet_blocks``, as a control residual. A chain's inner blocks
    pass their input on when it reuses, so those residuals would all be the last block's: such lists
    never chain. Known by either mark, so that a user's subclass under another name is one too."""
    return "ControlNet" in type(model).__name__ or hasattr(model, "controlnet_blocks")


def _is_block(
    parent: nn.Module,
    parent_name: str,
    family: BlockFamily | None,
    block_classes: Sequence[type] | None,
    *,
    whole: bool = False,
) -> bool:
    """Whether ``parent`` is a transformer block. With ``whole``, ``parent_name`` is the block's own
    path (``blocks.3``); otherwise it is the path of a block whose child is being looked at."""
    if block_classes is not None:
        return isinstance(parent, tuple(block_classes))
    if family is not None:
        return type(parent).__name__ in family.block_class_names
    if whole:  # a generic model: a module with children of its own, in a list not nested in another list's
        parts = parent_name.split(".")
        return parts[-1].isdigit() and sum(p.isdigit() for p in parts) == 1 and any(True for _ in parent.children())
    return _block_index(parent_name.split(".") + ["_"]) is not None


def _block_index(parts: list[str]) -> int | None:
    return int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None


def _example_patterns(model: nn.Module) -> str:
    indexed = [n for n, _ in model.named_modules() if n and _block_index(n.split(".")) is not None]
    return repr(indexed[:3]) if indexed else "['blocks.*.attn', 'blocks.*.mlp']"


def _nothing_found_message(model: nn.Module, components: Sequence[str], block_classes: Sequence[type] | None) -> str:
    blocks: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if name and parts[-1].isdigit():
            children = {child for child, _ in module.named_children()}
            blocks.setdefault(type(module).__name__, set()).update(children)
    where = f" in blocks of {[c.__name__ for c in block_classes]}" if block_classes else ""
    if "OptimizedModule" in blocks:  # blocks[i] = torch.compile(block): the layers sit under _orig_mod
        return (
            f"No cacheable layer of {type(model).__name__} matches components {list(components)}: its blocks are "
            "torch.compile wrappers (blocks[i] = torch.compile(block)). Cache the model first and compile it "
            "afterwards, or compile the blocks in place (block.compile(), or diffusers' "
            "transformer.compile_repeated_blocks()), which smoothcache caches as they are"
        )
    if blocks:
        found = "; ".join(f"{cls} with children {sorted(children)}" for cls, children in blocks.items())
        hint = f"it has indexed blocks: {found}"
    else:
        hint = f"its top-level children are {[n for n, _ in model.named_children()]}"
    return (
        f"No cacheable layer of {type(model).__name__} matches components {list(components)}{where}; {hint}. "
        "Pass components= with names of those children or module-path patterns like 'blocks.*.attn'"
    )
