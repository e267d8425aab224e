"""Binarized MNIST for generative models such as DRAW (Norm-Prop paper §5.2).

Two sources, one batch format: ``(B, 784)`` float32 tensors of 0s and 1s, pixels in row-major
order, **without labels** (the fixed binarization has none, and a generative model needs none).

* ``source="amat"``: the fixed binarization of Larochelle & Murray (2011), 50,000 training, 10,000
  validation and 10,000 test images in the text files ``binarized_mnist_{train,valid,test}.amat``
  (raw or ``.gz``): one image a line, 784 space-separated ``0``/``1``. :func:`read_amat` parses them
  strictly; an error names the file and the line.
* ``source="mnist"``: MNIST's IDX files (:mod:`rnorm.data.mnist`; ``data_dir=None`` reads the sample
  shipped with rnorm, so this works offline), binarized on the fly: ``threshold`` sets a pixel to 1
  when its intensity ``v / 255`` exceeds ``threshold``; ``stochastic`` draws each pixel from a
  Bernoulli with that intensity as probability. Training images are drawn afresh every time they
  are read, from a generator seeded by ``(seed, epoch, index)`` (so a run, resumed or not, sees the
  same pixels in epoch k); validation and test images are drawn once per index, the same in every
  epoch, so that the bounds of different epochs are comparable.

>>> BinarizedMNISTDataModule(source="mnist").input_size
784
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from rnorm.data.batching import LastBatch, check_last_batch, loader, training_batches
from rnorm.data.download import download as download_file
from rnorm.data.mnist import (
    MNIST_FILES,
    MNIST_MIRRORS,
    NUM_PIXELS,
    SAMPLE_DIR,
    SIDE,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    EpochSeededRandomSampler,
    _find,
    _read_pair,
    mnist_paths,
    training_size,
)
from rnorm.data.seeding import keyed_generator

__all__ = ["AMAT_FILES", "AmatFormatError", "BinarizedImages", "BinarizedMNISTDataModule", "read_amat"]

#: split -> file name of the fixed binarization.
AMAT_FILES = {
    "train": "binarized_mnist_train.amat",
    "valid": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
#: MD5 of each uncompressed ``.amat`` file (as the mirror below serves them).
AMAT_MD5 = {
    "binarized_mnist_train.amat": "db28b1a6ae0fe70cbd3da91acf46e477",
    "binarized_mnist_valid.amat": "bf37822a04e94123630de6a7dfd9c9ef",
    "binarized_mnist_test.amat": "14e41ae11040adba6ab8cb291eda0dd8",
}
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
GZIP_MAGIC = b"\x1f\x8b"


class AmatFormatError(ValueError):
    """A ``.amat`` file is not 784 space-separated 0/1 values a line."""


def read_amat(path: str | os.PathLike, num_values: int = NUM_PIXELS) -> torch.Tensor:
    """Read a binarized-MNIST ``.amat`` file (raw or gzipped) into a ``(N, num_values)`` uint8 tensor of 0/1.

    Args:
        path: the file; gzip is recognized by its magic bytes, whatever the name.
        num_values: values per line.

    Raises:
        AmatFormatError: a line has another number of values, or a value other than ``0``/``1``;
            the message names the file and the (1-based) line.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "tiny.amat"
    >>> _ = path.write_text("0 1 1\\n1 0 0\\n")
    >>> read_amat(path, num_values=3)
    tensor([[0, 1, 1],
            [1, 0, 0]], dtype=torch.uint8)
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise AmatFormatError(f"{path} is not a valid gzip file: {err}") from err
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        tokens = line.split()
        joined = b"".join(tokens)
        # One character per value, every character 0 or 1: then the line is exactly right.
        if len(tokens) != num_values or len(joined) != num_values or joined.translate(None, b"01"):
            raise AmatFormatError(f"{path}, line {number}: {_line_problem(tokens, num_values)}")
        rows.append(joined)
    if not rows:
        raise AmatFormatError(f"{path} holds no images")
    values = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8)
    return (values - ord("0")).reshape(len(rows), num_values)


def _line_problem(tokens: list[bytes], num_values: int) -> str:
    if len(tokens) != num_values:
        return f"expected {num_values} space-separated values but got {len(tokens)}"
    position, token = next((i, t) for i, t in enumerate(tokens, start=1) if t not in (b"0", b"1"))
    return f"expected 0 or 1 but value {position} is {token.decode(errors='replace')!r}"


