"""The last stage's loss: model_zoo.loss (cross-entropy + z-loss), shifted as the architecture's
layout says (decoders predict the next token; ED does not: T5)."""
from __future__ import annotations

from torch import Tensor

from model_zoo.loss import linear_cross_entropy, lm_loss, resolve_impl, shift_labels

from .specs import pipeline_layout


class PipelineLoss:
    """The last stage's loss: model_zoo's lm_loss (cross-entropy + z-loss) of the logits, or its
    fused linear_cross_entropy of (hidden, head weight); shifted for decoders."""

    def __init__(self, z_loss: float, shift: bool, loss_impl: str = "dense", chunk_size: int = 1024):
        self.z_loss, self.shift, self.loss_impl, self.chunk_size = z_loss, shift, loss_impl, chunk_size
        self.__name__ = "lm_loss_shifted" if shift else "lm_loss"

    def __call__(self, outputs, labels: Tensor) -> Tensor:
        if isinstance(outputs, tuple):  # fused: (hidden [B, T, D], weight [V, D]) from the head layer
            hidden, weight = outputs
            if self.shift:
                labels = shift_labels(labels)  # [B, T]: the last position predicts nothing
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        self.z_loss, resolve_impl(self.loss_impl, hidden.device,
                                                                  hidden.shape[0] * hidden.shape[1], hidden.shape[-1]),
                                        self.chunk_size)[0]
        logits = outputs
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]  # predict the next token
        return lm_loss(logits, labels, self.z_loss)[0]



def pipeline_loss(config) -> PipelineLoss:
    return PipelineLoss(config.z_loss, shift=pipeline_layout(config).shift_labels, loss_impl=config.loss_impl,
                        chunk_size=config.loss_chunk_size)
