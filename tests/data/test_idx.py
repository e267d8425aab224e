"""IDX files: round trips raw and gzipped, and clear errors naming the file for every kind of damage.

The reference for the format is written out by hand here (``struct`` on the header, the bytes of the
values), independently of ``write_idx``.
"""

import gzip
import struct

import pytest
import torch

from rnorm.data import IDXFormatError, read_idx, write_idx


def _idx_bytes(values: list[int], shape: tuple[int, ...]) -> bytes:
    """An unsigned-byte IDX file as the format describes it: 00 00 08 ndim, big-endian sizes, values."""
    return bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + bytes(values)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 28, 28), (0, 28, 28)])
def test_round_trip(tmp_path, shape, compress):
    tensor = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "data.idx"
    write_idx(path, tensor, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    got = read_idx(path)
    assert got.dtype == torch.uint8 and got.shape == shape
    assert torch.equal(got, tensor)
    assert list(path.parent.iterdir()) == [path]  # the atomic write leaves no temporary file


def test_written_bytes_follow_the_format(tmp_path):
    tensor = torch.tensor([[1, 2, 3], [250, 251, 252]], dtype=torch.uint8)
    write_idx(tmp_path / "raw", tensor, compress=False)
    write_idx(tmp_path / "packed", tensor, compress=True)
    expected = _idx_bytes([1, 2, 3, 250, 251, 252], (2, 3))
    assert (tmp_path / "raw").read_bytes() == expected
    assert gzip.decompress((tmp_path / "packed").read_bytes()) == expected


def test_non_contiguous_tensor_is_written_in_row_major_order(tmp_path):
    tensor = torch.arange(6, dtype=torch.uint8).reshape(2, 3).t()  # (3, 2), not contiguous
    write_idx(tmp_path / "t", tensor, compress=False)
    assert (tmp_path / "t").read_bytes() == _idx_bytes([0, 3, 1, 4, 2, 5], (3, 2))


def test_gzip_is_detected_by_magic_bytes_not_by_name(tmp_path):
    expected = _idx_bytes(list(range(10)), (10,))
    (tmp_path / "labels.gz").write_bytes(expected)  # raw despite the name
    (tmp_path / "labels").write_bytes(gzip.compress(expected))  # gzipped despite the name
    for name in ("labels.gz", "labels"):
        assert read_idx(tmp_path / name).tolist() == list(range(10))


def test_compressed_output_is_reproducible(tmp_path):
    tensor = torch.arange(100, dtype=torch.uint8).reshape(10, 10)
    write_idx(tmp_path / "a.gz", tensor, compress=True)
    write_idx(tmp_path / "b.gz", tensor, compress=True)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x08", "got only 3 byte(s)"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\x00" * 4, "got 0x00000d01"),  # float32: not MNIST's type
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "got 0x01000801"),
        (bytes([0, 0, 8, 0]), "got 0x00000800"),  # no dimensions
        (b"PK\x03\x04 not an idx file", "got 0x504b0304"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_header_names_the_file(tmp_path, data, message, compress):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(IDXFormatError, match="corrupt IDX header") as info:
        read_idx(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "expected magic 0x000008NN" in str(info.value)


def test_unexpected_number_of_dimensions(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes([1, 2], (2,)))
    with pytest.raises(IDXFormatError) as info:
        read_idx(path, ndim=3)
    assert str(info.value) == (
        f"corrupt IDX header in {path}: expected magic 0x00000803 (unsigned bytes, 3 dimensions), got 0x00000801"
    )
    assert read_idx(path, ndim=1).tolist() == [1, 2]


def test_header_cut_inside_the_sizes(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 2))
    with pytest.raises(IDXFormatError, match=r"announces 3 dimension sizes \(16 header bytes\).* only 8 bytes"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload(tmp_path, compress):
    data = _idx_bytes(list(range(24)), (2, 3, 4))[:-5]
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(IDXFormatError) as info:
        read_idx(path)
    assert str(info.value) == (
        f"truncated IDX file {path}: the header promises 24 data bytes (2 x 3 x 4) but only 19 follow it"
    )


def test_trailing_bytes(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes([1, 2, 3], (3,)) + b"\x00\x00")
    with pytest.raises(IDXFormatError) as info:
        read_idx(path)
    assert str(info.value) == (
        f"trailing bytes in IDX file {path}: the header promises 3 data bytes (3) but 5 follow it (2 too many)"
    )


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_corrupt_gzip_stream(tmp_path, damage):
    packed = bytearray(gzip.compress(_idx_bytes(list(range(200)), (200,))))
    if damage == "cut":
        packed = packed[: len(packed) // 2]
    else:
        packed[-6] ^= 0xFF  # inside the CRC32 trailer
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(IDXFormatError, match="corrupt gzip stream in") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(3, dtype=torch.int64), "torch.uint8"),
        (torch.zeros((), dtype=torch.uint8), "1 to 255 dimensions"),
    ],
)
def test_write_rejects_what_idx_type_0x08_cannot_hold(tmp_path, tensor, message):
    with pytest.raises(ValueError, match=message):
        write_idx(tmp_path / "x", tensor, compress=False)
    assert not list(tmp_path.iterdir())
