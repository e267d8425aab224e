"""Sequential and permuted MNIST (Le et al., 2015), as in Recurrent Batch Normalization §5.1.

The model reads each image one pixel at a time in scanline order (``mode="pixel"``: T = 784, D = 1)
and predicts the label from its last state; in permuted MNIST (pMNIST, ``permute=True``) the pixels
come in one fixed random order instead, the same for every image, drawn once from
``permutation_seed``. ``permutation_draw="authors"`` draws that order as the authors' code does
(``np.random.randint(0, 784, size=784)``: 784 draws *with* replacement, about 500 distinct pixels,
so some pixels are read several times and the rest never). ``mode="row"`` reads a row of 28 pixels
a step (T = 28, D = 28), a quick variant. The last ``val_size`` training images are the validation set; the test set is MNIST's.

Two choices make runs repeatable:

* **The permutation is part of the data module's state.** ``state_dict()`` holds it and Lightning
  stores it in every checkpoint; ``load_state_dict`` puts it back (with a warning if this module's
  own settings disagree: the checkpoint wins, as the model was trained with it). It is applied when
  a sample is read (:class:`SequentialMNIST`), and the datasets are built in the ``*_dataloader``
  hooks, which Lightning calls after restoring a checkpoint, so ``rnorm test --ckpt_path …`` sees
  the checkpoint's permutation whatever ``permutation_seed`` the command line gives.
* **Epoch k's training order depends only on ``(shuffle_seed, k)``.** The training loader's sampler
  (:class:`EpochSeededRandomSampler`) draws each epoch's order from its own generator seeded from
  those two numbers, and Lightning calls its ``set_epoch`` before every epoch — also after a resume.
  A ``shuffle=True`` loader would draw from the global RNG, so its order would depend on everything
  that consumed random numbers before (model initialization, noise, an interrupted run).

>>> SequentialMNISTDataModule(mode="row").input_size, SequentialMNISTDataModule().sequence_length
(28, 784)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from rnorm.data.batching import LastBatch, check_last_batch, loader, training_batches
from rnorm.data.download import download as download_file
from rnorm.data.idx import IDXFormatError, read_idx
from rnorm.data.seeding import keyed_generator

__all__ = ["EpochSeededRandomSampler", "SequentialMNIST", "SequentialMNISTDataModule"]

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
# MD5 of each ``.gz`` on the mirrors below, as torchvision publishes them.
MNIST_FILES = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "mnist_sample"  # see its MANIFEST.md
SIDE = 28
NUM_PIXELS = SIDE * SIDE


PERMUTATION_DRAWS = ("randperm", "authors")


def draw_permutation(seed: int, draw: Literal["randperm", "authors"] = "randperm") -> torch.Tensor:
    """The fixed pixel order of permuted MNIST for ``seed``: ``(784,)`` int64 indices into the scanline order.

    ``randperm``: a permutation of ``range(784)`` (``torch.randperm``). ``authors``: the draw of
    the authors' ``sequential_mnist.py --permuted``, ``np.random.randint(0, 784, size=784)`` right
    after ``np.random.seed(seed)`` (their default seed is 1): indices drawn with replacement, so not a
    permutation. NumPy's legacy ``RandomState`` stream is frozen, so this is their exact order.

    >>> order = draw_permutation(1, "authors")
    >>> order[:4].tolist(), len(set(order.tolist()))
    ([37, 235, 72, 767], 501)
    """
    if draw == "randperm":
        return torch.randperm(NUM_PIXELS, generator=torch.Generator().manual_seed(seed))
    if draw == "authors":
        import numpy as np

        return torch.from_numpy(np.random.RandomState(seed).randint(0, NUM_PIXELS, size=NUM_PIXELS).astype("int64"))
    raise ValueError(f"Expected permutation_draw one of {PERMUTATION_DRAWS} but got {draw!r}")


class SequentialMNIST(Dataset):
    """MNIST images read as sequences: item ``i`` is ``(x, y)``, x float32 ``(T, D)`` in [0, 1], y int64.

    Args:
        images: ``(N, 28, 28)`` unsigned bytes.
        labels: ``(N,)`` integers.
        mode: ``"pixel"`` (T = 784, D = 1) or ``"row"`` (T = 28, D = 28).
        permutation: the pixel order (784 indices into the scanline order), or ``None`` for scanline order.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mode: str, permutation: torch.Tensor | None = None
    ) -> None:
        self.pixels = images.reshape(len(images), NUM_PIXELS)  # (N, 784)
        self.labels = labels.long()
        self.shape = (NUM_PIXELS, 1) if mode == "pixel" else (SIDE, SIDE)  # (T, D)
        self.permutation = permutation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.pixels[index]  # (784,)
        if self.permutation is not None:
            pixels = pixels[self.permutation]
        return pixels.float().div_(255).reshape(self.shape), self.labels[index]  # (T, D), ()


