"""Grayscale PNG files from tensors, with the standard library only (``zlib`` and ``struct``).

A PNG file (ISO/IEC 15948) is an 8-byte signature and a sequence of chunks, each
``length | type | data | CRC-32(type + data)``: here ``IHDR`` (width, height, bit depth 8, color
type 0 = grayscale), one ``IDAT`` (the zlib-compressed rows, each prefixed by filter type 0) and
``IEND``. Enough for sample grids, without adding an imaging library to rnorm's dependencies.

>>> data = encode_png(torch.tensor([[0.0, 1.0], [0.5, 0.25]]))
>>> data[:8] == PNG_SIGNATURE, struct.unpack(">II", data[16:24])
(True, (2, 2))
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch

from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["PNG_SIGNATURE", "encode_png", "image_grid", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: torch.Tensor) -> bytes:
    """The PNG bytes of a grayscale image.

    Args:
        image: ``(H, W)``: floats in [0, 1] (clamped, then scaled to 0–255 and rounded) or uint8.
    """
    if image.dim() != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"Expected a non-empty (H, W) image but got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    height, width = image.shape
    rows = torch.cat([image.new_zeros(height, 1), image.cpu()], dim=1)  # (H, 1 + W): filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = bytes(rows.contiguous().view(-1).tolist())
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write ``image`` (see :func:`encode_png`) as a PNG file, never half-written; returns the path."""
    atomic_write_bytes(path, encode_png(image))
    return Path(path)


def image_grid(images: torch.Tensor, columns: int = 8, padding: int = 1, pad_value: float = 0.5) -> torch.Tensor:
    """Tile ``(N, H, W)`` images into one ``(rows * (H + p) + p, columns * (W + p) + p)`` image, row by row.

    Cells beyond ``N`` in the last row are left at ``pad_value``.

    >>> image_grid(torch.ones(3, 2, 2), columns=2, padding=1, pad_value=0).shape
    torch.Size([7, 7])
    """
    if images.dim() != 3 or len(images) == 0:
        raise ValueError(f"Expected non-empty (N, H, W) images but got shape {tuple(images.shape)}")
    if columns < 1 or padding < 0:
        raise ValueError(f"Expected columns >= 1 and padding >= 0 but got {columns} and {padding}")
    count, height, width = images.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = images.new_full((rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value)
    for n in range(count):
        top = padding + (n // columns) * (height + padding)
        left = padding + (n % columns) * (width + padding)
        grid[top : top + height, left : left + width] = images[n]
    return grid
