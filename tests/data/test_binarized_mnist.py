"""Binarized MNIST: the strict ``.amat`` parser, the data module on both sources, the two binarizations
(threshold exact, stochastic repeatable per seed and epoch) and downloads from ``file://`` URLs.

Data are written here (small ``.amat`` files in ``tmp_path``) or read from the MNIST sample shipped in
the package; nothing depends on a network or on a shared data folder.
"""

import gzip
import hashlib

import pytest
import torch

from rnorm.data import AmatFormatError, BinarizedMNISTDataModule, read_amat, read_idx
from rnorm.data import binarized_mnist as module
from rnorm.data.binarized_mnist import AMAT_FILES, BinarizedImages, EpochIndexSampler
from rnorm.data.mnist import SAMPLE_DIR

SIZES = {"train": 20, "valid": 6, "test": 5}


def _amat_text(images: torch.Tensor) -> str:
    """The format as Larochelle's files have it: values separated by one space, a newline per image."""
    return "".join(" ".join(map(str, row.tolist())) + "\n" for row in images)


def _write_amat(folder, compress=False, seed=0) -> dict[str, torch.Tensor]:
    """Random binary images for the three splits, written as .amat (or .amat.gz); returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    data = {}
    for split, count in SIZES.items():
        images = (torch.rand(count, 784, generator=g) < 0.3).to(torch.uint8)
        text = _amat_text(images).encode()
        name = AMAT_FILES[split]
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(text))
        else:
            (folder / name).write_bytes(text)
        data[split] = images
    return data


def _all(loader) -> torch.Tensor:
    return torch.cat(list(loader))


# --- the parser -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_amat_gives_the_written_values(tmp_path, compress):
    data = _write_amat(tmp_path, compress=compress)
    name = AMAT_FILES["valid"] + (".gz" if compress else "")
    images = read_amat(tmp_path / name)
    assert images.dtype == torch.uint8 and images.shape == (6, 784)
    assert torch.equal(images, data["valid"])


def test_read_amat_accepts_windows_line_ends_and_no_final_newline(tmp_path):
    rows = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.uint8)
    path = tmp_path / "crlf.amat"
    path.write_bytes(b"0 1 1 0\r\n1 1 0 0")
    assert torch.equal(read_amat(path, num_values=4), rows)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("0 1 2 0", "expected 0 or 1 but value 3 is '2'"),
        ("0 1 0.5 0", "expected 0 or 1 but value 3 is '0.5'"),
        ("0 1 0", "expected 4 space-separated values but got 3"),
        ("0 1 0 1 1", "expected 4 space-separated values but got 5"),
        ("01 1 0 0", "expected 0 or 1 but value 1 is '01'"),
        ("", "expected 4 space-separated values but got 0"),
    ],
)
def test_read_amat_names_the_file_and_line_of_a_bad_value(tmp_path, line, problem):
    path = tmp_path / "bad.amat"
    path.write_text(f"0 0 0 0\n1 1 1 1\n{line}\n0 0 0 0\n")
    with pytest.raises(AmatFormatError) as info:
        read_amat(path, num_values=4)
    assert str(info.value) == f"{path}, line 3: {problem}"


def test_read_amat_rejects_empty_and_corrupt_gzip_files(tmp_path):
    empty = tmp_path / "empty.amat"
    empty.write_text("")
    with pytest.raises(AmatFormatError, match="holds no images"):
        read_amat(empty)
    corrupt = tmp_path / "corrupt.amat.gz"
    corrupt.write_bytes(gzip.compress(b"0 1\n" * 10)[:15])
    with pytest.raises(AmatFormatError, match=f"{corrupt} is not a valid gzip file"):
        read_amat(corrupt)


# --- the data module on .amat files ---------------------------------------------------------------------


def test_amat_splits_are_the_three_files_in_order_as_float_batches(tmp_path):
    data = _write_amat(tmp_path, compress=True)
    dm = BinarizedMNISTDataModule(source="amat", data_dir=str(tmp_path), batch_size=4)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (4, 784) and batch.dtype == torch.float32  # a tensor: no labels
    assert torch.equal(_all(dm.val_dataloader()), data["valid"].float())
    assert torch.equal(_all(dm.test_dataloader()), data["test"].float())
    train = _all(dm.train_dataloader())
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, data["train"].float().tolist()))  # every image once,
    assert not torch.equal(train, data["train"].float())  # shuffled
    assert (dm.input_size, dm.image_height, dm.image_width) == (784, 28, 28)


def test_amat_val_size_takes_the_first_valid_images(tmp_path):
    data = _write_amat(tmp_path)
    dm = BinarizedMNISTDataModule(source="amat", data_dir=str(tmp_path), val_size=4)
    dm.setup("fit")
    assert torch.equal(_all(dm.val_dataloader()), data["valid"][:4].float())
    with pytest.raises(ValueError, match=r"val_size=7 but .*binarized_mnist_valid.amat has only 6 images"):
        BinarizedMNISTDataModule(source="amat", data_dir=str(tmp_path), val_size=7).setup("fit")


def test_missing_amat_file_is_named(tmp_path):
    _write_amat(tmp_path)
    (tmp_path / AMAT_FILES["test"]).unlink()
    dm = BinarizedMNISTDataModule(source="amat", data_dir=str(tmp_path))
    dm.setup("fit")  # the test file is not needed to fit
    with pytest.raises(FileNotFoundError, match=f"missing in {tmp_path}: binarized_mnist_test.amat"):
        dm.setup("test")


def test_amat_needs_a_folder_and_options_are_checked():
    with pytest.raises(ValueError, match="source: amat needs a data_dir"):
        BinarizedMNISTDataModule(source="amat")
    with pytest.raises(ValueError, match="threshold in"):
        BinarizedMNISTDataModule(source="mnist", threshold=1.0)
    with pytest.raises(ValueError, match="binarization 'threshold' or 'stochastic'"):
        BinarizedMNISTDataModule(source="mnist", binarization="dynamic")
    with pytest.raises(ValueError, match="download: true needs a data_dir"):
        BinarizedMNISTDataModule(source="mnist", download=True)


def test_download_fetches_missing_amat_files_with_their_md5(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    data = _write_amat(mirror)
    md5s = {AMAT_FILES[s]: hashlib.md5((mirror / AMAT_FILES[s]).read_bytes()).hexdigest() for s in SIZES}
    monkeypatch.setattr(module, "AMAT_URL", mirror.as_uri() + "/")
    monkeypatch.setattr(module, "AMAT_MD5", md5s)
    target = tmp_path / "binarized_mnist"
    dm = BinarizedMNISTDataModule(source="amat", data_dir=str(target), download=True)
    dm.prepare_data()
    assert sorted(p.name for p in target.iterdir()) == sorted(AMAT_FILES.values())
    dm.setup("test")
    assert torch.equal(_all(dm.test_dataloader()), data["test"].float())
    monkeypatch.setattr(module, "AMAT_MD5", {**md5s, AMAT_FILES["train"]: "0" * 32})
    (target / AMAT_FILES["train"]).unlink()
    with pytest.raises(RuntimeError, match="Could not download binarized_mnist_train.amat"):
        dm.prepare_data()
    assert not (target / AMAT_FILES["train"]).exists()


def test_md5_constants_are_those_of_the_uncompressed_files():
    # The published checksums (../shared/data/binarized_mnist/MD5SUMS); a typo would fail every download.
    assert module.AMAT_MD5 == {
        "binarized_mnist_test.amat": "14e41ae11040adba6ab8cb291eda0dd8",
        "binarized_mnist_train.amat": "db28b1a6ae0fe70cbd3da91acf46e477",
        "binarized_mnist_valid.amat": "bf37822a04e94123630de6a7dfd9c9ef",
    }


# --- MNIST binarized on the fly -------------------------------------------------------------------------


def _sample_train_intensities() -> torch.Tensor:
    """The shipped sample's training images as (6000, 784) intensities in [0, 1], read independently."""
    return read_idx(SAMPLE_DIR / "train-images-idx3-ubyte.gz", ndim=3).reshape(6000, 784).double() / 255


