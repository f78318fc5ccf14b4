"""T5 span corruption, ported from `t5.data.preprocessors` (Raffel et al. 2020) to numpy.

Pipeline for one example of n tokens (what `span_corruption` does in T5):
    mask    = random_spans_noise_mask(n, noise_density, mean_noise_span_length, rng)
    inputs  = noise_span_to_unique_sentinel(tokens, mask, sentinels)     + [EOS]
    targets = nonnoise_span_to_unique_sentinel(tokens, mask, sentinels)  + [EOS]
Example (n=8, noise 0.25 -> 2 noise tokens in 1 span; mask = F F F F F F T T):
    tokens  = a b c d e f g h
    inputs  = a b c d e f <extra_id_0> </s>
    targets = <extra_id_0> g h </s>

The mask always starts with a non-noise span and ends with a noise span (T5 does not roll it),
so every sentinel of the inputs opens exactly one span of the targets and the targets end with
the last dropped span followed by EOS. (The T5 paper's Figure 2 shows a trailing sentinel
`<Z>` because its example text ends in kept tokens; T5's code never produces that case, and the
reference lengths 512 / 114 are those of the code.) `merge_by_sentinels` inverts the pair.

Numbers of noise tokens and spans are deterministic functions of n (only their positions are
random), so lengths are known before any randomness: `span_corruption_lengths`.
Rounding is Python/numpy round-half-to-even in float64 (T5's TF code rounds in float32; the two
agree at the reference lengths).
Deviation, degenerate cases only: T5 may create zero-length spans when the number of spans
exceeds the noise or non-noise tokens (very short examples, very high density); we cap the
number of spans so that every span is non-empty.
"""
from __future__ import annotations

import numpy as np


def _counts(length, noise_density: float, mean_noise_span_length: float):
    """(num_noise_tokens, num_noise_spans) for example lengths (int or array), as T5 computes them."""
    n = np.maximum(np.asarray(length, dtype=np.int64), 2)  # T5: a 1-token example is treated as 2
    noise = np.round(n * noise_density).astype(np.int64)
    noise = np.minimum(np.maximum(noise, 1), n - 1)  # at least one noise and one kept token
    spans = np.round(noise / mean_noise_span_length).astype(np.int64)
    spans = np.minimum(spans, np.minimum(noise, n - noise))  # every span non-empty (see module doc)
    spans = np.maximum(spans, 1)
    return noise, spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split num_items into num_segments non-empty segments, uniformly at random; returns lengths."""
    mask_indices = np.arange(num_items - 1) < (num_segments - 1)  # (num_items-1,) segment starts
    rng.shuffle(mask_indices)
    first_in_segment = np.concatenate([[False], mask_indices])  # (num_items,)
    segment_id = np.cumsum(first_in_segment)  # (num_items,) 0..num_segments-1
    return np.bincount(segment_id, minlength=num_segments)  # (num_segments,)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (length,) of noise tokens: alternating kept/noise spans, kept first, noise last.

    num_noise_tokens = round(length * noise_density) clipped to [1, length-1];
    num_noise_spans = round(num_noise_tokens / mean_noise_span_length), at least 1;
    span lengths are a uniformly random composition of each count (T5's `_random_segmentation`).
    """
    orig_length = length
    length = max(int(length), 2)
    noise, spans = (int(v) for v in _counts(length, noise_density, mean_noise_span_length))
    noise_span_lengths = _random_segmentation(noise, spans, rng)  # (spans,)
    nonnoise_span_lengths = _random_segmentation(length - noise, spans, rng)  # (spans,)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)  # (2*spans,)
    span_starts = np.cumsum(interleaved)[:-1]  # (2*spans-1,)
    span_start_indicator = np.zeros(length, dtype=np.int64)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)  # (length,) index of the span each token is in
    is_noise = span_num % 2 == 1
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  sentinel_ids: np.ndarray) -> np.ndarray:
    """Replace each run of noise tokens by one sentinel: the k-th run gets sentinel_ids[k]."""
    tokens = np.asarray(tokens)
    prev_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_noise  # (n,) starts of noise runs
    subsequent_noise = noise_mask & prev_noise
    span_index = np.cumsum(first_noise) - 1  # (n,) k for tokens in the k-th run
    if first_noise.sum() > len(sentinel_ids):
        raise ValueError(f"example needs {int(first_noise.sum())} sentinels but the tokenizer has "
                         f"{len(sentinel_ids)}; raise data.num_sentinels")
    out = np.where(first_noise, np.asarray(sentinel_ids)[np.maximum(span_index, 0)], tokens)
    return out[~subsequent_noise]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     sentinel_ids: np.ndarray) -> np.ndarray:
    """The targets: kept spans become sentinels, noise tokens stay (T5: same function on ~mask)."""
    return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask), sentinel_ids)


