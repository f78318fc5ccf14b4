"""Pipeline parallelism: CD, ND and ED as a DeepSpeed `PipelineModule`, built from model_zoo.

The model code stays single-device (model_zoo); this package cuts it into a sequence of pipeline
layers, each a thin subclass or holder of a model_zoo module with the same parameter names, so
that a model_zoo state dict maps onto the pipeline key for key (prefix + local key) and back.

The layers of each architecture, in order, with their kinds, carries and model_zoo key prefixes,
are the registry's (`ArchSpec.pipeline_layers_layout`, written once in train/registry/layers.py);
`specs.make_plan` turns that layout into LayerSpecs:
    embed      TokenEmbedding (tied key "embed": the ED decoder input and a tied head share it)
    input      StackInput     learned positions, dropout, the T5 table of its stack
    block      BlockLayer i   one model_zoo Block with its absolute index in its stack
    norm       FinalNorm      a stack's final norm (ED encoder -> encoder_hidden)
    head_norm  FinalNorm      the norm before the head
    head       the tied embedding (HeadFn, x d_model^-0.5 when scale_tied_logits), else LMHead

The activation tuple between layers (and so between stages) is named, field by field, by a
`Carry` on each side of every layer; its fields:
    hidden            float [B, T, D]  the residual stream of the current stack
    bias_table        float [2*max_distance+1, H]  T5 relative-bias table of the current stack,
                      computed once in its StackInput from `rel_bias`; carried as an activation,
                      so DeepSpeed's pipeline backward returns its gradient to that stage
    encoder_hidden    float [B, Ti, D]  ED: the encoder output, carried to every decoder layer
    segment_ids, position_ids, bidirectional (ND, uint8)      int [B, T] / [B, Ti]
    decoder_input_ids, decoder_segment_ids, decoder_position_ids (ED)   int [B, To]
A layer passes on only what later layers need (the last block of a stack drops the table and
the per-token tensors), because DeepSpeed expects a gradient for every float tensor a stage
receives: each one is therefore used or passed on by every stage that receives it. Integer
tensors get no gradient. Masks are never sent: every stage rebuilds them from the per-token
tensors with model_zoo's own `Stack.build_context`, once per stack, stage and micro-batch
(`ContextCache`).

Loss on the last stage: model_zoo.loss (cross-entropy + z-loss), shifted when the layout says so
(decoders: logits[:, :-1] vs labels[:, 1:]; ED does not, T5). In training with a fused
`loss_impl` (chunked / liger, see docs/model_zoo.md) the head layer hands the loss `(hidden, head
weight)` instead of the logits, and the loss runs model_zoo's linear_cross_entropy on them, as
the unpipelined model does.

Modules: carry (the named tuple), context (stacks and mask contexts), layers (the pipeline
layers), loss, specs (the plan of LayerSpecs), checks, data (the batch interface), weights (the
model_zoo weight mapping), module (ArchscalePipeline, LocalPipeline, building the engine).

Public API (see docs/pipeline.md): `check_pipeline`, `pipeline_layers`, `build_pipeline_module`,
`initialize_pipeline_engine`, `batch_to_pipeline`, `pipeline_batches`, `ArchscalePipeline`
(`load_model_state_dict`, `model_state_dict`, `named_model_parameters`),
`model_state_dict_from_layer_files`, `pipeline_to_model_state_dict`, `LocalPipeline`.
"""
from __future__ import annotations

from .carry import _HIDDEN, Carry
from .checks import PipelineConfigError, check_pipeline
from .context import DECODER, ED_DECODER, ENCODER, ContextCache, StackKind, _StackView, _storage_key, stack_context
from .data import COUNT_KEYS, batch_to_pipeline, input_fields, pipeline_batches
from .layers import (BlockLayer, EmbedFn, FinalNorm, HeadFn, LMHead, StackInput, TokenEmbedding,
                     _head_output)
from .loss import PipelineLoss, pipeline_loss
from .module import (CHECKPOINTABLE_LAYERS, ArchscalePipeline, LocalPipeline, _Bound, build_pipeline_module,
                     initialize_pipeline_engine)
from .specs import TIED_KEY, Plan, arch_spec, layer_names, make_plan, num_blocks, pipeline_layers, pipeline_layout
from .weights import (_LAYER_FILE, _PipelineWeights, layer_states_from_files, model_state_dict_from_layer_files,
                      model_to_pipeline_state_dicts, pipeline_to_model_state_dict)

__all__ = [
    "ArchscalePipeline", "BlockLayer", "CHECKPOINTABLE_LAYERS", "COUNT_KEYS", "Carry", "ContextCache", "DECODER",
    "ED_DECODER", "ENCODER", "EmbedFn", "FinalNorm", "HeadFn", "LMHead", "LocalPipeline", "Plan",
    "PipelineConfigError", "PipelineLoss", "StackInput", "StackKind", "TIED_KEY", "TokenEmbedding", "arch_spec",
    "batch_to_pipeline", "build_pipeline_module", "check_pipeline", "initialize_pipeline_engine", "input_fields",
    "layer_names", "layer_states_from_files", "make_plan", "model_state_dict_from_layer_files",
    "model_to_pipeline_state_dicts", "num_blocks",
    "pipeline_batches", "pipeline_layers", "pipeline_layout", "pipeline_loss", "pipeline_to_model_state_dict",
    "stack_context",
]
