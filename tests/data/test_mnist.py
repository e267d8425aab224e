"""Sequential MNIST: the shipped sample, reading, splits, the permutation and its checkpoint round trip,
epoch-seeded shuffling (also across a Lightning resume) and downloads from ``file://`` mirrors.

Data are generated here (small IDX folders in ``tmp_path``, random images with known labels) or read
from the sample shipped in the package; nothing depends on a network or on a shared data folder.
"""

import gzip
import hashlib
import io
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnorm.data import SequentialMNISTDataModule, read_idx, write_idx
from rnorm.data import mnist as mnist_module
from rnorm.data.mnist import SAMPLE_DIR, EpochSeededRandomSampler

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _write_mnist(folder, n_train=40, n_test=12, compress=True, seed=0):
    """A tiny MNIST folder: random images, labels ``i % 10``; returns the tensors written."""
    g = torch.Generator().manual_seed(seed)
    data = {
        NAMES[0]: torch.randint(0, 256, (n_train, 28, 28), dtype=torch.uint8, generator=g),
        NAMES[1]: (torch.arange(n_train) % 10).to(torch.uint8),
        NAMES[2]: torch.randint(0, 256, (n_test, 28, 28), dtype=torch.uint8, generator=g),
        NAMES[3]: (torch.arange(n_test) % 10).to(torch.uint8),
    }
    for name, tensor in data.items():
        write_idx(folder / (f"{name}.gz" if compress else name), tensor, compress=compress)
    return data


def _batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _scanline(images):
    """The reference input of pixel mode: (N, 784, 1) in scanline order, in [0, 1]."""
    return images.reshape(len(images), 784, 1).float() / 255


# --- the shipped sample ---------------------------------------------------------------------------------


def test_sample_files_match_the_manifest_md5s():
    manifest = (SAMPLE_DIR / "MANIFEST.md").read_text()
    recorded = dict((name, md5) for md5, name in re.findall(r"^([0-9a-f]{32})  (\S+)$", manifest, re.MULTILINE))
    assert sorted(recorded) == sorted(NAMES)
    for name, md5 in recorded.items():
        assert hashlib.md5(gzip.decompress((SAMPLE_DIR / f"{name}.gz").read_bytes())).hexdigest() == md5, name


def test_sample_decodes_to_6000_and_1000_images_of_every_digit():
    counts = {"train": 6000, "t10k": 1000}
    for prefix, count in counts.items():
        images = read_idx(SAMPLE_DIR / f"{prefix}-images-idx3-ubyte.gz", ndim=3)
        labels = read_idx(SAMPLE_DIR / f"{prefix}-labels-idx1-ubyte.gz", ndim=1)
        assert images.shape == (count, 28, 28) and labels.shape == (count,)
        per_class = torch.bincount(labels.long(), minlength=10)
        assert len(per_class) == 10 and per_class.min() > 0.6 * count / 10 and per_class.max() < 1.4 * count / 10
        assert images.max() == 255 and images.float().mean().item() == pytest.approx(33, abs=3)  # MNIST's mean ~33


def test_default_module_reads_the_sample_with_one_sixth_for_validation():
    dm = SequentialMNISTDataModule()
    dm.setup()
    assert [len(dm.dataset(split)) for split in ("train", "val", "test")] == [5000, 1000, 1000]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 784, 1) and x.dtype == torch.float32 and y.shape == (100,) and y.dtype == torch.int64
    assert (dm.input_size, dm.sequence_length, dm.num_classes) == (1, 784, 10)


# --- reading: shapes, values, splits ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_pixel_mode_is_scanline_order_scaled_to_unit_interval(tmp_path, compress):
    data = _write_mnist(tmp_path, compress=compress)
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=10, batch_size=8)
    dm.setup("test")
    x, y = _batches(dm.test_dataloader())
    assert x.shape == (12, 784, 1) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = data[NAMES[2]]
    assert x[3, 28 * 5 + 7, 0] == images[3, 5, 7].item() / 255  # step t is row t // 28, column t % 28
    torch.testing.assert_close(x, _scanline(images), rtol=0, atol=0)
    assert y.tolist() == data[NAMES[3]].tolist()
    assert 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(_batches(dm.predict_dataloader())[0], x, rtol=0, atol=0)


