"""The activation tuple between pipeline layers, named field by field."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


class Carry:
    """The names, in order, of the tensors one pipeline layer hands the next.

    DeepSpeed moves plain tuples of tensors (a single tensor when there is one); `pack` and
    `unpack` turn them into a dict by name so that no layer relies on a positional convention.
    """

    def __init__(self, *names: str):
        self.names = tuple(names)

    def unpack(self, inputs) -> dict[str, Tensor]:
        if torch.is_tensor(inputs):
            inputs = (inputs,)
        if len(inputs) != len(self.names):
            raise ValueError(f"pipeline layer expected {len(self.names)} tensors ({', '.join(self.names)}), "
                             f"got {len(inputs)}")
        return dict(zip(self.names, inputs))

    def pack(self, values: Mapping[str, Tensor]):
        out = tuple(values[n] for n in self.names)
        return out[0] if len(out) == 1 else out

    def __repr__(self) -> str:
        return f"Carry{self.names}"


_HIDDEN = Carry("hidden")  # the carry after a stack's last block: the residual stream alone
