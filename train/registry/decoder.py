"""The decoder family (CD, ND): one stack over rows of packed documents; ND attends its
documents' prefixes bidirectionally (`bidirectional_prefix`)."""
from __future__ import annotations

from dataclasses import dataclass

from .layers import decoder_layout
from .spec import ArchSpec, Lengths, segments, train_flops


@dataclass(frozen=True)
class DecoderSpec(ArchSpec):
    family = "decoder"

    @property
    def model_class(self):
        from model_zoo import DecoderLM

        return DecoderLM

    @property
    def bidirectional_prefix(self) -> bool:
        """A row's prefix is attended bidirectionally (ND): the entry's prefix_attention."""
        return bool(self.model_options.get("prefix_attention", False))

    @property
    def layout(self):
        """How train/objectives lays out this architecture's rows."""
        from ..objectives.rows import DecoderLayout

        return DecoderLayout(self.bidirectional_prefix)

    def score_continuations(self, scorer, batch) -> list:
        """One row per (context, continuation): context ++ continuation[:-1] (the last token is
        predicted, never read), right-padded; the context is the row's prefix (bidirectional for
        ND, through prefix_lengths; CD's model ignores it)."""
        import torch

        rows, prefix = [], []
        for ctx, tgt in batch:
            # the last continuation token is predicted, never read: rows of len(ctx) + len(tgt) - 1
            ctx = scorer.truncate(ctx, None if scorer.max_length is None else scorer.max_length - len(tgt) + 1)
            rows.append(ctx + tgt[:-1])
            prefix.append(len(ctx))
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), scorer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        dev = scorer.device
        logits = scorer.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                              prefix_lengths=torch.tensor(prefix, device=dev)).logits  # (B, T, V)
        # (n, V) per request: position t predicts token t+1 (softmax over these rows only: memory)
        return [scorer.score(logits[b, p - 1:p - 1 + len(tgt)], tgt)
                for b, ((_, tgt), p) in enumerate(zip(batch, prefix))]

    @property
    def reads_context_causally(self) -> bool:
        """CD: the context is read causally, like the continuation."""
        return not self.bidirectional_prefix

    def generated_tokens(self, generated, context_length: int):
        """The new tokens of `model.generate`'s first row: a decoder returns the context too."""
        return generated[0, context_length:]

    def attention_views(self, model, ids, prefix: int) -> dict[str, list[dict]]:
        """archscale analyze: the same weights with the causal mask (CD) and with the first
        `prefix` tokens bidirectional (ND): only the mask differs. Whole matrices, then the
        prefix block alone (where the low-rank argument applies) under the CD, ND and
        mixed-direction ND masks (mixed_heads; mixed_layers for an odd number of heads)."""
        import torch
        from model_zoo.analysis import attention_spectra

        cfg = model.config
        was = cfg.prefix_attention, cfg.bidirectional_mode
        batch = {"input_ids": ids, "prefix_lengths": torch.full((ids.shape[0],), prefix)}
        mixed = "mixed_heads" if cfg.n_heads % 2 == 0 else "mixed_layers"
        views = {}
        try:
            for name, nd, mode, block in (
                    ("causal (CD mask)", False, was[1], "segment"),
                    (f"prefix {prefix} bidirectional (ND mask)", True, was[1], "segment"),
                    (f"causal: prefix block {prefix} (CD mask)", False, was[1], "bidirectional"),
                    (f"bidirectional: prefix block {prefix} (ND mask)", True, "full", "bidirectional"),
                    (f"mixed-direction: prefix block {prefix} (ND {mixed})", True, mixed, "bidirectional")):
                cfg.prefix_attention, cfg.bidirectional_mode = nd, mode
                views[name] = attention_spectra(model, batch if nd or block != "segment" else {"input_ids": ids},
                                                block=block)
        finally:
            cfg.prefix_attention, cfg.bidirectional_mode = was
        return views

    def attention_full_rank(self, ids) -> int:
        """The rank a full attention matrix over `ids` rows can have."""
        return ids.shape[1]

    def row_flops(self, config, objective) -> float:
        """One row of seq_length T: causal (CD, and every FLM row); ND: prefix = inputs_length for
        mlm / ul2 / prompted, uniform over the row for plm (the mean over split points). T is the
        row shape's (`row_shape`: the rows the packer fills)."""
        o, T = objective, self.row_shape(objective).tokens_per_row
        if not self.bidirectional_prefix or o.name == "flm":
            return train_flops(config, T)
        if o.name == "plm":
            return sum(train_flops(config, T, prefix_len=p) for p in range(1, T)) / (T - 1)
        return train_flops(config, T, prefix_len=min(o.inputs_length, T - 1))

    def random_batch(self, rows: int, lengths: Lengths, vocab_size: int, generator) -> dict:
        """ND: a random bidirectional prefix per row, no loss on it; CD: every token a target."""
        import torch

        T = lengths.decoder
        ids = torch.randint(2, vocab_size, (rows, T), generator=generator)
        prefix = torch.randint(1, T, (rows,), generator=generator)
        bidir = (torch.arange(T)[None, :] < prefix[:, None]) & self.bidirectional_prefix
        labels = ids.masked_fill(bidir, -100)
        return dict(input_ids=ids, labels=labels, segment_ids=torch.ones_like(ids),
                    position_ids=torch.arange(T).expand(rows, -1), bidirectional=bidir)

    def batch_flops(self, config, batch: dict) -> float:
        """Attention counted per example as its mask requires (model_zoo.train_flops summed over
        the examples; padding counts as computed)."""
        seg, bidir = batch["segment_ids"], batch.get("bidirectional")
        total = 0.0
        for b, runs in enumerate(segments(seg)):
            start = 0
            for _, n in runs:
                p = int(bidir[b, start:start + n].sum()) if bidir is not None else 0
                total += train_flops(config, n, prefix_len=p)
                start += n
        return total

    def num_layers(self, config) -> int:
        return config.n_layers

    def pipeline_layers_layout(self, config):
        """One stack; ND carries its prefix flags."""
        return decoder_layout(config, self.bidirectional_prefix)

    def describe_blocks(self, config) -> str:
        return f"{self.num_layers(config)} layers"

    def pipeline_carry_tokens(self, lengths: Lengths) -> int:
        """The residual stream of the row."""
        return lengths.decoder