class EpochSeededRandomSampler(Sampler[int]):
    """A random order of ``range(num_samples)`` that depends only on ``seed`` and the epoch.

    Lightning calls ``set_epoch(k)`` before epoch ``k`` (it does so for any sampler that has the
    method); outside Lightning call it yourself, or every epoch repeats epoch 0's order.

    >>> sampler = EpochSeededRandomSampler(5, seed=0)
    >>> sampler.set_epoch(3)
    >>> sorted(sampler) == [0, 1, 2, 3, 4] and list(sampler) == list(sampler)
    True
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.num_samples, generator=keyed_generator(self.seed, self.epoch)).tolist()

    def __len__(self) -> int:
        return self.num_samples


class SequentialMNISTDataModule(pl.LightningDataModule):
    """Sequential and permuted MNIST (BN §5.1): batches ``(x, y)``, x float32 ``(B, T, D)`` in [0, 1], y int64 (B,).

    Args:
        data_dir: folder with MNIST's four IDX files (``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
            raw or ``.gz``); ``None`` reads the sample shipped with rnorm (the first 6,000 training and
            1,000 test images).
        permute: read the pixels in one fixed random order (permuted MNIST) instead of scanline order.
        permutation_seed: seed of that order. A checkpoint's order takes precedence when one is loaded.
        permutation_draw: how that order is drawn: ``randperm`` (default), a permutation of the 784
            pixels; ``authors``, 784 indices drawn with replacement as in the authors' code (use
            ``permutation_seed: 1`` for their exact order). Ignored without ``permute``.
        mode: ``"pixel"``: one pixel a step (T = 784, D = 1), as in the paper; ``"row"``: one row of 28
            pixels a step (T = 28, D = 28).
        val_size: how many of the last training images form the validation set; ``None``: one sixth of
            them (10,000 of MNIST's 60,000, the usual split; 1,000 of the sample's 6,000).
        batch_size: images per batch.
        num_workers: worker processes per data loader (0 reads in the main process).
        download: in ``prepare_data``, download the files missing from ``data_dir`` from the standard
            mirrors, checking each MD5.
        shuffle_seed: seed of the training order; epoch k's order depends only on it and k.
        last_batch: the short last training batch of an epoch: ``keep``, ``drop``, ``merge`` it into
            the batch before, or ``auto``: merge when the model normalizes with batch statistics
            (``bn``, ``seqbn``), which cannot normalize one sample and normalize a few poorly;
            keep otherwise (see :mod:`rnorm.data.batching`).
    """

    num_classes: int = 10

    def __init__(
        self,
        data_dir: str | None = None,
        permute: bool = False,
        permutation_seed: int = 0,
        permutation_draw: Literal["randperm", "authors"] = "randperm",
        mode: Literal["pixel", "row"] = "pixel",
        val_size: int | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        download: bool = False,
        shuffle_seed: int = 0,
        last_batch: LastBatch = "auto",
    ) -> None:
        super().__init__()
        check_last_batch(last_batch)
        if mode not in ("pixel", "row"):
            raise ValueError(f"Expected mode 'pixel' or 'row' but got {mode!r}")
        if permutation_draw not in PERMUTATION_DRAWS:
            raise ValueError(f"Expected permutation_draw one of {PERMUTATION_DRAWS} but got {permutation_draw!r}")
        if val_size is not None and val_size < 0:
            raise ValueError(f"Expected val_size >= 0 (or None) but got {val_size}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"Expected batch_size >= 1 and num_workers >= 0 but got {batch_size} and {num_workers}")
        if download and data_dir is None:
            raise ValueError("download: true needs a data_dir to download into (data_dir: null is the shipped sample)")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.permute = permute
        self.permutation_seed = permutation_seed
        self.permutation_draw = permutation_draw
        self.mode = mode
        self.val_size = val_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.shuffle_seed = shuffle_seed
        self.last_batch = last_batch
        self.permutation: torch.Tensor | None = draw_permutation(permutation_seed, permutation_draw) if permute else None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split: (images, labels)

    @property
    def input_size(self) -> int:
        """D: features per step (1 in pixel mode, 28 in row mode)."""
        return 1 if self.mode == "pixel" else SIDE

    @property
    def sequence_length(self) -> int:
        """T: steps per image (784 in pixel mode, 28 in row mode)."""
        return NUM_PIXELS if self.mode == "pixel" else SIDE

    @property
    def folder(self) -> Path:
        """Where the IDX files are read from."""
        return SAMPLE_DIR if self.data_dir is None else Path(self.data_dir)

    def prepare_data(self) -> None:
        """Download the files missing from ``data_dir`` when ``download`` is set; files present are kept as they are."""
        if not self.download:
            return
        for name, md5 in MNIST_FILES.items():
            if _find(self.folder, name) is None:
                download_file([f"{mirror}{name}.gz" for mirror in MNIST_MIRRORS], self.folder / f"{name}.gz", md5)

    def setup(self, stage: str | None = None) -> None:
        """Read the training files (fit, validate) or the test files (test, predict); ``None``: all."""
        paths = mnist_paths(self.folder)
        if stage in ("fit", "validate", None) and "train" not in self._splits:
            images, labels = _read_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
            num_train = training_size(len(images), self.val_size, paths[TRAIN_IMAGES])
            self._splits["train"] = images[:num_train], labels[:num_train]
            self._splits["val"] = images[num_train:], labels[num_train:]
        if stage in ("test", "predict", None) and "test" not in self._splits:
            self._splits["test"] = _read_pair(paths[TEST_IMAGES], paths[TEST_LABELS])

    def dataset(self, split: Literal["train", "val", "test"]) -> SequentialMNIST:
        """The split as read by the data loaders, with the current permutation."""
        if split not in self._splits:
            raise RuntimeError(f"The {split!r} split is not read yet: call setup() with a stage that needs it first")
        images, labels = self._splits[split]
        return SequentialMNIST(images, labels, self.mode, self.permutation)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        sampler = EpochSeededRandomSampler(len(dataset), seed=self.shuffle_seed)
        batches = training_batches(sampler, self.batch_size, self.last_batch, self.trainer)
        return loader(dataset, self.num_workers, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return loader(self.dataset("val"), self.num_workers, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return loader(self.dataset("test"), self.num_workers, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return loader(self.dataset("test"), self.num_workers, batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to feed a model the same inputs: the pixel order and the mode."""
        permutation = None if self.permutation is None else self.permutation.clone()
        return {
            "permute": self.permute,
            "permutation_seed": self.permutation_seed,
            "permutation_draw": self.permutation_draw,
            "permutation": permutation,
            "mode": self.mode,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take a checkpoint's pixel order, warning where this module's settings asked for another one.

        Raises:
            ValueError: the checkpoint's mode differs (its model expects other inputs), or its state is malformed.
        """
        missing = {"permute", "permutation_seed", "permutation", "mode"} - set(state_dict)
        if missing:
            raise ValueError(f"Expected a SequentialMNISTDataModule state but its keys {sorted(missing)} are missing")
        permute, seed = state_dict["permute"], state_dict["permutation_seed"]
        permutation, mode = state_dict["permutation"], state_dict["mode"]
        draw = state_dict.get("permutation_draw", "randperm")  # checkpoints written before the option
        if mode != self.mode:
            raise ValueError(
                f"The checkpoint was trained with mode={mode!r} but this data module has mode={self.mode!r}: "
                f"set the data module's mode to {mode!r}"
            )
        if draw not in PERMUTATION_DRAWS:
            raise ValueError(f"Expected the checkpoint's permutation_draw one of {PERMUTATION_DRAWS} but got {draw!r}")
        if permute:
            permutation = torch.as_tensor(permutation, dtype=torch.long)
            _check_order(permutation, draw)
            described = f"permutation_seed={seed}" + (", permutation_draw='authors'" if draw == "authors" else "")
            if not self.permute:
                rank_zero_warn(
                    f"The checkpoint's data module permuted the pixels ({described}) but this one has "
                    "permute=False: using the checkpoint's permutation, which the model was trained with."
                )
            elif not torch.equal(permutation, self.permutation):
                mine = f"permutation_seed={self.permutation_seed}"
                mine += ", permutation_draw='authors'" if self.permutation_draw == "authors" else ""
                rank_zero_warn(
                    f"The checkpoint's pixel permutation ({described}) differs from this data module's "
                    f"({mine}): using the checkpoint's, which the model was trained with."
                )
        else:
            permutation = None
            if self.permute:
                rank_zero_warn(
                    "The checkpoint's data module read the pixels in scanline order but this one has permute=True: "
                    "using scanline order, which the model was trained with."
                )
        self.permute, self.permutation_seed, self.permutation = bool(permute), seed, permutation
        self.permutation_draw = draw


def _check_order(order: torch.Tensor, draw: str) -> None:
    """A checkpoint's pixel order: a permutation of range(784) (``randperm``) or 784 indices in it (``authors``)."""
    if draw == "randperm":
        if order.shape != (NUM_PIXELS,) or not torch.equal(order.sort().values, torch.arange(NUM_PIXELS)):
            raise ValueError(f"Expected the checkpoint's permutation to reorder range(784) but got {order}")
    elif order.shape != (NUM_PIXELS,) or order.min() < 0 or order.max() >= NUM_PIXELS:
        raise ValueError(f"Expected the checkpoint's pixel order to be 784 indices in [0, 784) but got {order}")


def mnist_paths(folder: Path) -> dict[str, Path]:
    """The four MNIST IDX files in ``folder`` (each raw or ``.gz``), by name.

    Raises:
        FileNotFoundError: naming the missing files.
    """
    paths = {name: _find(folder, name) for name in MNIST_FILES}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files missing in {folder}: {', '.join(missing)}. Expected the four files "
            f"{', '.join(MNIST_FILES)} (each raw or .gz); set download: true to fetch them."
        )
    return paths


def training_size(count: int, val_size: int | None, path: Path) -> int:
    """How many of ``count`` training images (from ``path``) stay for training when the last
    ``val_size`` (``None``: one sixth) are the validation set.

    Raises:
        ValueError: ``val_size`` leaves no training image.
    """
    num_val = count // 6 if val_size is None else val_size
    if num_val >= count:
        raise ValueError(f"val_size={num_val} leaves no training images: {path} has {count}; choose val_size below {count}")
    return count - num_val


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` or else ``folder/name.gz``, whichever exists first; ``None`` if neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(images_path: os.PathLike, labels_path: os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 from two IDX files, checked against each other."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).long()
    if images.shape[1:] != (SIDE, SIDE):
        got = " x ".join(map(str, images.shape[1:]))
        raise IDXFormatError(f"Expected 28 x 28 images in {images_path} but got {got}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise IDXFormatError(f"Expected labels 0 to 9 in {labels_path} but found {int(labels.max())}")
    return images, labels
