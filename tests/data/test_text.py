"""Character-level LM data: formats, vocabulary and <unk>, checkpoint state, training crops, evaluation coverage.

Every corpus here is written by the test itself (PTB-format files, a miniature text8, plain text);
references are computed independently with plain Python (dict lookups, slices of the string).
"""

import gzip
import hashlib
import io
import random
import tarfile
import zipfile

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from rnorm.data import text as text_module
from rnorm.data.text import (
    IGNORE_INDEX,
    CharLMDataModule,
    EpochCropSampler,
    encode,
    epoch_starts,
)

WORDS = ["the", "of", "and", "to", "a", "in", "is", "it", "stock", "market", "<unk>", "N", "$", "bank", "'s"]


def _sentences(seed: int, count: int, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def _ptb_bytes(sentences: list[str]) -> bytes:
    """Mikolov's character format: spaces -> '_', characters joined by spaces, each line ending ' \\n '."""
    return "".join(" ".join(s.replace(" ", "_")) + " \n " for s in sentences).encode()


def _ptb_chars(sentences: list[str]) -> str:
    """What the loader should read from _ptb_bytes: one symbol per character, newline ending each sentence."""
    return "".join(s.replace(" ", "_") + "\n" for s in sentences)


def _write_ptb(folder, splits: dict[str, list[str]], gz: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": "ptb.char.train.txt", "val": "ptb.char.valid.txt", "test": "ptb.char.test.txt"}
    for split, sentences in splits.items():
        data = _ptb_bytes(sentences)
        if split in gz:
            (folder / f"{names[split]}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / names[split]).write_bytes(data)


@pytest.fixture
def ptb_dir(tmp_path):
    folder = tmp_path / "ptb"
    _write_ptb(folder, {"train": _sentences(0, 60), "val": _sentences(1, 12), "test": _sentences(2, 15)})
    return folder


def _reference_ids(text: str, vocab: list[str]) -> list[int]:
    index = {s: i for i, s in enumerate(vocab)}
    return [index.get(c, 0) for c in text]


# -- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [(), ("train",), ("train", "val", "test")])
def test_ptb_files_raw_and_gzipped(tmp_path, gz):
    splits = {"train": _sentences(0, 30), "val": _sentences(1, 5), "test": _sentences(2, 6)}
    _write_ptb(tmp_path, splits, gz=gz)
    data = CharLMDataModule("ptb", data_dir=str(tmp_path), seq_length=7)
    for split, sentences in splits.items():
        assert data.text(split) == _ptb_chars(sentences)
    assert data.vocab == ["<unk>", *sorted(set(_ptb_chars(splits["train"])))]
    assert "\n" in data.vocab and "_" in data.vocab and " " not in data.vocab and "<" in data.vocab


def test_ptb_rejects_a_word_level_file(tmp_path):
    _write_ptb(tmp_path, {"val": ["a b"], "test": ["a b"]})
    (tmp_path / "ptb.char.train.txt").write_text("the market fell\nit rose\n")
    with pytest.raises(ValueError, match=r"not in the character-level PTB format.*'th'.*line 1.*corpus='text'"):
        _ = CharLMDataModule("ptb", data_dir=str(tmp_path)).vocab


def test_text8_split_by_character_count(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "TEXT8_SIZES", (90, 5, 5))
    body = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(100))
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as archive:
        archive.writestr("text8", body)
    data = CharLMDataModule("text8", data_dir=str(tmp_path), seq_length=4)
    assert (data.text("train"), data.text("val"), data.text("test")) == (body[:90], body[90:95], body[95:])
    assert data.random_crop is False  # BN §5.3: fixed non-overlapping examples
    truncated = CharLMDataModule("text8", data_dir=str(tmp_path), max_chars=3)
    assert [truncated.text(s) for s in ("train", "val", "test")] == [body[:3], body[90:93], body[95:98]]
    assert truncated.vocab == ["<unk>", *sorted(set(body[:3]))]


@pytest.mark.parametrize("name", ["text8", "text8.gz"])
def test_text8_raw_or_gzipped_and_wrong_size(tmp_path, monkeypatch, name):
    monkeypatch.setattr(text_module, "TEXT8_SIZES", (8, 2, 2))
    body = b"ab cd ef gh ij"  # 14 characters, not 12
    (tmp_path / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    with pytest.raises(ValueError, match=r"text8 has 12 characters but .* has 14"):
        _ = CharLMDataModule("text8", data_dir=str(tmp_path)).vocab
    (tmp_path / name).write_bytes(gzip.compress(body[:12]) if name.endswith(".gz") else body[:12])
    data = CharLMDataModule("text8", data_dir=str(tmp_path))
    assert (data.text("train"), data.text("val"), data.text("test")) == ("ab cd ef", " g", "h ")


def test_plain_text_split_by_fraction(tmp_path):
    (tmp_path / "a.txt").write_text("0123456789" * 7)
    (tmp_path / "b.txt").write_text("abcdefghij" * 3)
    data = CharLMDataModule("text", data_dir=str(tmp_path), files=["a.txt", "b.txt"], split=(0.8, 0.1, 0.1))
    whole = "0123456789" * 7 + "abcdefghij" * 3
    assert (data.text("train"), data.text("val"), data.text("test")) == (whole[:80], whole[80:90], whole[90:])


def test_plain_text_files_per_split_with_unicode(tmp_path):
    (tmp_path / "train1.txt").write_text("héllo wörld\n")
    with gzip.open(tmp_path / "train2.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("日本 hello\r\n")  # universal newlines: \r\n reads as \n
    (tmp_path / "val.txt").write_text("hello ünknown\n")
    (tmp_path / "test.txt").write_text("wörld\n")
    data = CharLMDataModule(
        "text",
        data_dir=str(tmp_path),
        train_files=["train1.txt", "train2.txt"],
        val_files=["val.txt"],
        test_files=["test.txt"],
        seq_length=3,
    )
    assert data.text("train") == "héllo wörld\n日本 hello\n"
    unknown = r"5 characters of the val split .* read as <unk>: 'n' x3, ('k' x1, 'ü' x1|'ü' x1, 'k' x1)$"
    with pytest.warns(UserWarning, match=unknown):
        ids = data.stream("val")
    assert ids.tolist() == _reference_ids("hello ünknown\n", data.vocab)
    assert data.unknown_counts == {"val": 5}


# -- encoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, vocab",
    [
        ("hello world!", ["<unk>", " ", "d", "e", "h", "l", "o", "r", "w"]),  # ASCII fast path
        ("naïve café ☕", ["<unk>", " ", "a", "c", "e", "f", "i", "n", "v", "é"]),  # code-point path
        ("abcxyz", ["<unk>", *map(chr, range(97, 97 + 300))]),  # ASCII text, more than 256 symbols
    ],
)
def test_encode_matches_a_dictionary_lookup(text, vocab):
    ids, unknown = encode(text, vocab)
    assert ids.tolist() == _reference_ids(text, vocab)
    assert dict(unknown) == {c: text.count(c) for c in set(text) if c not in vocab}


# -- vocabulary, <unk> and checkpoint state ------------------------------------------------------
def test_vocab_from_training_split_only_and_unknown_counts(tmp_path):
    _write_ptb(tmp_path, {"train": ["abc abc"], "val": ["abz q", "zz"], "test": ["cab"]})
    data = CharLMDataModule("ptb", data_dir=str(tmp_path), seq_length=3)
    assert data.vocab == ["<unk>", "\n", "_", "a", "b", "c"] and data.vocab_size == 6  # no z, q: valid only
    data.setup("fit")
    with pytest.warns(UserWarning, match=r"4 characters of the val split .*'z' x3, 'q' x1"):
        loader = data.val_dataloader()
    assert data.unknown_counts == {"val": 4}
    inputs, targets, _lengths = next(iter(loader))
    expected = _reference_ids("abz_q\nzz\n", data.vocab)
    assert expected[2] == 0  # z is <unk>
    assert inputs[0].tolist() == expected[:3] and targets[0].tolist() == expected[1:4]
    data.test_dataloader()
    assert data.unknown_counts == {"val": 4, "test": 0}


def test_vocab_size_works_right_after_init_and_reads_only_training(tmp_path):
    _write_ptb(tmp_path, {"train": ["hello world"]})  # no valid/test files at all
    data = CharLMDataModule("ptb", data_dir=str(tmp_path))
    assert data.vocab_size == len(set("hello_world\n")) + 1


def test_state_dict_carries_the_vocabulary_into_a_fresh_module(tmp_path):
    _write_ptb(tmp_path / "a", {"train": ["abc de"], "val": ["ab"], "test": ["e d c x"]})
    _write_ptb(tmp_path / "b", {"train": ["xyz"], "val": ["ab"], "test": ["e d c x"]})
    original = CharLMDataModule("ptb", data_dir=str(tmp_path / "a"), seq_length=2)
    state = torch.load(io.BytesIO(_saved(original.state_dict())), weights_only=True)
    fresh = CharLMDataModule("ptb", data_dir=str(tmp_path / "b"), seq_length=2)
    fresh.setup("test")
    with pytest.warns(UserWarning, match="x"):
        fresh.test_dataloader()  # encoded with its own vocabulary first: everything but x is unknown
    assert fresh.vocab == ["<unk>", "\n", "x", "y", "z"]
    with pytest.warns(UserWarning, match=r"checkpoint's vocabulary \(8 symbols\) differs .* \(5 symbols\)"):
        fresh.load_state_dict(state)
    assert fresh.vocab == original.vocab and fresh.vocab_size == 8
    with pytest.warns(UserWarning, match=r"1 characters of the test split.*'x' x1"):
        inputs, targets, lengths = next(iter(fresh.test_dataloader()[0]))
    expected = _reference_ids("e_d_c_x\n", original.vocab)
    assert fresh.unknown_counts == {"test": 1}
    assert inputs[0, : lengths[0]].tolist() == expected[:2] and targets[0, : lengths[0]].tolist() == expected[1:3]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "state", [{}, {"vocab": []}, {"vocab": ["a", "<unk>"]}, {"vocab": ["<unk>", "a", "a"]}, {"vocab": ["<unk>", 3]}]
)
def test_malformed_state_is_rejected(ptb_dir, state):
    with pytest.raises(ValueError, match="Expected a CharLMDataModule state with a vocabulary"):
        CharLMDataModule("ptb", data_dir=str(ptb_dir)).load_state_dict(state)


# -- training examples ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_chars, seq_length", [(101, 10), (107, 10), (50, 7), (8, 7)])
def test_epoch_crop_divides_by_seq_length_and_tiles_the_crop(num_chars, seq_length):
    count, spare = divmod(num_chars - 1, seq_length)
    offsets = set()
    for epoch in range(40):
        starts = sorted(epoch_starts(num_chars, seq_length, seed=3, epoch=epoch).tolist())
        assert len(starts) == count
        offset = starts[0]
        offsets.add(offset)
        assert 0 <= offset <= spare
        # consecutive, non-overlapping windows covering inputs offset .. offset + count*L - 1 exactly
        assert starts == [offset + k * seq_length for k in range(count)]
        assert starts[-1] + seq_length + 1 <= num_chars  # the last target exists
    assert offsets == set(range(spare + 1))  # every offset is drawn over 40 epochs (spare <= 6)


def test_training_batches_are_stream_windows(ptb_dir):
    data = CharLMDataModule("ptb", data_dir=str(ptb_dir), seq_length=9, batch_size=5, shuffle_seed=1)
    data.setup("fit")
    stream = data.stream("train").tolist()
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(2)
    starts = list(loader.batch_sampler.sampler)
    seen = []
    for inputs, targets, lengths in loader:
        assert inputs.dtype == targets.dtype == lengths.dtype == torch.int64
        assert inputs.shape[1] == 9 and (lengths == 9).all()
        seen.extend(zip(inputs.tolist(), targets.tolist()))
    assert len(seen) == (len(stream) - 1) // 9 == len(loader.batch_sampler.sampler)
    for start, (inputs, targets) in zip(starts, seen):
        assert inputs == stream[start : start + 9] and targets == stream[start + 1 : start + 10]


def test_epoch_order_is_reproducible_and_independent_of_global_rng():
    def order(seed, epoch):
        sampler = EpochCropSampler(num_chars=1001, seq_length=7, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(0)
    random.seed(0)
    first = order(5, 3)
    torch.manual_seed(1234)
    torch.rand(10)
    random.seed(99)
    assert order(5, 3) == first
    assert order(5, 4) != first and order(6, 3) != first
    assert sorted(order(5, 3)) != order(5, 3)  # shuffled, not in stream order


def test_text8_training_windows_start_at_zero(tmp_path):
    (tmp_path / "train.txt").write_text("abcdefghij" * 10 + "x")
    for name in ("val.txt", "test.txt"):
        (tmp_path / name).write_text("abc")
    data = CharLMDataModule(
        "text",
        data_dir=str(tmp_path),
        train_files=["train.txt"],
        val_files=["val.txt"],
        test_files=["test.txt"],
        seq_length=7,
        random_crop=False,
    )
    for epoch in range(5):
        sampler = data.train_dataloader().batch_sampler.sampler
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(0, 98, 7))


# -- evaluation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_length", [1, 4, 5, 13, 1000])
def test_evaluation_covers_every_character_exactly_once(ptb_dir, seq_length):
    data = CharLMDataModule("ptb", data_dir=str(ptb_dir), seq_length=seq_length, batch_size=3)
    data.setup("validate")
    stream = data.stream("val").tolist()
    inputs_seen, targets_seen, total = [], [], 0
    for inputs, targets, lengths in data.val_dataloader():
        assert inputs.shape[1] == targets.shape[1] == seq_length
        for x, y, n in zip(inputs.tolist(), targets.tolist(), lengths.tolist()):
            assert 1 <= n <= seq_length
            inputs_seen += x[:n]
            targets_seen += y[:n]
            assert y[n:] == [IGNORE_INDEX] * (seq_length - n) and x[n:] == [0] * (seq_length - n)
            total += n
    assert total == len(stream) - 1
    assert inputs_seen == stream[:-1] and targets_seen == stream[1:]


def test_test_loaders_for_eval_lengths(ptb_dir):
    data = CharLMDataModule(
        "ptb", data_dir=str(ptb_dir), seq_length=10, eval_lengths=[20, 50, 10_000], eval_batch_size=4
    )
    data.setup("test")
    assert data.test_lengths == [10, 20, 50, 10_000]
    loaders = data.test_dataloader()
    assert len(loaders) == 4
    stream = data.stream("test").tolist()
    for length, loader in zip(data.test_lengths, loaders):
        targets_seen = []
        for inputs, targets, lengths in loader:
            assert inputs.shape[0] <= 4 and inputs.shape[1] == length
            for y, n in zip(targets.tolist(), lengths.tolist()):
                targets_seen += y[:n]
        assert targets_seen == stream[1:]
        assert len(loader.dataset) == -(-(len(stream) - 1) // length)


# -- Lightning: checkpoint vocabulary and resumed epochs -----------------------------------------
class Recorder(LightningModule):
    """A tiny next-character model that records the training batches it sees, by epoch."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 4)
        self.head = nn.Linear(4, vocab_size)
        self.batches: dict[int, list[list[int]]] = {}
        self.tested: list[int] = []

    def _loss(self, batch):
        inputs, targets, _ = batch
        logits = self.head(self.embedding(inputs))  # (B, L, V)
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets)

    def training_step(self, batch, batch_idx):
        self.batches.setdefault(self.current_epoch, []).append(batch[0][:, 0].tolist())
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        return self._loss(batch)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.tested.append(dataloader_idx)
        return self._loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kwargs,
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's few-workers and few-batches hints
def test_checkpoint_resume_repeats_the_epoch_and_test_uses_the_checkpoint_vocabulary(tmp_path):
    _write_ptb(tmp_path / "a", {"train": _sentences(0, 40), "val": _sentences(1, 4), "test": ["q stock"]})
    _write_ptb(tmp_path / "b", {"train": ["q q q"], "val": ["q"], "test": ["q stock"]})

    def module(folder):
        return CharLMDataModule("ptb", data_dir=str(tmp_path / folder), seq_length=8, batch_size=16, shuffle_seed=4)

    torch.manual_seed(0)
    straight = Recorder(module("a").vocab_size)
    _trainer(tmp_path, max_epochs=2).fit(straight, datamodule=module("a"))

    torch.manual_seed(1)
    first = Recorder(module("a").vocab_size)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(first, datamodule=module("a"))
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(2)
    resumed = Recorder(module("a").vocab_size)
    _trainer(tmp_path, max_epochs=2).fit(resumed, datamodule=module("a"), ckpt_path=tmp_path / "epoch1.ckpt")
    assert first.batches[0] == straight.batches[0]
    assert resumed.batches[1] == straight.batches[1] and straight.batches[1] != straight.batches[0]

    # test in a "fresh process": another folder whose training text has another vocabulary
    fresh = module("b")
    assert fresh.vocab_size != straight.embedding.num_embeddings
    tester = Recorder(straight.embedding.num_embeddings)
    _trainer(tmp_path).test(tester, datamodule=fresh, ckpt_path=tmp_path / "epoch1.ckpt")
    assert fresh.vocab == module("a").vocab
    assert fresh.stream("test").tolist() == _reference_ids("q_stock\n", fresh.vocab)
    assert fresh.unknown_counts == {"test": 1}  # q is not in a's training text
    assert tester.tested == [0]


# -- downloads (file:// URLs: no network) --------------------------------------------------------
def test_prepare_data_extracts_ptb_from_simple_examples(tmp_path, monkeypatch):
    archive = tmp_path / "mirror" / "simple-examples.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, sentences in [("train", _sentences(0, 20)), ("valid", ["a b"]), ("test", ["c d"]), ("x", ["e"])]:
            data = _ptb_bytes(sentences)
            info = tarfile.TarInfo(f"./simple-examples/data/ptb.char.{name}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(text_module, "PTB_URLS", (archive.as_uri(),))
    monkeypatch.setattr(text_module, "PTB_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    target = tmp_path / "data"
    data = CharLMDataModule("ptb", data_dir=str(target), download=True)
    data.prepare_data()
    assert sorted(p.name for p in target.iterdir()) == ["ptb.char.test.txt", "ptb.char.train.txt", "ptb.char.valid.txt"]
    assert data.text("test") == "c_d\n" and data.text("train") == _ptb_chars(_sentences(0, 20))
    monkeypatch.setattr(text_module, "PTB_URLS", ())  # present files: nothing is fetched
    data.prepare_data()


def test_prepare_data_fetches_text8_zip_and_checks_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "TEXT8_SIZES", (6, 2, 2))
    archive = tmp_path / "mirror" / "text8.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("text8", "abc defghi")
    monkeypatch.setattr(text_module, "TEXT8_URLS", (archive.as_uri(),))
    monkeypatch.setattr(text_module, "TEXT8_MD5", "0" * 32)
    data = CharLMDataModule("text8", data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(RuntimeError, match="MD5"):
        data.prepare_data()
    monkeypatch.setattr(text_module, "TEXT8_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    data.prepare_data()
    assert data.text("train") == "abc de" and data.text("val") == "fg" and data.text("test") == "hi"


# -- errors --------------------------------------------------------------------------------------
def test_missing_folder_and_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ptb\.char\.train\.txt.*nowhere, which does not exist.*download=True"):
        _ = CharLMDataModule("ptb", data_dir=str(tmp_path / "nowhere")).vocab
    with pytest.raises(FileNotFoundError, match=r"text8 \(or text8\.zip.*which lacks them.*download=True"):
        _ = CharLMDataModule("text8", data_dir=str(tmp_path)).vocab
    with pytest.raises(FileNotFoundError, match=r"Text files not found: .*gone\.txt"):
        _ = CharLMDataModule("text", data_dir=str(tmp_path), files=["gone.txt"]).vocab


def test_empty_file_and_too_short_splits(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("x")
    (tmp_path / "long.txt").write_text("abcdefghij" * 3)
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        _ = CharLMDataModule("text", data_dir=str(tmp_path), files=["empty.txt"]).vocab
    per_split = {"train_files": ["long.txt"], "val_files": ["one.txt"], "test_files": ["long.txt"]}
    data = CharLMDataModule("text", data_dir=str(tmp_path), **per_split)
    with pytest.raises(ValueError, match=r"val split has 1 character; it needs at least 2.*one\.txt"):
        data.setup("fit")
    with pytest.raises(ValueError, match=r"test split has 0 characters.*split=\(1\.0, 0\.0, 0\.0\)"):
        CharLMDataModule("text", data_dir=str(tmp_path), files=["long.txt"], split=(1, 0, 0)).setup("test")


def test_training_split_shorter_than_one_example(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij")
    data = CharLMDataModule("text", data_dir=str(tmp_path), files=["a.txt"], split=(0.6, 0.2, 0.2), seq_length=6)
    with pytest.raises(ValueError, match=r"training split has 6 characters, fewer than seq_length \+ 1 = 7"):
        data.setup("fit")
    with pytest.raises(ValueError, match="seq_length"):
        data.train_dataloader()
    CharLMDataModule("text", data_dir=str(tmp_path), files=["a.txt"], split=(0.6, 0.2, 0.2), seq_length=5).setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_length": 0}, r"seq_length >= 1 but got 0"),
        ({"split": (0.5, 0.3, 0.3)}, r"sum to 1 but got \(0\.5, 0\.3, 0\.3\)"),
        ({"split": (0.5, 0.5)}, r"three split fractions"),
        ({"eval_lengths": [100, 0]}, r"eval_lengths >= 1"),
        ({"batch_size": 0}, r"batch_size >= 1"),
        ({"max_chars": 1}, r"max_chars >= 2"),
        ({"corpus": "wiki"}, r"corpus 'ptb', 'text8' or 'text' but got 'wiki'"),
        ({"corpus": "ptb", "data_dir": None}, r"corpus='ptb' needs data_dir.*ptb\.char\.train\.txt.*download=True"),
        ({"corpus": "text8", "files": ["x"]}, r"files apply to corpus='text' only"),
        ({"corpus": "text", "data_dir": None}, r"needs files .* or all of train_files.*none of them"),
        ({"corpus": "text", "train_files": ["a"], "val_files": ["b"]}, r"got train_files, val_files"),
        ({"corpus": "text", "files": ["a"], "test_files": ["b"]}, r"either files .* not both"),
        ({"corpus": "text", "files": "a.txt"}, r"non-empty list of file names"),
    ],
)
def test_argument_errors(kwargs, message):
    options = {"corpus": "ptb", "data_dir": "somewhere"}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        CharLMDataModule(**options)
