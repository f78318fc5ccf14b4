"""The mask module on cases small enough to check by hand."""
import torch

from model_zoo.masks import MaskSpec, relative_position_bucket


def dense(spec, b=1):
    return spec.dense(b, "cpu")[0]


def test_cd_packed_golden():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    m = dense(MaskSpec(seg, 6, 6, causal=True))[0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_nd_prefix_golden():
    # two examples: the first has a 2-token prefix, the second a 1-token prefix
    seg = torch.tensor([[1, 1, 1, 1, 2, 2]])
    bidir = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    m = dense(MaskSpec(seg, 6, 6, causal=True, bidir=bidir))[0].int().tolist()
    assert m == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def test_mixed_heads_are_triangular_over_the_prefix_and_causal_after():
    bidir = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    m = dense(MaskSpec(None, 5, 5, causal=True, bidir=bidir, direction="mixed_heads", n_heads=4))
    assert m.shape == (4, 5, 5)
    fwd, bwd = m[0].int().tolist(), m[3].int().tolist()
    assert fwd == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert bwd == [[1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])
    # together the heads see the whole prefix: the block stays bidirectional
    assert (m[0] | m[3])[:3, :3].all()


def test_encoder_and_cross_attention():
    seg = torch.tensor([[1, 1, 2, 0]])
    enc = dense(MaskSpec(seg, 4, 4, causal=False))[0].int().tolist()
    assert enc == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    dseg = torch.tensor([[1, 2, 2]])
    cross = dense(MaskSpec(seg, 3, 4, causal=False, cross=True, cross_q_segments=dseg))[0].int().tolist()
    assert cross == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    backward = dense(MaskSpec(None, 3, 3, causal=False, direction="backward"))[0].int().tolist()
    assert backward == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]


def test_kv_cache_offset():
    # 2 new queries after 3 cached keys: query i is key 3 + i
    m = dense(MaskSpec(None, 2, 5, causal=True, offset=3))[0].int().tolist()
    assert m == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert MaskSpec(None, 2, 5, causal=True, offset=3).plain() is None
    assert MaskSpec(None, 1, 5, causal=True, offset=4).plain() == "full"
    assert MaskSpec(None, 5, 5, causal=True).plain() == "causal"
    seg = torch.ones(1, 5, dtype=torch.long)
    assert MaskSpec(seg, 5, 5, causal=True).plain() is None
    # with segments and a cache: query i reads the segment of key offset + i
    seg = torch.tensor([[1, 1, 2, 2, 2]])
    m = dense(MaskSpec(seg, 2, 5, causal=True, offset=3))[0].int().tolist()
    assert m == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_t5_buckets_golden():
    rel = torch.tensor([-200, -128, -9, -8, -7, -1, 0, 1, 7, 8, 9, 200])
    # bidirectional, 32 buckets, max distance 128: 16 per sign, 8 exact, then log-spaced
    got = relative_position_bucket(rel, True, 32, 128).tolist()
    assert got == [15, 15, 8, 8, 7, 1, 0, 17, 23, 24, 24, 31]
    # unidirectional: the future maps to bucket 0; 16 exact then log-spaced up to 31
    got = relative_position_bucket(torch.tensor([5, 0, -1, -15, -16, -127, -128, -1000]), False, 32, 128).tolist()
    assert got == [0, 0, 1, 15, 16, 31, 31, 31]
