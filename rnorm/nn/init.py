"""Weight initializers of the normalized LSTM, applied per gate block (i, f, g, o)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

INPUT_INITS = ("orthogonal", "uniform")
RECURRENT_INITS = ("orthogonal", "identity", "uniform")


@torch.no_grad()
def init_gate_blocks(weight: Tensor, scheme: str) -> None:
    """Initialize each of the four ``(H, fan_in)`` gate blocks of ``weight`` ``(4H, fan_in)`` in place.

    * ``orthogonal``: each block orthogonal (BN §5.1–5.3, NP §5.1);
    * ``identity``: each block the identity, for square blocks (``W_h`` in BN §5.1);
    * ``uniform``: ``U(-1/sqrt(H), 1/sqrt(H))``, ``torch.nn.LSTM``'s default.
    """
    hidden = weight.shape[0] // 4
    for block in weight.split(hidden, dim=0):
        if scheme == "orthogonal":
            nn.init.orthogonal_(block)
        elif scheme == "identity":
            if block.shape[0] != block.shape[1]:
                raise ValueError(f"The identity initializer needs square gate blocks, but they are {tuple(block.shape)}.")
            block.copy_(torch.eye(hidden, dtype=block.dtype))
        elif scheme == "uniform":
            bound = hidden**-0.5
            nn.init.uniform_(block, -bound, bound)
        else:
            raise ValueError(f"Unknown initializer {scheme!r}; expected one of {RECURRENT_INITS}.")
