"""The plan: the LayerSpec / TiedLayerSpec list of an architecture, built from the registry's
layer layout (train/registry/layers.py), and where each layer's parameters live in model_zoo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from ... import registry
from ...registry.layers import PipelineLayer, PipelineLayout
from .carry import Carry
from .context import ContextCache
from .layers import BlockLayer, EmbedFn, FinalNorm, HeadFn, LMHead, StackInput, TokenEmbedding

TIED_KEY = "embed"  # the TiedLayerSpec key of the token embedding (shared with the LM head / ED decoder)


def arch_spec(config) -> registry.ArchSpec:
    """The registry entry of a model_zoo config, by its class and fields (registry.entry_of: the
    pipeline's API takes a config alone)."""
    return registry.entry_of(config)


def pipeline_layout(config) -> PipelineLayout:
    """The layer layout of a model_zoo config, as its registry entry gives it."""
    return arch_spec(config).pipeline_layers_layout(config)


@dataclass
class Plan:
    """The layer specs of one architecture and where their parameters live in model_zoo."""

    specs: list  # LayerSpec / TiedLayerSpec, in pipeline order
    prefixes: list  # per layer: model_zoo key prefixes of its parameters (several for the tied embedding)
    input_fields: tuple  # the first layer's carry: what batch_to_pipeline produces
    cache: Optional[ContextCache] = None  # shared by the BlockLayers a process builds


def _layer_spec(config, layer: PipelineLayer, first: bool, embed_args: tuple, cache: Optional[ContextCache]):
    """The LayerSpec of one layer of the layout. Every occurrence of the tied embedding is built
    with the first one's arguments (DeepSpeed builds the module from whichever occurrence a stage
    meets first); the later ones differ in their forward_fn."""
    c_in, c_out = Carry(*layer.carry_in), Carry(*layer.carry_out)
    if layer.kind == "embed" and first:
        return TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args) if layer.tied else LayerSpec(TokenEmbedding, *embed_args)
    if layer.kind == "embed":  # a later occurrence: embed another id field (ED decoder)
        return TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args, forward_fn=EmbedFn(c_in, c_out, layer.field))
    if layer.kind == "input":
        return LayerSpec(StackInput, config, layer.stack, c_in, c_out)
    if layer.kind == "block":
        return LayerSpec(BlockLayer, config, layer.stack, layer.index, c_in, c_out, cache)
    if layer.kind in ("norm", "head_norm"):
        return LayerSpec(FinalNorm, config, c_in, c_out, layer.field)
    if layer.kind != "head":
        raise ValueError(f"unknown pipeline layer kind {layer.kind!r}")
    # the LM head: the tied embedding's transpose (scaled as the model scales tied logits) or its own matrix
    if layer.tied:
        scale = config.d_model ** -0.5 if config.scale_tied_logits else None
        return TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args, forward_fn=HeadFn(scale, config.loss_impl))
    return LayerSpec(LMHead, config.d_model, config.vocab_size, config.loss_impl)


def make_plan(config, cache: Optional[ContextCache] = None) -> Plan:
    layout = pipeline_layout(config)
    first = layout.layers[0]  # the token embedding
    embed_args = (config.vocab_size, config.d_model, Carry(*first.carry_in), Carry(*first.carry_out), first.field)
    specs = [_layer_spec(config, layer, i == 0, embed_args, cache) for i, layer in enumerate(layout.layers)]
    return Plan(specs, [layer.prefixes for layer in layout.layers], layout.input_fields, cache)


def pipeline_layers(config, cache: Optional[ContextCache] = None) -> list:
    """The LayerSpec / TiedLayerSpec list of a model_zoo config or model (CD, ND or ED), for
    `deepspeed.pipe.PipelineModule(layers=...)`; `pipeline_loss(config)` is its loss_fn.
    (ArchscalePipeline adds the weight mapping and checkpointable layers to this.)"""
    config = getattr(config, "config", config)
    return make_plan(config, cache if cache is not None else ContextCache()).specs


def layer_names(config) -> list[str]:
    """Class names of the pipeline layers in order (what `type:REGEX` partitioning matches)."""
    def name(spec) -> str:
        fn = getattr(spec, "forward_fn", None)
        suffix = "(head)" if isinstance(fn, HeadFn) else "(decoder input)" if isinstance(fn, EmbedFn) else ""
        stack = getattr(spec.module_args[1], "name", "") if spec.typename in (StackInput, BlockLayer) else ""
        index = f" {spec.module_args[2]}" if spec.typename is BlockLayer else ""
        return f"{spec.typename.__name__}{suffix}" + (f"[{stack}{index}]" if stack else "")

    return [name(spec) for spec in make_plan(config).specs]



def num_blocks(config) -> int:
    """Transformer blocks the pipeline splits (ED: encoder + decoder)."""
    return arch_spec(config).num_layers(config)
