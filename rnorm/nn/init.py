"""Weight initializers of the normalized LSTM, applied per gate block (i, f, g, o) or per group of blocks.

An initializer is given either as one scheme name, applied to each of the four gate blocks
separately (``"orthogonal"``: four orthogonal ``(H, fan_in)`` blocks), or as a mapping from groups
of gates to schemes, each group drawn as **one** matrix over its blocks. The authors' code of BN §5.1
(``sequential_mnist.py --init id``) is ``{"g": "identity", "ifo": "orthogonal"}``: the candidate
block of ``W_h`` is the identity and the other three blocks are one orthogonal ``(3H, H)`` matrix;
their ``W_x`` is one orthogonal ``(4H, D)`` matrix, ``{"ifgo": "orthogonal"}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

INPUT_INITS = ("orthogonal", "uniform")
RECURRENT_INITS = ("orthogonal", "identity", "uniform")
#: The gate blocks' order in ``weight_ih`` and ``weight_hh`` (``torch.nn.LSTM``'s).
GATES = "ifgo"

#: One scheme for each block separately, or ``{gates: scheme}`` with each group one matrix.
GateInit = str | dict[str, str]


def gate_groups(spec: GateInit, schemes: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    """Check an initializer ``spec`` and return it as ``[(gates, scheme), …]``, one entry per group.

    A single name becomes four one-gate groups (today's per-block initialization).

    Args:
        spec: a scheme name, or a mapping whose keys together name each gate of ``"ifgo"`` once.
        schemes: the allowed scheme names.
        option: the option's name, for error messages (``"recurrent_init"``).

    Raises:
        TypeError: ``spec`` is neither a name nor a mapping.
        ValueError: an unknown scheme, keys that do not partition the gates, or ``identity`` on a
            group of more than one gate (the identity is one square block).

    >>> gate_groups({"g": "identity", "ifo": "orthogonal"}, RECURRENT_INITS, "recurrent_init")
    [('g', 'identity'), ('ifo', 'orthogonal')]
    """
    if isinstance(spec, str):
        if spec not in schemes:
            raise ValueError(f"Unknown {option} {spec!r}; expected one of {schemes}.")
        return [(gate, spec) for gate in GATES]
    if not isinstance(spec, Mapping):
        raise TypeError(f"Expected {option} to be a scheme name or a mapping of gates to schemes, but got {spec!r}.")
    groups = [(str(gates), scheme) for gates, scheme in spec.items()]
    named = "".join(gates for gates, _ in groups)
    if sorted(named) != sorted(GATES):
        raise ValueError(
            f"Expected the keys of {option} to name each gate of {GATES!r} exactly once "
            f"(e.g. {{'g': 'identity', 'ifo': 'orthogonal'}}), but got {sorted(spec)}."
        )
    for gates, scheme in groups:
        if scheme not in schemes:
            raise ValueError(f"Unknown {option} {scheme!r} for gates {gates!r}; expected one of {schemes}.")
        if scheme == "identity" and len(gates) > 1:
            raise ValueError(
                f"{option}: the identity initializes one square gate block, but {gates!r} groups {len(gates)}."
            )
    return groups


@torch.no_grad()
def init_gate_blocks(weight: Tensor, scheme: GateInit, schemes: tuple[str, ...] = RECURRENT_INITS) -> None:
    """Initialize the gate blocks of ``weight`` ``(4H, fan_in)`` in place, block by block or by groups.

    * ``orthogonal``: the group's ``(k H, fan_in)`` matrix orthogonal (BN §5.1–5.3, NP §5.1): with a
      single block each block is orthogonal; ``{"ifgo": "orthogonal"}`` makes the whole ``weight``
      one orthogonal matrix, as the authors' code does;
    * ``identity``: the block the identity, for square blocks (``W_h`` in BN §5.1);
    * ``uniform``: ``U(-1/sqrt(H), 1/sqrt(H))``, ``torch.nn.LSTM``'s default.

    Args:
        weight: ``(4H, fan_in)``, gate blocks in the order of :data:`GATES`.
        scheme: see :func:`gate_groups`.
        schemes: the allowed scheme names.
    """
    hidden = weight.shape[0] // 4
    blocks = dict(zip(GATES, weight.split(hidden, dim=0)))  # gate: (H, fan_in) view
    for gates, name in gate_groups(scheme, schemes, "initializer"):
        group = torch.empty(len(gates) * hidden, weight.shape[1], dtype=weight.dtype)  # (k H, fan_in)
        if name == "orthogonal":
            nn.init.orthogonal_(group)
        elif name == "identity":
            if weight.shape[1] != hidden:
                shape = (hidden, weight.shape[1])
                raise ValueError(f"The identity initializer needs square gate blocks, but they are {shape}.")
            group.copy_(torch.eye(hidden, dtype=weight.dtype))
        else:  # uniform
            bound = hidden**-0.5
            nn.init.uniform_(group, -bound, bound)
        for gate, rows in zip(gates, group.split(hidden, dim=0)):
            blocks[gate].copy_(rows)