def test_row_mode_reads_a_row_a_step(tmp_path):
    data = _write_mnist(tmp_path)
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path), mode="row", val_size=10, batch_size=5)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 28, 28) and (dm.input_size, dm.sequence_length) == (28, 28)
    torch.testing.assert_close(x, data[NAMES[2]][:5].float() / 255, rtol=0, atol=0)


def test_validation_is_exactly_the_last_val_size_training_images(tmp_path):
    data = _write_mnist(tmp_path, n_train=30)
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=7, batch_size=4)
    dm.setup("fit")
    x_val, y_val = _batches(dm.val_dataloader())
    torch.testing.assert_close(x_val, _scanline(data[NAMES[0]][23:]), rtol=0, atol=0)
    assert y_val.tolist() == data[NAMES[1]][23:].tolist()
    x_train, _ = _batches(dm.train_dataloader())
    assert len(x_train) == 23
    train_ids = sorted(x_train.sum((1, 2)).tolist())
    assert train_ids == sorted(_scanline(data[NAMES[0]][:23]).sum((1, 2)).tolist())  # the first 23, shuffled


def test_val_size_zero_and_too_large(tmp_path):
    _write_mnist(tmp_path, n_train=30)
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=0)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 30 and len(dm.val_dataloader()) == 0
    with pytest.raises(ValueError, match=r"val_size=30 leaves no training images: .*train-images-idx3-ubyte.gz has 30"):
        SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=30).setup("fit")
    with pytest.raises(ValueError, match="val_size=10000 leaves no training images"):
        SequentialMNISTDataModule(val_size=10000).setup("fit")  # the sample has 6000


def test_raw_and_gzipped_files_can_be_mixed_and_raw_wins(tmp_path):
    data = _write_mnist(tmp_path, compress=True)
    write_idx(tmp_path / NAMES[3], data[NAMES[3]].flip(0), compress=False)  # raw next to .gz: raw is read
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=10)
    dm.setup("test")
    assert _batches(dm.test_dataloader())[1].tolist() == data[NAMES[3]].flip(0).tolist()


@pytest.mark.parametrize("missing", [None, NAMES[2]])
def test_missing_folder_or_file_names_the_folder_and_the_four_files(tmp_path, missing):
    folder = tmp_path / "mnist"
    if missing is not None:
        _write_mnist(folder)
        (folder / f"{missing}.gz").unlink()
    dm = SequentialMNISTDataModule(data_dir=str(folder))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(folder) in message and all(name in message for name in NAMES) and "download: true" in message
    assert message.startswith(f"MNIST files missing in {folder}: {missing or ', '.join(NAMES)}.")


def test_corrupt_or_mismatched_files(tmp_path):
    data = _write_mnist(tmp_path)
    path = tmp_path / f"{NAMES[0]}.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(ValueError, match=f"truncated IDX file {re.escape(str(path))}"):
        SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=10).setup("fit")
    write_idx(path, data[NAMES[0]], compress=True)
    write_idx(tmp_path / f"{NAMES[1]}.gz", data[NAMES[1]][:-1], compress=True)
    with pytest.raises(ValueError, match="has 40 images but .*train-labels-idx1-ubyte.gz has 39 labels"):
        SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=10).setup("fit")
    write_idx(tmp_path / f"{NAMES[3]}.gz", torch.full((12,), 10, dtype=torch.uint8), compress=True)
    with pytest.raises(ValueError, match="Expected labels 0 to 9 in .*t10k-labels-idx1-ubyte.gz but found 10"):
        SequentialMNISTDataModule(data_dir=str(tmp_path), val_size=10).setup("test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "column"}, "Expected mode 'pixel' or 'row' but got 'column'"),
        ({"val_size": -1}, "Expected val_size >= 0"),
        ({"batch_size": 0}, "Expected batch_size >= 1"),
        ({"download": True}, "download: true needs a data_dir"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequentialMNISTDataModule(**kwargs)


def test_dataloader_before_setup_says_so(tmp_path):
    dm = SequentialMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="call setup"):
        dm.train_dataloader()


# --- the permutation -------------------------------------------------------------------------------------


@pytest.fixture
def mnist_dir(tmp_path):
    return tmp_path, _write_mnist(tmp_path)


def _test_inputs(folder, **kwargs):
    dm = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=5, **kwargs)
    dm.setup("test")
    return dm, _batches(dm.test_dataloader())[0]


