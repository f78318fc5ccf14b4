"""Parameter shapes per pipeline layer (the analytic twin of model_zoo.sizes.num_params) and the
stage boundaries DeepSpeed's PipelineModule draws over them."""
from __future__ import annotations

import math
from typing import Sequence

from ... import registry


def pipeline_layout(config):
    """The registry's pipeline layer layout of a model_zoo config (train/registry/layers.py); its
    entry by class and fields (registry.entry_of)."""
    return registry.entry_of(config).pipeline_layers_layout(config)


def param_shapes(config) -> list[list[tuple[int, ...]]]:
    """Parameter shapes of each pipeline layer, in the pipeline's order (the registry's layout;
    the tied embedding appears at each layer that uses it). Flattened and deduplicated
    (`model_shapes`) it is the whole model; the analytic twin of model_zoo.sizes.num_params."""
    c = config
    d, inner, f = c.d_model, c.n_heads * c.head_dim, c.d_ff
    norm = [(d,)] if c.norm == "rmsnorm" else [(d,), (d,)]
    attn = [(inner, d), (inner, d), (inner, d), (d, inner)] + ([(inner,), (inner,)] if c.qk_bias else [])
    mlp = [(f, d), (f, d), (d, f)] if c.mlp in ("geglu", "swiglu") else [(f, d), (d, f)]
    stack_in = {"t5_bias": [(c.rel_buckets, c.n_heads)],
                "learned": [(c.max_position_embeddings, d)]}.get(c.position, [])
    embed = [(c.vocab_size, d)]
    head = embed if c.tie_embeddings else [(c.vocab_size, d)]

    shared = getattr(c, "share_encoder_decoder", False)  # a cross block's self-attention / MLP: the encoder's

    def block(cross: bool):
        if cross and shared:
            return norm + attn
        return norm + attn + (norm + attn if cross else []) + norm + mlp

    by_kind = {"embed": embed, "input": stack_in, "norm": norm, "head_norm": norm, "head": head}
    return [block(layer.stack.cross) if layer.kind == "block" else by_kind[layer.kind]
            for layer in pipeline_layout(c).layers]


def _tied_layers(config) -> set[int]:
    """Indices of pipeline layers holding the shared embedding."""
    return {i for i, layer in enumerate(pipeline_layout(config).layers) if layer.tied}


def stage_shapes(config, layers: Sequence[int]) -> list[tuple[int, ...]]:
    """Unique parameter shapes held by the pipeline layers `layers` (a tied matrix once)."""
    per_layer, tied = param_shapes(config), _tied_layers(config)
    out, seen_tied = [], False
    for i in layers:
        if i in tied:
            if seen_tied:
                continue
            seen_tied = True
        out += per_layer[i]
    return out


def model_shapes(config) -> list[tuple[int, ...]]:
    return stage_shapes(config, range(len(param_shapes(config))))


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def largest_layer_params(config) -> int:
    """Largest single module's own parameters (what DeepSpeed's ZeRO-3 estimator calls the
    largest layer): the embedding for the reference shapes. LayerNorm's weight + bias count together."""
    biggest = max(math.prod(s) for s in model_shapes(config))
    return max(biggest, 2 * config.d_model if config.norm == "layernorm" else 0)


def partition_balanced(weights: Sequence[int], num_parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced` (pipeline partition_method="parameters"),
    re-implemented without numpy: contiguous parts minimising (max part - min part); returns
    the boundaries [0, ..., len(weights)]."""
    n, m = len(weights), num_parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    inf = float("inf")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    pos = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = 0
    cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                s = prefix[i] - prefix[k]
                hi, lo = max(dp_max[k][j - 1], s), min(dp_min[k][j - 1], s)
                if cost[i][j] >= hi - lo:
                    cost[i][j], dp_max[i][j], dp_min[i][j], pos[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(pos[parts[-1]][j])
    return parts[::-1]


def pipeline_parts(config, stages: int, method: str = "parameters") -> list[int]:
    """Stage boundaries over the pipeline layers, as DeepSpeed's PipelineModule computes them
    for "parameters" (balanced parameter counts, tied layers counted at each use) and "uniform"
    (DeepSpeed's partition_uniform over all layers). type:REGEX falls back to "parameters"."""
    counts = [numel(s) for s in param_shapes(config)]
    if stages == 1:
        return [0, len(counts)]
    if method == "uniform":
        n = len(counts)
        if n <= stages:
            return [min(p, n) for p in range(stages + 1)]
        size, rest = divmod(n, stages)
        parts = [i * size for i in range(stages + 1)]
        for i in range(rest):
            parts = parts[:i + 1] + [p + 1 for p in parts[i + 1:]]
        return parts
    return partition_balanced(counts, stages)