def test_threshold_binarization_is_exact_on_the_shipped_sample():
    dm = BinarizedMNISTDataModule(source="mnist", binarization="threshold", threshold=0.5, batch_size=500)
    dm.setup("fit")
    intensities = _sample_train_intensities()
    val = _all(dm.val_dataloader())  # the last sixth of the training images
    assert torch.equal(val, (intensities[5000:] > 0.5).float())
    low = BinarizedMNISTDataModule(source="mnist", binarization="threshold", threshold=0.0, val_size=10)
    low.setup("fit")
    assert torch.equal(_all(low.val_dataloader()), (intensities[-10:] > 0).float())


def _train_epoch(dm: BinarizedMNISTDataModule, epoch: int) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return _all(loader)


def test_stochastic_binarization_is_repeatable_per_seed_and_epoch_and_differs_across_epochs():
    def module(seed):
        dm = BinarizedMNISTDataModule(source="mnist", binarization="stochastic", val_size=5900, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = module(0), module(0), module(1)
    epoch0 = _train_epoch(a, 0)
    assert epoch0.shape == (100, 784) and set(epoch0.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(epoch0, _train_epoch(b, 0))  # same seed, same epoch: same pixels
    assert torch.equal(_train_epoch(a, 3), _train_epoch(b, 3))
    assert not torch.equal(epoch0, _train_epoch(a, 1))
    assert not torch.equal(epoch0, _train_epoch(c, 0))
    # Same image, two epochs: fresh draws (compared by index, not by position in the shuffled order).
    dataset = a.dataset("train")
    assert not torch.equal(dataset[(0, 7)], dataset[(1, 7)]) and torch.equal(dataset[(1, 7)], dataset[(1, 7)])
    # Validation is one fixed draw per image, whatever the epoch.
    assert torch.equal(_all(a.val_dataloader()), _all(b.val_dataloader()))


def test_stochastic_binarization_has_the_intensities_as_probabilities():
    # 5,000 images x 784 pixels: the mean of the draws is within 4 standard errors of the mean intensity.
    intensities = _sample_train_intensities()[:5000]
    dataset = BinarizedImages((intensities * 255).round().to(torch.uint8), "stochastic", seed=0)
    draws = torch.stack([dataset[(0, i)] for i in range(5000)]).double()
    p = intensities.mean().item()
    stderr = (intensities * (1 - intensities)).sum().sqrt().item() / intensities.numel()
    assert abs(draws.mean().item() - p) < 4 * stderr
    # Pixels of intensity 0 and 1 are never flipped.
    assert torch.all(draws[intensities == 0] == 0) and torch.all(draws[intensities == 1] == 1)


def test_sampler_yields_epoch_and_index_pairs_in_the_epoch_seeded_order():
    sampler = EpochIndexSampler(10, seed=3)
    sampler.set_epoch(5)
    pairs = list(sampler)
    assert {epoch for epoch, _ in pairs} == {5} and sorted(i for _, i in pairs) == list(range(10))
    from rnorm.data import EpochSeededRandomSampler

    reference = EpochSeededRandomSampler(10, seed=3)
    reference.set_epoch(5)
    assert [i for _, i in pairs] == list(reference)


def test_mnist_source_reads_the_test_files():
    dm = BinarizedMNISTDataModule(source="mnist", binarization="threshold", batch_size=1000)
    dm.setup("test")
    test = _all(dm.test_dataloader())
    images = read_idx(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz", ndim=3).reshape(1000, 784).double() / 255
    assert torch.equal(test, (images > 0.5).float())
