"""The encoder-decoder family (ED): inputs in a bidirectional encoder, targets in a causal
decoder with cross-attention; examples are matched across the two rows by segment id."""
from __future__ import annotations

from dataclasses import dataclass

from .layers import encoder_decoder_layout
from .spec import ArchSpec, Lengths, segments, train_flops


@dataclass(frozen=True)
class EncoderDecoderSpec(ArchSpec):
    family = "encoder_decoder"
    unfit = {"flm": "has no encoder input"}  # the one place that says ED takes no FLM

    @property
    def model_class(self):
        from model_zoo import EncoderDecoderLM

        return EncoderDecoderLM

    def accepts_weights_of(self, other: ArchSpec) -> bool:
        """The same family with the same model_options: shared encoder / decoder weights (EDS)
        have other parameters than ED's."""
        return self.same_family(other) and dict(self.model_options) == dict(other.model_options)

    @property
    def layout(self):
        """How train/objectives lays out this architecture's rows."""
        from ..objectives.rows import EncoderDecoderLayout

        return EncoderDecoderLayout()

    def score_continuations(self, scorer, batch) -> list:
        """The context to the encoder (its end kept at max_length), the continuation to the decoder
        after the decoder start token; logits aligned with the continuation. Each distinct context
        of the batch is encoded once (the choices of one prompt share its encoder pass)."""
        import torch

        ctxs = [tuple(scorer.truncate(ctx, scorer.max_length)) for ctx, _ in batch]
        unique = list(dict.fromkeys(ctxs))
        which = torch.tensor([unique.index(c) for c in ctxs])
        tgts = [tgt for _, tgt in batch]
        Ti, To = max(map(len, unique)), max(map(len, tgts))
        start = scorer.model.config.decoder_start_token_id
        enc = torch.full((len(unique), Ti), scorer.pad_id, dtype=torch.long)
        enc_mask = torch.zeros((len(unique), Ti), dtype=torch.long)
        for u, c in enumerate(unique):
            enc[u, :len(c)] = torch.tensor(c)
            enc_mask[u, :len(c)] = 1
        dec = torch.full((len(batch), To), scorer.pad_id, dtype=torch.long)
        for b, t in enumerate(tgts):
            dec[b, :len(t)] = torch.tensor([start] + t[:-1])
        dev = scorer.device
        model, mask = scorer.model, enc_mask.to(dev)
        hidden = model.encoder(enc.to(dev), attention_mask=mask).last_hidden_state  # (U, Ti, D)
        which = which.to(dev)
        logits = model(encoder_outputs=(hidden[which],), attention_mask=mask[which],
                       decoder_input_ids=dec.to(dev)).logits  # (B, To, V), aligned with labels
        return [scorer.score(logits[b, :len(t)], t) for b, t in enumerate(tgts)]

    def generated_tokens(self, generated, context_length: int):
        """The new tokens of `model.generate`'s first row: the decoder's output is all new."""
        return generated[0]

    def attention_views(self, model, ids, prefix: int) -> dict[str, list[dict]]:
        """archscale analyze: the first half of each row to the encoder (bidirectional), the
        second to the decoder (causal); `prefix` is not used. Then the encoder (the bidirectional
        block) of the same weights as a causal (forward) and as a mixed-direction encoder."""
        from model_zoo.analysis import attention_spectra

        cfg = model.config
        half = ids.shape[1] // 2
        batch = {"input_ids": ids[:, :half], "decoder_input_ids": ids[:, half:]}
        rows = attention_spectra(model, batch)
        views = {"bidirectional (encoder)": [r for r in rows if r["stack"] == "encoder"],
                 "causal (decoder)": [r for r in rows if r["stack"] == "decoder"]}
        mixed = "mixed_heads" if cfg.n_heads % 2 == 0 else "mixed_layers"
        was = cfg.bidirectional_mode
        try:
            for name, mode in (("causal: encoder (forward)", "forward"), (f"mixed-direction: encoder ({mixed})", mixed)):
                cfg.bidirectional_mode = mode
                views[name] = attention_spectra(model, batch, block="bidirectional")
        finally:
            cfg.bidirectional_mode = was
        return views

    def attention_full_rank(self, ids) -> int:
        """Each stack sees half of a row."""
        return ids.shape[1] // 2

    def row_flops(self, config, objective) -> float:
        """Encoder / decoder rows as the row shape gives them (`row_shape`, the rows the packer
        fills). mlm, ul2, prompted: one example of inputs_length / targets_length. plm: the row
        holds k = tokens_per_row // n examples of n = the layout's plm_piece (seq_length // k)
        tokens, each split uniformly (the mean over split points), plus the padding of both rows
        (encoder_length - k n / 2 and decoder_length - k n / 2 on average) counted as one more
        example, as the model computes it."""
        shape = self.row_shape(objective)
        enc, dec = shape.lengths
        if objective.name != "plm":
            return train_flops(config, enc, target_len=dec)
        n = self.layout.plm_piece(objective, None, shape)
        k = shape.tokens_per_row // n
        real = k * sum(train_flops(config, p, target_len=n - p) for p in range(1, n)) / (n - 1)
        pad_enc, pad_dec = (int(round(side - k * n / 2)) for side in (enc, dec))  # tokens of padding, on average
        return real + train_flops(config, pad_enc, target_len=pad_dec)

    def random_batch(self, rows: int, lengths: Lengths, vocab_size: int, generator) -> dict:
        import torch

        Ti, To = lengths.encoder, lengths.decoder
        x = torch.randint(2, vocab_size, (rows, Ti), generator=generator)
        y = torch.randint(2, vocab_size, (rows, To), generator=generator)
        return dict(input_ids=x, segment_ids=torch.ones_like(x), position_ids=torch.arange(Ti).expand(rows, -1),
                    decoder_input_ids=y, labels=y, decoder_segment_ids=torch.ones_like(y),
                    decoder_position_ids=torch.arange(To).expand(rows, -1))

    def batch_flops(self, config, batch: dict) -> float:
        total = 0.0
        for enc_runs, dec_runs in zip(segments(batch["segment_ids"]), segments(batch["decoder_segment_ids"])):
            enc, dec = {}, {}
            for s, n in enc_runs:
                enc[s] = enc.get(s, 0) + n
            for s, n in dec_runs:
                dec[s] = dec.get(s, 0) + n
            for s in set(enc) | set(dec):
                total += train_flops(config, enc.get(s, 0), target_len=dec.get(s, 0))
        return total

    def num_layers(self, config) -> int:
        """Encoder + decoder blocks (n_encoder_layers + n_decoder_layers; n_layers each by default)."""
        return config.encoder_depth + config.decoder_depth

    def pipeline_layers_layout(self, config):
        """The encoder stack, then the decoder stack reading the encoder output."""
        return encoder_decoder_layout(config)

    def pipeline_refusal(self, config) -> str:
        """Shared encoder / decoder weights: decoder block i runs encoder block i's, which may sit
        on another stage (and the pipeline's layers load their weights by key prefix)."""
        if config.share_encoder_decoder:
            return ("share_encoder_decoder=true cannot be pipelined (decoder block i runs encoder block i's "
                    "weights, which may sit on another stage): use parallel.pipeline_stages=1 (ZeRO shards it)")
        return ""

    def describe_blocks(self, config) -> str:
        shared = " (sharing their self-attention and MLP weights)" if config.share_encoder_decoder else ""
        return f"{config.encoder_depth} encoder + {config.decoder_depth} decoder layers{shared}"

    def pipeline_carry_tokens(self, lengths: Lengths) -> int:
        """The residual stream and the encoder output, each bounded by the longer row."""
        return 2 * max(lengths.encoder, lengths.decoder)