def span_corruption_lengths(length, noise_density: float, mean_noise_span_length: float,
                            extra_inputs: int = 1, extra_targets: int = 1):
    """(inputs_length, targets_length) after corruption of examples of `length` tokens.

    inputs  = kept tokens + one sentinel per span + extra_inputs (EOS, and a UL2 mode token);
    targets = noise tokens + one sentinel per span + extra_targets (EOS). Works on arrays.
    """
    n = np.asarray(length, dtype=np.int64)
    noise, spans = _counts(n, noise_density, mean_noise_span_length)
    return n - noise + spans + extra_inputs, noise + spans + extra_targets


def random_spans_helper(inputs_length: int, noise_density: float, mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1, extra_tokens_per_span_targets: int = 1,
                        extra_inputs: int = 1) -> tuple[int, int]:
    """T5's `random_spans_helper`: raw tokens per example and the resulting targets length.

    Returns (tokens_length, targets_length): the largest number of raw tokens whose corrupted
    inputs (kept tokens + sentinels + EOS) fit in inputs_length, and the targets length it gives.
    Reference: inputs 512, density 0.15, mean span 3 -> (568, 114).
    `extra_inputs` counts the tokens added to the inputs besides sentinels (1 = EOS; 2 with a UL2
    mode token); T5 hard-codes 1.
    """
    if inputs_length < extra_inputs + extra_tokens_per_span_inputs + 1:
        raise ValueError(f"inputs_length={inputs_length} is too short for span corruption; use at least "
                         f"{extra_inputs + extra_tokens_per_span_inputs + 1}")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + extra_inputs,
                num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's "minor hack": at density 0.5 make the targets length equal the (round) inputs length.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def span_corrupt(tokens: np.ndarray, noise_density: float, mean_noise_span_length: float,
                 rng: np.random.Generator, sentinel_ids: np.ndarray, eos_id: int,
                 prefix: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """One example: (inputs, targets) = (prefix + corrupted + [EOS], sentinels/spans + [EOS])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    inputs = noise_span_to_unique_sentinel(tokens, mask, sentinel_ids)
    targets = nonnoise_span_to_unique_sentinel(tokens, mask, sentinel_ids)
    eos = np.array([eos_id], dtype=np.int64)
    return (np.concatenate([np.asarray(prefix, dtype=np.int64), inputs, eos]),
            np.concatenate([targets, eos]))


def span_corrupt_many(pieces: list, noise_density: float, mean_noise_span_length: float, generators,
                      sentinel_ids: np.ndarray, eos_id: int,
                      prefix: tuple[int, ...] = ()) -> list[tuple[np.ndarray, np.ndarray]]:
    """`span_corrupt` of many examples at once, example i with the i-th Generator of `generators`
    (an iterable; each is used before the next is drawn): the same pairs, bit for bit, as
    `[span_corrupt(t, ..., g, ...) for t, g in zip(pieces, generators)]`.

    Only the two shuffles of `_random_segmentation` run per example (they are the randomness);
    the span lengths, masks, sentinels and EOS / prefix are laid out for all examples together on
    flat arrays. Every mask starts kept and ends dropped, so runs never cross an example boundary.
    """
    E = len(pieces)
    if E == 0:
        return []
    L = np.fromiter((len(t) for t in pieces), dtype=np.int64, count=E)  # (E,)
    gens = iter(generators)
    if L.min() < 2:  # T5's 1-token special case: the one-at-a-time path
        return [span_corrupt(t, noise_density, mean_noise_span_length, next(gens), sentinel_ids, eos_id, prefix)
                for t in pieces]
    noise, spans = _counts(L, noise_density, mean_noise_span_length)  # (E,) each
    kept = L - noise
    sentinel_ids = np.asarray(sentinel_ids)
    if spans.max() > len(sentinel_ids):
        raise ValueError(f"example needs {int(spans.max())} sentinels but the tokenizer has "
                         f"{len(sentinel_ids)}; raise data.num_sentinels")
    # span starts over each example's noise tokens and kept tokens: [True] + the shuffled indicator
    noise_off, kept_off = np.cumsum(noise) - noise, np.cumsum(kept) - kept  # (E,)
    noise_start = np.zeros(int(noise.sum()), dtype=bool)  # (sum noise,)
    kept_start = np.zeros(int(kept.sum()), dtype=bool)  # (sum kept,)
    noise_start[noise_off] = True
    kept_start[kept_off] = True
    # as _random_segmentation(noise) then _random_segmentation(kept): the first spans-1 True, shuffled
    for g, a0, a1, b0, b1, m in zip(gens, (noise_off + 1).tolist(), (noise_off + noise).tolist(),
                                    (kept_off + 1).tolist(), (kept_off + kept).tolist(), (spans - 1).tolist()):
        a = noise_start[a0:a1]
        a[:m] = True
        g.shuffle(a)
        b = kept_start[b0:b1]
        b[:m] = True
        g.shuffle(b)
    noise_len = np.diff(np.append(np.flatnonzero(noise_start), len(noise_start)))  # (S,) S = sum spans
    kept_len = np.diff(np.append(np.flatnonzero(kept_start), len(kept_start)))  # (S,)
    S = len(noise_len)
    # span q of example e: kept run, then noise run; example e's spans are q in [span_off[e], +spans[e])
    mask = np.repeat(np.tile(np.array([False, True]), S), np.stack([kept_len, noise_len], axis=1).reshape(-1))  # (N,)
    tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t in pieces])  # (N,) N = sum L
    span_off = np.cumsum(spans) - spans  # (E,)
    span_example = np.repeat(np.arange(E), spans)  # (S,)
    span_sentinel = sentinel_ids[np.arange(S) - span_off[span_example]]  # (S,) sentinel of each span
    prefix = np.asarray(prefix, dtype=np.int64)
    P = len(prefix)
    # inputs of example e: prefix, then per span its kept run and its sentinel, then EOS
    inputs = _lay_out(tokens[~mask], kept_len, span_sentinel, span_example, kept + spans, prefix, eos_id, after=True)
    # targets: per span its sentinel and its noise run, then EOS
    targets = _lay_out(tokens[mask], noise_len, span_sentinel, span_example, noise + spans, prefix[:0], eos_id,
                       after=False)
    in_end, tgt_end = np.cumsum(kept + spans + P + 1).tolist(), np.cumsum(noise + spans + 1).tolist()
    in_start, tgt_start = [0] + in_end[:-1], [0] + tgt_end[:-1]
    return [(inputs[a:b], targets[c:d]) for a, b, c, d in zip(in_start, in_end, tgt_start, tgt_end)]


def _lay_out(run_tokens: np.ndarray, run_len: np.ndarray, sentinel: np.ndarray, span_example: np.ndarray,
             core_len: np.ndarray, prefix: np.ndarray, eos_id: int, after: bool) -> np.ndarray:
    """Flat examples `prefix + [run_0, s_0, run_1, s_1, ...] + [eos]` (after=True) or
    `prefix + [s_0, run_0, ...] + [eos]`: one run and one sentinel per span, the runs' tokens in
    order in `run_tokens`. core_len (E,) = tokens of runs and sentinels of each example."""
    E, P, S = len(core_len), len(prefix), len(run_len)
    out_len = core_len + P + 1  # (E,)
    out_end = np.cumsum(out_len)  # (E,)
    out = np.empty(int(out_end[-1]), dtype=np.int64)
    q = np.arange(S)  # global span index
    # span q's sentinel: after its own run (after) or after the previous run, + q earlier sentinels,
    # + the prefix / EOS slots of the examples up to and including its own (P before, 1 after each)
    runs_before = np.cumsum(run_len) - (0 if after else run_len)  # (S,)
    sentinel_at = runs_before + q + (P + 1) * span_example + P
    special = np.zeros(len(out), dtype=bool)
    special[sentinel_at] = True
    special[out_end - 1] = True  # EOS
    out[out_end - 1] = eos_id
    if P:
        prefix_at = ((out_end - out_len)[:, None] + np.arange(P)).reshape(-1)  # (E * P,)
        special[prefix_at] = True
        out[prefix_at] = np.tile(prefix, E)
    out[sentinel_at] = sentinel
    out[~special] = run_tokens
    return out


def merge_by_sentinels(inputs: np.ndarray, targets: np.ndarray, sentinel_ids: np.ndarray,
                       eos_id: int | None = None, prefix_length: int = 0) -> np.ndarray:
    """Invert span corruption: put each target span back at its sentinel in the inputs.

    Strips a trailing EOS from both sides (when eos_id is given) and `prefix_length` leading
    tokens (a UL2 mode token) from the inputs. Raises ValueError if the pair is inconsistent.
    """
    inputs = list(np.asarray(inputs)[prefix_length:])
    targets = list(np.asarray(targets))
    if eos_id is not None:
        if inputs and inputs[-1] == eos_id:
            inputs.pop()
        if targets and targets[-1] == eos_id:
            targets.pop()
    sentinel_index = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        k = sentinel_index.get(int(t))
        if k is not None:
            current = k
            spans[k] = []
        elif current is None:
            raise ValueError("targets do not start with a sentinel")
        else:
            spans[current].append(int(t))
    out: list[int] = []
    for t in inputs:
        k = sentinel_index.get(int(t))
        if k is None:
            out.append(int(t))
        elif k not in spans:
            raise ValueError(f"sentinel {k} of the inputs is missing from the targets")
        else:
            out.extend(spans.pop(k))
    if spans:
        raise ValueError(f"target spans {sorted(spans)} have no sentinel in the inputs")
    return np.asarray(out, dtype=np.int64)