def test_permutation_is_one_fixed_order_for_every_image(mnist_dir):
    folder, data = mnist_dir
    dm, x = _test_inputs(folder, permute=True, permutation_seed=3)
    hand = torch.randperm(784, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dm.permutation, hand)
    torch.testing.assert_close(x, _scanline(data[NAMES[2]])[:, hand], rtol=0, atol=0)
    assert not torch.equal(hand, torch.arange(784))
    assert torch.equal(_test_inputs(folder, permute=True, permutation_seed=3)[1], x)  # same seed, same order
    assert not torch.equal(_test_inputs(folder, permute=True, permutation_seed=4)[1], x)  # another seed
    assert _test_inputs(folder)[0].permutation is None


def test_a_hand_made_permutation_is_applied_to_every_split(mnist_dir):
    folder, data = mnist_dir
    dm = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=5, mode="row")
    dm.setup()
    reverse = torch.arange(783, -1, -1)
    with pytest.warns(UserWarning, match="permute=False"):
        dm.load_state_dict({"permute": True, "permutation_seed": -1, "permutation": reverse, "mode": "row"})
    x_test, _ = _batches(dm.test_dataloader())
    torch.testing.assert_close(x_test, data[NAMES[2]].flip(1, 2).float() / 255, rtol=0, atol=0)
    x_val, _ = _batches(dm.val_dataloader())
    torch.testing.assert_close(x_val, data[NAMES[0]][30:].flip(1, 2).float() / 255, rtol=0, atol=0)


def test_state_dict_restores_the_permutation_over_another_seed(mnist_dir):
    folder, _ = mnist_dir
    trained, x_trained = _test_inputs(folder, permute=True, permutation_seed=1)
    state = trained.state_dict()
    assert set(state) == {"permute", "permutation_seed", "permutation_draw", "permutation", "mode"}
    assert state["permute"] is True and state["permutation_seed"] == 1 and state["mode"] == "pixel"
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as in a checkpoint, loaded the safe way
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=5, permute=True, permutation_seed=2)
    fresh.setup("test")  # Lightning calls setup before it restores a checkpoint
    with pytest.warns(UserWarning, match=r"permutation \(permutation_seed=1\) differs .* \(permutation_seed=2\)"):
        fresh.load_state_dict(state)
    assert fresh.permutation_seed == 1
    assert torch.equal(_batches(fresh.test_dataloader())[0], x_trained)

    unpermuted = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=5)
    unpermuted.setup("test")
    with pytest.warns(UserWarning, match="has permute=False: using the checkpoint's permutation"):
        unpermuted.load_state_dict(state)
    assert unpermuted.permute and torch.equal(_batches(unpermuted.test_dataloader())[0], x_trained)


def test_the_authors_order_is_their_numpy_draw_with_replacement(mnist_dir):
    folder, data = mnist_dir
    dm, x = _test_inputs(folder, permute=True, permutation_seed=1, permutation_draw="authors")
    # What sequential_mnist.py --permuted runs with its default --seed 1, written out here.
    np.random.seed(1)
    theirs = torch.from_numpy(np.random.randint(0, 784, size=(784,)))
    assert torch.equal(dm.permutation, theirs)
    assert len(set(theirs.tolist())) == 501  # drawn with replacement: not a permutation
    torch.testing.assert_close(x, _scanline(data[NAMES[2]])[:, theirs], rtol=0, atol=0)


