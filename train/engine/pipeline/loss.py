"""The last stage's loss: model_zoo.loss (cross-entropy + z-loss), the labels aligned by
model_zoo.loss.align_labels as the architecture's layout says (decoders predict the next token;
ED does not: T5)."""
from __future__ import annotations

from torch import Tensor

from model_zoo.loss import align_labels, linear_cross_entropy, lm_loss, resolve_impl

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
            _, labels = align_labels(labels, self.shift)  # (B, T)
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        self.z_loss, resolve_impl(self.loss_impl, hidden.device,
                                                                  hidden.shape[0] * hidden.shape[1], hidden.shape[-1]),
                                        self.chunk_size)[0]
        return lm_loss(*align_labels(labels, self.shift, outputs), self.z_loss)[0]


def pipeline_loss(config) -> PipelineLoss:
    return PipelineLoss(config.z_loss, shift=pipeline_layout(config).shift_labels, loss_impl=config.loss_impl,
                        chunk_size=config.loss_chunk_size)