class EpochIndexSampler(EpochSeededRandomSampler):
    """The epoch-seeded training order, yielding ``(epoch, index)``: the dataset draws its noise from both.

    >>> sampler = EpochIndexSampler(3, seed=0)
    >>> sampler.set_epoch(2)
    >>> sorted(sampler)
    [(2, 0), (2, 1), (2, 2)]
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in super().__iter__():
            yield epoch, index


class BinarizedImages(Dataset):
    """Images as flat ``(784,)`` float32 vectors of 0/1.

    Args:
        images: ``(N, 784)`` uint8: already binary (0/1) when ``binarization`` is ``None``, else
            intensities 0–255.
        binarization: ``None`` (already binary), ``"threshold"`` or ``"stochastic"``.
        threshold: intensity (in [0, 1]) above which a pixel is 1 under ``"threshold"``.
        seed: seed of the stochastic binarization.
        split: part of the stochastic seed: different splits draw different pixels.

    Items are read by index (a fixed draw per index: evaluation) or by ``(epoch, index)`` (a fresh
    draw per epoch: training, with :class:`EpochIndexSampler`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        binarization: Literal["threshold", "stochastic"] | None = None,
        threshold: float = 0.5,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.images = images.reshape(len(images), -1)  # (N, 784)
        self.binarization = binarization
        self.threshold = threshold
        self.seed = seed
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor:
        epoch, index = item if isinstance(item, tuple) else (None, item)
        pixels = self.images[index]  # (784,)
        if self.binarization is None:
            return pixels.float()
        intensity = pixels.float().div_(255)
        if self.binarization == "threshold":
            return (intensity > self.threshold).float()
        generator = keyed_generator(self.seed, self.split, epoch, index)
        return (torch.rand(intensity.shape, generator=generator) < intensity).float()


class BinarizedMNISTDataModule(pl.LightningDataModule):
    """Binarized MNIST (NP §5.2): batches ``(B, 784)`` float32 of 0/1, row-major, no labels.

    Args:
        source: ``"amat"``: the fixed binarization of Larochelle & Murray (2011) — the files
            ``binarized_mnist_{train,valid,test}.amat`` (raw or ``.gz``) in ``data_dir``, split
            50,000 / 10,000 / 10,000 as given; ``"mnist"``: MNIST's four IDX files binarized by
            ``binarization``.
        data_dir: the folder with the files. ``None`` (with ``source: mnist`` only) reads the MNIST
            sample shipped with rnorm (6,000 training and 1,000 test images).
        binarization: ``source: mnist`` only: ``"threshold"`` (a pixel is 1 where its intensity
            exceeds ``threshold``) or ``"stochastic"`` (1 with its intensity as probability, drawn
            anew each time a training image is read; one fixed draw per validation or test image).
        threshold: the intensity threshold, in [0, 1), of ``binarization: threshold``.
        val_size: validation images. ``amat``: the first ``val_size`` of the valid file (``None``:
            all 10,000). ``mnist``: the last ``val_size`` training images (``None``: one sixth).
        batch_size: images per batch (NP §5.2: 128).
        num_workers: worker processes per data loader (0 reads in the main process).
        download: in ``prepare_data``, download the missing files into ``data_dir`` (the ``.amat``
            files from Larochelle's site, or MNIST from its mirrors), checking each MD5.
        seed: seed of the training order (epoch k's order depends only on it and k) and of the
            stochastic binarization.
        last_batch: the short last training batch of an epoch: ``keep``, ``drop``, ``merge`` it into
            the batch before, or ``auto``: merge when the model normalizes with batch statistics
            (``bn``, ``seqbn``), which cannot normalize one sample and normalize a few poorly;
            keep otherwise (see :mod:`rnorm.data.batching`).
    """

    input_size: int = NUM_PIXELS
    image_height: int = SIDE
    image_width: int = SIDE

    def __init__(
        self,
        source: Literal["amat", "mnist"] = "amat",
        data_dir: str | None = None,
        binarization: Literal["threshold", "stochastic"] = "stochastic",
        threshold: float = 0.5,
        val_size: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = False,
        seed: int = 0,
        last_batch: LastBatch = "auto",
    ) -> None:
        super().__init__()
        check_last_batch(last_batch)
        if source not in ("amat", "mnist"):
            raise ValueError(f"Expected source 'amat' or 'mnist' but got {source!r}")
        if binarization not in ("threshold", "stochastic"):
            raise ValueError(f"Expected binarization 'threshold' or 'stochastic' but got {binarization!r}")
        if not 0 <= threshold < 1:
            raise ValueError(f"Expected threshold in [0, 1) but got {threshold}")
        if source == "amat" and data_dir is None:
            raise ValueError(
                "source: amat needs a data_dir with binarized_mnist_{train,valid,test}.amat (rnorm ships only "
                "an MNIST sample: use source: mnist with data_dir: null for it)"
            )
        if download and data_dir is None:
            raise ValueError("download: true needs a data_dir to download into (data_dir: null is the shipped sample)")
        if val_size is not None and val_size < 1:
            raise ValueError(f"Expected val_size >= 1 (or None) but got {val_size}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"Expected batch_size >= 1 and num_workers >= 0 but got {batch_size} and {num_workers}")
        self.save_hyperparameters()
        self.source = source
        self.data_dir = data_dir
        self.binarization = binarization
        self.threshold = threshold
        self.val_size = val_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.seed = seed
        self.last_batch = last_batch
        self._splits: dict[str, torch.Tensor] = {}  # split: (N, 784) uint8

    @property
    def folder(self) -> Path:
        """Where the files are read from."""
        return SAMPLE_DIR if self.data_dir is None else Path(self.data_dir)

    def prepare_data(self) -> None:
        """Download the files missing from ``data_dir`` when ``download`` is set; files present are kept."""
        if not self.download:
            return
        if self.source == "amat":
            for name, md5 in AMAT_MD5.items():
                if _find(self.folder, name) is None:
                    download_file([AMAT_URL + name], self.folder / name, md5)
        else:
            for name, md5 in MNIST_FILES.items():
                if _find(self.folder, name) is None:
                    download_file([f"{mirror}{name}.gz" for mirror in MNIST_MIRRORS], self.folder / f"{name}.gz", md5)

    def setup(self, stage: str | None = None) -> None:
        """Read the training and validation images (fit, validate) or the test images (test, predict); ``None``: all."""
        fit = stage in ("fit", "validate", None) and "train" not in self._splits
        test = stage in ("test", "predict", None) and "test" not in self._splits
        if self.source == "amat":
            self._setup_amat(fit, test)
        else:
            self._setup_mnist(fit, test)

    def _setup_amat(self, fit: bool, test: bool) -> None:
        wanted = [split for split, needed in (("train", fit), ("valid", fit), ("test", test)) if needed]
        paths = {split: _find(self.folder, AMAT_FILES[split]) for split in wanted}
        missing = [AMAT_FILES[split] for split, path in paths.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"Binarized MNIST files missing in {self.folder}: {', '.join(missing)} (each raw or .gz); "
                "set download: true to fetch them."
            )
        images = {split: read_amat(path) for split, path in paths.items()}
        if fit:
            valid = images["valid"]
            if self.val_size is not None:
                if self.val_size > len(valid):
                    raise ValueError(f"val_size={self.val_size} but {paths['valid']} has only {len(valid)} images")
                valid = valid[: self.val_size]
            self._splits["train"], self._splits["val"] = images["train"], valid
        if test:
            self._splits["test"] = images["test"]

    def _setup_mnist(self, fit: bool, test: bool) -> None:
        paths = mnist_paths(self.folder)
        if fit:
            images, _ = _read_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
            num_train = training_size(len(images), self.val_size, paths[TRAIN_IMAGES])
            flat = images.reshape(len(images), NUM_PIXELS)
            self._splits["train"], self._splits["val"] = flat[:num_train], flat[num_train:]
        if test:
            images, _ = _read_pair(paths[TEST_IMAGES], paths[TEST_LABELS])
            self._splits["test"] = images.reshape(len(images), NUM_PIXELS)

    def dataset(self, split: Literal["train", "val", "test"]) -> BinarizedImages:
        """The split as the data loaders read it."""
        if split not in self._splits:
            raise RuntimeError(f"The {split!r} split is not read yet: call setup() with a stage that needs it first")
        binarization = None if self.source == "amat" else self.binarization
        return BinarizedImages(self._splits[split], binarization, self.threshold, self.seed, split)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        sampler = EpochIndexSampler(len(dataset), seed=self.seed)
        batches = training_batches(sampler, self.batch_size, self.last_batch, self.trainer)
        return loader(dataset, self.num_workers, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return loader(self.dataset("val"), self.num_workers, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return loader(self.dataset("test"), self.num_workers, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return loader(self.dataset("test"), self.num_workers, batch_size=self.batch_size)

