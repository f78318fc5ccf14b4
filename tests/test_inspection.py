"""archscale inspect: what the objective defines is exactly what the printout marks, and the
mask pictures are the model's masks pixel for pixel."""
import matplotlib.image
import pytest
import torch

from train.commands.inspection import PREFIX, TARGET, INPUT, PAD, render_batch, row_masks, save_mask_pictures, token_roles


class CharTok:
    """A tokenizer stand-in: id i <-> chr(ord('a') + i), sentinels from id 100 down."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<extra_id_{100 - i}>" if i > 90 else chr(ord("a") + i) for i in ids)


def decoder_batch(nd: bool):
    # two examples in one row: "abcd" (prefix "ab", target "cd") and "efg" (prefix "e", target "fg"), 1 pad
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0]])
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0]])
    labels = torch.tensor([[-100, -100, 2, 3, -100, 5, 6, -100]])
    bidir = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool) & nd
    return dict(input_ids=ids, labels=labels, segment_ids=seg, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]]),
                bidirectional=bidir)


@pytest.mark.parametrize("nd", [False, True])
def test_decoder_roles_follow_the_objectives_loss_mask_and_prefix(nd):
    batch = decoder_batch(nd)
    roles = [r for _, _, r in token_roles(batch, 0)]
    labels, bidir = batch["labels"][0], batch["bidirectional"][0]
    for t, role in enumerate(roles):
        assert (role == TARGET) == bool(labels[t] != -100)
        assert (role == PREFIX) == bool(bidir[t])
    assert roles[-1] == PAD
    text = render_batch(batch, CharTok(), rows=1)
    if nd:
        assert "⟦ab⟧«cd»" in text and "⟦e⟧«fg»" in text
    else:
        assert "‹ab›«cd»" in text and "‹e›«fg»" in text
    assert "[example 1, 4 tokens]" in text and "[example 2, 3 tokens]" in text and "∅" in text


def test_ed_roles_and_sentinels():
    # span corruption of "abcdef": input "a⟨0⟩def", target "⟨0⟩bc"; a second example "gh" -> "⟨0⟩h"
    s0 = 100  # <extra_id_0>
    batch = dict(input_ids=torch.tensor([[0, s0, 3, 4, 5, 6, s0, 0]]), segment_ids=torch.tensor([[1, 1, 1, 1, 1, 2, 2, 0]]),
                 labels=torch.tensor([[s0, 1, 2, s0, 7, -100]]), decoder_segment_ids=torch.tensor([[1, 1, 1, 2, 2, 0]]),
                 decoder_input_ids=torch.tensor([[0, s0, 1, 0, s0, 0]]))
    enc = [r for _, _, r in token_roles(batch, 0)]
    assert enc == [PREFIX] * 7 + [PAD]
    dec = token_roles(batch, 0, decoder_side=True)
    assert [r for _, _, r in dec] == [TARGET] * 5 + [PAD]
    assert [t for _, t, _ in dec][:3] == [s0, 1, 2]  # the targets, not the shifted decoder inputs
    text = render_batch(batch, CharTok(), rows=1)
    assert "⟦a⟨0⟩def⟧" in text and "«⟨0⟩bc»" in text and "«⟨0⟩h»" in text and "-> decoder" in text


@pytest.mark.parametrize("kind", ["nd", "ed"])
def test_mask_pictures_equal_the_model_masks(tmp_path, kind):
    if kind == "nd":
        batch = decoder_batch(True)
    else:
        batch = dict(input_ids=torch.zeros(1, 6, dtype=torch.long), segment_ids=torch.tensor([[1, 1, 1, 2, 2, 0]]),
                     decoder_input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long),
                     decoder_segment_ids=torch.tensor([[1, 1, 2, 2]]))
    masks = row_masks(batch, 0)
    paths = save_mask_pictures(batch, tmp_path)
    assert (tmp_path / "masks.png") in paths
    for name, m in masks.items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        path = next(p for p in paths if p.name.startswith("mask-") and all(w in p.name for w in slug.split("-") if w))
        pixels = matplotlib.image.imread(path)[..., 0] > 0.5
        assert torch.equal(torch.from_numpy(pixels), m), name
    if kind == "nd":
        full = masks["ND prefix full"]
        assert full[0, 1] and not full[0, 2]  # the prefix is bidirectional, never sees its target
        assert not full[4, 3]  # no example sees another
        fwd = masks["ND prefix mixed_heads (heads 0-1: forward)"]
        assert not fwd[0, 1] and masks["ND prefix mixed_heads (heads 2-3: backward)"][0, 1]
    else:
        cross = masks["cross-attention"]
        assert cross[0, :3].all() and not cross[0, 3:].any() and cross[2, 3:5].all()