def test_the_authors_order_is_saved_and_restored_like_the_permutation(mnist_dir):
    folder, _ = mnist_dir
    trained, x_trained = _test_inputs(folder, permute=True, permutation_seed=1, permutation_draw="authors")
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)  # as in a checkpoint, loaded the safe way
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["permutation_draw"] == "authors" and torch.equal(state["permutation"], trained.permutation)
    fresh = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=5, permute=True, permutation_seed=1)
    fresh.setup("test")
    with pytest.warns(UserWarning, match=r"\(permutation_seed=1, permutation_draw='authors'\) differs .* \(permutation_seed=1\)"):
        fresh.load_state_dict(state)
    assert fresh.permutation_draw == "authors" and torch.equal(_batches(fresh.test_dataloader())[0], x_trained)
    out_of_range = dict(state, permutation=torch.full((784,), 784))
    with pytest.raises(ValueError, match=r"pixel order to be 784 indices in \[0, 784\)"):
        fresh.load_state_dict(out_of_range)
    with pytest.raises(ValueError, match=r"Expected permutation_draw one of \('randperm', 'authors'\) but got 'numpy'"):
        SequentialMNISTDataModule(permute=True, permutation_draw="numpy")


def test_a_scanline_checkpoint_wins_over_permute(mnist_dir):
    folder, _ = mnist_dir
    plain, x_plain = _test_inputs(folder)
    permuted, _ = _test_inputs(folder, permute=True)
    with pytest.warns(UserWarning, match="scanline order but this one has permute=True"):
        permuted.load_state_dict(plain.state_dict())
    assert permuted.permutation is None and torch.equal(_batches(permuted.test_dataloader())[0], x_plain)


def test_load_state_dict_rejects_another_mode_or_a_broken_permutation():
    dm = SequentialMNISTDataModule(permute=True)
    with pytest.raises(ValueError, match="trained with mode='row' but this data module has mode='pixel'"):
        dm.load_state_dict(SequentialMNISTDataModule(mode="row").state_dict())
    broken = dict(dm.state_dict(), permutation=torch.zeros(784, dtype=torch.long))
    with pytest.raises(ValueError, match=r"permutation to reorder range\(784\)"):
        dm.load_state_dict(broken)
    with pytest.raises(ValueError, match=r"keys \['mode'\] are missing"):
        dm.load_state_dict({"permute": False, "permutation_seed": 0, "permutation": None})


# --- shuffling -------------------------------------------------------------------------------------------


def test_epoch_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch, consume):
        torch.rand(consume)  # global RNG drawn from before: must not matter
        sampler = EpochSeededRandomSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(0)
    reference = order(0, 3, consume=0)
    assert sorted(reference) == list(range(50))
    torch.manual_seed(123)
    assert order(0, 3, consume=1000) == reference
    assert order(0, 2, consume=0) != reference and order(1, 3, consume=0) != reference
    assert order(1, 0, consume=0) != order(0, 1, consume=0)  # seeds and epochs do not simply add up


def test_train_loader_order_is_reproducible(mnist_dir):
    folder, _ = mnist_dir

    def epoch_ids(epoch, shuffle_seed=0):
        dm = SequentialMNISTDataModule(data_dir=str(folder), val_size=10, batch_size=4, shuffle_seed=shuffle_seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)
        return _batches(loader)[0].sum((1, 2))

    first = epoch_ids(2)
    torch.randn(10_000)
    assert torch.equal(epoch_ids(2), first)
    assert not torch.equal(epoch_ids(1), first) and not torch.equal(epoch_ids(2, shuffle_seed=5), first)


