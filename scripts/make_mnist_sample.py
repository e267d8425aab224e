"""Make the MNIST sample that rnorm ships: the first 6,000 training and first 1,000 test images and labels.

    python scripts/make_mnist_sample.py --source /work/shared/data/mnist

The source folder holds the four standard MNIST IDX files (``name`` or ``name.gz``) and an
``MD5SUMS`` file with the MD5 of each uncompressed file; each source is checked against it first.
Each sample file is the source's header with the count (the first dimension) rewritten, followed
by the source's first records byte for byte. It is gzipped at level 9 with header timestamp 0 and
no file name, so running the script again gives identical files, compressed or not (the ``.gz``
bytes can differ only with another zlib). ``MANIFEST.md`` records all of it.

Standard library only, working at the byte level, so the sample does not depend on rnorm's reader.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
import sys
from collections import Counter
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "rnorm" / "data" / "assets" / "mnist_sample"
SUBSETS = {  # name: (records kept, bytes per record)
    "train-images-idx3-ubyte": (6000, 28 * 28),
    "train-labels-idx1-ubyte": (6000, 1),
    "t10k-images-idx3-ubyte": (1000, 28 * 28),
    "t10k-labels-idx1-ubyte": (1000, 1),
}


def read_source(folder: Path, name: str) -> bytes:
    """The uncompressed bytes of ``name`` or ``name.gz`` in ``folder``."""
    if (folder / name).exists():
        return (folder / name).read_bytes()
    return gzip.decompress((folder / f"{name}.gz").read_bytes())


def subset(data: bytes, count: int, record_size: int) -> bytes:
    """The IDX file ``data`` cut to its first ``count`` records, its header's first dimension rewritten."""
    ndim = data[3]
    header_size = 4 + 4 * ndim
    dims = list(struct.unpack(f">{ndim}I", data[4:header_size]))
    if data[:3] != b"\x00\x00\x08" or dims[0] < count:
        raise ValueError(f"not an unsigned-byte IDX file with at least {count} records (header {data[:header_size]!r})")
    dims[0] = count
    return data[:4] + struct.pack(f">{ndim}I", *dims) + data[header_size : header_size + count * record_size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    source_md5 = dict(reversed(line.split()) for line in (args.source / "MD5SUMS").read_text().splitlines() if line)
    args.output.mkdir(parents=True, exist_ok=True)
    rows, sums, label_counts = [], [], {}
    for name, (count, record_size) in SUBSETS.items():
        data = read_source(args.source, name)
        got = hashlib.md5(data).hexdigest()
        if got != source_md5[name]:
            raise SystemExit(f"{args.source / name}: MD5 {got}, but MD5SUMS says {source_md5[name]}")
        sample = subset(data, count, record_size)
        compressed = gzip.compress(sample, compresslevel=9, mtime=0)
        (args.output / f"{name}.gz").write_bytes(compressed)
        md5 = hashlib.md5(sample).hexdigest()
        sums.append(f"{md5}  {name}")
        rows.append(
            f"| `{name}.gz` | {count} | {len(sample)} | {len(compressed)} | `{hashlib.md5(compressed).hexdigest()}` "
            f"| `{name}` {source_md5[name]} |"
        )
        if "labels" in name:
            label_counts[name] = Counter(sample[8:])

    counts = "\n".join(
        f"| `{name}` | " + " | ".join(str(label_counts[name][digit]) for digit in range(10)) + " |"
        for name in label_counts
    )
    manifest = f"""# MNIST sample shipped with rnorm

The first 6,000 training and the first 1,000 test images and labels of MNIST (LeCun, Cortes and
Burges), in the standard IDX format, gzipped. `SequentialMNISTDataModule(data_dir=None)` reads them,
so that examples, quick configurations and tests run without a download.

## How it was made

    python scripts/make_mnist_sample.py --source /work/shared/data/mnist

from the four standard MNIST files in that folder, each checked first against the MD5 of the
**uncompressed** file recorded in its `MD5SUMS` (the standard MD5s of MNIST's files; the source
`.gz` wrappers were recompressed there, their contents are not). Each sample file is the source's
IDX header with the count (first dimension) rewritten, followed by the source's first records
byte for byte; pixel and label bytes are unchanged. Gzip level 9, header timestamp 0, no file name:
running the script again gives identical files.

| file | records | bytes uncompressed | bytes gzipped | MD5 of the `.gz` | source and its MD5 (uncompressed) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## MD5 of each uncompressed sample file

These are what the tests check (the `.gz` bytes could differ with another zlib; the contents cannot).

```
{chr(10).join(sums)}
```

## Labels

| file | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |
|---|---|---|---|---|---|---|---|---|---|---|
{counts}
"""
    (args.output / "MANIFEST.md").write_text(manifest)
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
