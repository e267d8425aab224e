"""Reading and writing the IDX format of MNIST's files, with torch and the standard library only.

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number — two zero
bytes, a type code, the number of dimensions — then one big-endian ``uint32`` per dimension, then the
values in row-major order. MNIST uses only type ``0x08`` (unsigned byte): its images are
``0x00000803`` files (count x 28 x 28) and its labels ``0x00000801`` files (count). That is the type
handled here; any number of dimensions from 1 to 255 is accepted.

Files may be raw or gzipped: which one is decided by the gzip magic bytes ``1f 8b``, not by the name.

>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
>>> write_idx(path, torch.tensor([5, 0, 4], dtype=torch.uint8), compress=True)
>>> read_idx(path, ndim=1)
tensor([5, 0, 4], dtype=torch.uint8)
"""

from __future__ import annotations

import ctypes
import gzip
import math
import os
import struct
import zlib

import torch

from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["IDXFormatError", "read_idx", "write_idx"]

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08


class IDXFormatError(ValueError):
    """A file is not a well-formed unsigned-byte IDX file (bad header, truncated, trailing bytes, bad gzip)."""


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> torch.Tensor:
    """Read an unsigned-byte IDX file, raw or gzipped, into a ``torch.uint8`` tensor of the header's shape.

    Args:
        path: the file; gzip is recognized by its magic bytes, whatever the name.
        ndim: the number of dimensions the caller expects (3 for MNIST images, 1 for labels), or
            ``None`` to accept any.

    Raises:
        IDXFormatError: the header is not ``00 00 08 NN`` (or has another ``NN`` than ``ndim``), the
            file ends before the data the header promises, it has bytes after them, or the gzip
            stream is corrupt. The message names the file and what was wrong.
        FileNotFoundError: there is no such file.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise IDXFormatError(f"corrupt gzip stream in {path}: {type(err).__name__}: {err}") from err

    if ndim is None:
        expected = "0x000008NN (two zero bytes, type 0x08 = unsigned byte, NN = 1 to 255 dimensions)"
    else:
        expected = f"0x{UBYTE << 8 | ndim:08x} (unsigned bytes, {ndim} dimension{'s' if ndim != 1 else ''})"
    if len(data) < 4:
        raise IDXFormatError(f"corrupt IDX header in {path}: expected magic {expected}, got only {len(data)} byte(s)")
    (magic,) = struct.unpack(">I", data[:4])
    zeros, code, dims = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or code != UBYTE or dims == 0 or (ndim is not None and dims != ndim):
        raise IDXFormatError(f"corrupt IDX header in {path}: expected magic {expected}, got 0x{magic:08x}")

    header_size = 4 + 4 * dims
    if len(data) < header_size:
        raise IDXFormatError(
            f"corrupt IDX header in {path}: magic 0x{magic:08x} announces {dims} dimension sizes "
            f"({header_size} header bytes) but the file has only {len(data)} bytes"
        )
    shape = struct.unpack(f">{dims}I", data[4:header_size])
    expected_size = math.prod(shape)
    got_size = len(data) - header_size
    dims_text = " x ".join(map(str, shape))
    if got_size < expected_size:
        raise IDXFormatError(
            f"truncated IDX file {path}: the header promises {expected_size} data bytes ({dims_text}) "
            f"but only {got_size} follow it"
        )
    if got_size > expected_size:
        raise IDXFormatError(
            f"trailing bytes in IDX file {path}: the header promises {expected_size} data bytes ({dims_text}) "
            f"but {got_size} follow it ({got_size - expected_size} too many)"
        )
    if expected_size == 0:
        return torch.empty(shape, dtype=torch.uint8)
    payload = bytearray(memoryview(data)[header_size:])  # writable, so torch.frombuffer does not warn
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(shape)


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, compress: bool) -> None:
    """Write a ``torch.uint8`` tensor as an IDX file, atomically (the file is complete or absent).

    Args:
        path: the destination, written as given (add ``.gz`` to the name yourself when compressing).
        tensor: unsigned bytes with 1 to 255 dimensions, each smaller than 2**32.
        compress: gzip the file (level 9, header timestamp 0, so equal tensors give equal files).

    Raises:
        ValueError: the tensor is not ``torch.uint8`` or its shape cannot be written in IDX.
    """
    if tensor.dtype != torch.uint8:
        raise ValueError(f"Expected a torch.uint8 tensor for IDX type 0x08 but got {tensor.dtype}")
    if not 1 <= tensor.dim() <= 255:
        raise ValueError(f"Expected 1 to 255 dimensions for an IDX file but got {tensor.dim()}")
    if any(size >= 2**32 for size in tensor.shape):
        raise ValueError(f"Expected every dimension below 2**32 for an IDX file but got {tuple(tensor.shape)}")
    header = struct.pack(f">HBB{tensor.dim()}I", 0, UBYTE, tensor.dim(), *tensor.shape)
    data = header + _tensor_bytes(tensor)
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic_write_bytes(path, data)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a uint8 tensor in row-major order, without numpy."""
    flat = tensor.detach().to("cpu").contiguous()
    if flat.numel() == 0:
        return b""
    return ctypes.string_at(flat.data_ptr(), flat.numel())