class _Recorder(pl.LightningModule):
    """Records the identity (pixel sum) of every training image by epoch, and the test inputs."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 10)
        self.train_ids: dict[int, list[float]] = {}
        self.test_inputs: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_ids.setdefault(self.current_epoch, []).extend(x.sum((1, 2)).tolist())
        return F.cross_entropy(self.layer(x.mean(1)), y)

    def test_step(self, batch, batch_idx):
        self.test_inputs.append(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, max_epochs):
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_resume_replays_each_epochs_order_and_test_uses_the_checkpoint_permutation(mnist_dir):
    folder, data = mnist_dir

    def module(seed):
        return SequentialMNISTDataModule(
            data_dir=str(folder), val_size=10, batch_size=10, permute=True, permutation_seed=seed
        )

    torch.manual_seed(0)
    straight = _Recorder()
    _trainer(folder, 3).fit(straight, datamodule=module(1))

    torch.manual_seed(1)
    first = _Recorder()
    trainer = _trainer(folder, 1)
    trainer.fit(first, datamodule=module(1))
    checkpoint = folder / "epoch0.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert first.train_ids[0] == straight.train_ids[0]

    torch.manual_seed(2)
    torch.rand(1000)  # other global RNG use before the resume
    resumed = _Recorder()
    with pytest.warns(UserWarning, match="differs from this data module's"):
        _trainer(folder, 3).fit(resumed, datamodule=module(7), ckpt_path=checkpoint)
    assert sorted(resumed.train_ids) == [1, 2]
    assert resumed.train_ids[1] == straight.train_ids[1] and resumed.train_ids[2] == straight.train_ids[2]
    assert straight.train_ids[1] != straight.train_ids[2]

    tester = _Recorder()
    with pytest.warns(UserWarning, match=r"permutation \(permutation_seed=1\) differs"):
        _trainer(folder, 1).test(tester, datamodule=module(2), ckpt_path=checkpoint, verbose=False)
    hand = torch.randperm(784, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.cat(tester.test_inputs), _scanline(data[NAMES[2]])[:, hand], rtol=0, atol=0)


# --- download --------------------------------------------------------------------------------------------


@pytest.fixture
def mirrors(tmp_path, monkeypatch):
    """Two file:// mirrors, the first empty, the second holding a generated MNIST; returns its data."""
    empty, full = tmp_path / "mirror-empty", tmp_path / "mirror-full"
    empty.mkdir()
    data = _write_mnist(full)
    monkeypatch.setattr(mnist_module, "MNIST_MIRRORS", (empty.as_uri() + "/", full.as_uri() + "/"))
    return full, data


def test_download_with_wrong_md5_lists_every_attempt_and_leaves_nothing(tmp_path, mirrors):
    target = tmp_path / "mnist"
    dm = SequentialMNISTDataModule(data_dir=str(target), download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()  # the generated files do not have MNIST's MD5s
    message = str(info.value)
    assert "Could not download train-images-idx3-ubyte.gz" in message
    assert "mirror-empty/train-images-idx3-ubyte.gz: URLError" in message
    assert "mirror-full/train-images-idx3-ubyte.gz: MD5 " in message
    assert "expected f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    assert not target.exists() or not list(target.iterdir())


def test_download_with_right_md5_fetches_the_missing_files_only(tmp_path, mirrors, monkeypatch):
    full, data = mirrors
    md5s = {name: hashlib.md5((full / f"{name}.gz").read_bytes()).hexdigest() for name in NAMES}
    monkeypatch.setattr(mnist_module, "MNIST_FILES", md5s)
    target = tmp_path / "mnist"
    write_idx(target / NAMES[3], data[NAMES[3]], compress=False)  # present (raw): kept, not downloaded
    dm = SequentialMNISTDataModule(data_dir=str(target), download=True, val_size=10)
    dm.prepare_data()
    assert sorted(path.name for path in target.iterdir()) == sorted([f"{n}.gz" for n in NAMES[:3]] + [NAMES[3]])
    dm.setup()
    assert _batches(dm.test_dataloader())[1].tolist() == data[NAMES[3]].tolist()
    monkeypatch.setattr(mnist_module, "MNIST_MIRRORS", ())
    dm.prepare_data()  # everything present: no download attempted
    SequentialMNISTDataModule(data_dir=str(target)).prepare_data()  # download=False: never downloads
