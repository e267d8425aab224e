"""Character-level language modelling data: Penn Treebank, text8 and any plain text (BN §5.2–5.3, NP §5.1).

**What a character is.**

* ``ptb`` reads Mikolov's ``ptb.char.{train,valid,test}.txt`` (from ``simple-examples.tgz``). In
  those files every symbol is followed by one space, ``_`` marks a word boundary, and each sentence
  ends with a newline (lines look like ``"a e r _ b a n k n o t e \\n "``). The separating spaces
  are dropped and **every other character is one symbol, the newline included** as the
  end-of-sentence symbol; the word-level ``<unk>`` token is spelled out as five characters
  ``< u n k >``, as in the files. This gives 5,017,482 / 393,042 / 442,423 characters
  (train / valid / test), the ~5.0M / 393k / 442k of the papers, and 50 distinct training
  characters. A file in which two non-space symbols touch (a word-level file, say) is rejected.
* ``text8`` reads the single file ``text8`` (or ``text8.zip`` / ``text8.gz``): 10^8 characters of
  ``a``-``z`` and space. The first 90M are the training split, the next 5M validation, the last 5M
  test (:data:`TEXT8_SIZES`); every character, space included, is a symbol.
* ``text`` reads UTF-8 files as they are: every character, newlines included, is a symbol. Either
  one set of ``files`` is split by fraction (``split``), or each split has its own files.

Files may be gzipped (recognized by their magic bytes; ``name.gz`` is found for ``name``). Line
ends are read in universal-newline mode (``\\r\\n`` becomes ``\\n``).

**Vocabulary.** ``vocab[0]`` is ``"<unk>"``, followed by the sorted distinct characters of the
training split (after ``max_chars``). Characters of the other splits that are not in it read as
``<unk>``; how many is recorded in :attr:`CharLMDataModule.unknown_counts` and warned about. The
vocabulary is the data module's state (``state_dict``), which Lightning stores in checkpoints:
after ``load_state_dict`` every split is encoded with the checkpoint's vocabulary, because
encoding happens lazily in the ``*_dataloader`` hooks, which Lightning calls after restoring.

**Examples.** Every example is ``(inputs, targets, length)`` with ``inputs = stream[i:i+L]`` and
``targets = stream[i+1:i+L+1]``; batches are ``(B, L)`` int64 twice and ``(B,)`` int64 lengths.

* Training (:func:`epoch_starts`): the stream's ``N - 1`` predictions are cut into
  ``(N - 1) // L`` non-overlapping windows, starting at a random offset each epoch (BN §5.2: a
  random crop whose length divides by L, plus the one character of the last target) or at 0 for
  text8 (BN §5.3: fixed non-overlapping length-180 examples), and visited in a random order. Offset
  and order come from a generator seeded by ``(shuffle_seed, epoch)`` alone — never the global
  RNG — through :class:`EpochCropSampler`, whose ``set_epoch`` Lightning calls before every epoch,
  after a resume too; so epoch k is the same whether or not the run was interrupted.
* Evaluation (:func:`segment_starts`): the whole stream in consecutive non-overlapping segments of
  L predictions, the last one shorter and padded (inputs with 0, targets with
  :data:`IGNORE_INDEX`, which ``cross_entropy`` skips), so that the per-character losses cover
  every character after the first exactly once. ``eval_lengths`` adds test loaders of longer
  segments (BN Fig. 3b).

>>> epoch_starts(num_chars=12, seq_length=5, seed=0, epoch=0, crop=False, shuffle=False).tolist()
[0, 5]
>>> segment_starts(num_chars=12, seq_length=5)
[0, 5, 10]
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rnorm.data.batching import LastBatch, check_last_batch, loader, training_batches
from rnorm.data.download import download as download_file
from rnorm.data.seeding import keyed_generator
from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["CharLMDataModule", "CharWindows", "EpochCropSampler", "epoch_starts", "segment_starts"]

UNK = "<unk>"
UNK_INDEX = 0
#: Padding of the targets past a segment's length: ``torch.nn.functional.cross_entropy`` ignores it.
IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")

PTB_FILES = {"train": "ptb.char.train.txt", "val": "ptb.char.valid.txt", "test": "ptb.char.test.txt"}
PTB_URLS = ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",)
#: MD5 of ``simple-examples.tgz``, as PaddlePaddle's PTB/imikolov loaders pin it.
PTB_MD5 = "30177ea32e27c525793142b6bf2c8e2d"

TEXT8_FILE = "text8"
TEXT8_URLS = ("http://mattmahoney.net/dc/text8.zip", "https://mattmahoney.net/dc/text8.zip")
#: MD5 of ``text8.zip`` (31,344,016 bytes), as several public loaders pin it.
TEXT8_MD5 = "f26f94c5209bc6159618bad4a559ff81"
#: Characters of text8's training, validation and test splits, in file order (BN §5.3).
TEXT8_SIZES = (90_000_000, 5_000_000, 5_000_000)

_GZIP_MAGIC, _ZIP_MAGIC = b"\x1f\x8b", b"PK\x03\x04"


# -- example positions ---------------------------------------------------------------------------
def epoch_starts(
    num_chars: int, seq_length: int, seed: int, epoch: int, crop: bool = True, shuffle: bool = True
) -> Tensor:
    """Start positions of one training epoch's examples: ``(num_chars - 1) // seq_length`` of them.

    The example at ``s`` predicts ``stream[s+1:s+seq_length+1]`` from ``stream[s:s+seq_length]``.
    The windows tile a crop of ``count * seq_length + 1`` characters starting at ``offset``, drawn
    uniformly from ``0 .. (num_chars - 1) % seq_length`` when ``crop`` (else 0); ``shuffle`` visits
    them in a random order. Both draws depend only on ``(seed, epoch)``.
    """
    count, spare = divmod(num_chars - 1, seq_length)
    generator = keyed_generator(seed, epoch)
    offset = int(torch.randint(spare + 1, (), generator=generator)) if crop else 0
    starts = offset + seq_length * torch.arange(count)
    return starts[torch.randperm(count, generator=generator)] if shuffle else starts


def segment_starts(num_chars: int, seq_length: int) -> list[int]:
    """Starts of the consecutive evaluation segments: ``0, L, 2L, …`` while predictions remain."""
    return list(range(0, num_chars - 1, seq_length))


class EpochCropSampler(Sampler[int]):
    """Yields :func:`epoch_starts` for the current epoch; Lightning calls ``set_epoch`` before each one.

    Outside Lightning call ``set_epoch`` yourself, or every epoch repeats epoch 0. (Under a
    distributed strategy Lightning wraps this sampler and shards its output but does not forward
    ``set_epoch``; the order then still changes every epoch, the crop offset does not.)

    >>> sampler = EpochCropSampler(num_chars=21, seq_length=4, seed=0)
    >>> sampler.set_epoch(2)
    >>> len(sampler), list(sampler) == list(sampler)
    (5, True)
    """

    def __init__(self, num_chars: int, seq_length: int, seed: int = 0, crop: bool = True, shuffle: bool = True) -> None:
        super().__init__()
        self.num_chars, self.seq_length, self.seed = num_chars, seq_length, seed
        self.crop, self.shuffle = crop, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        starts = epoch_starts(self.num_chars, self.seq_length, self.seed, self.epoch, self.crop, self.shuffle)
        yield from starts.tolist()

    def __len__(self) -> int:
        return (self.num_chars - 1) // self.seq_length


class CharWindows(Dataset):
    """Windows of an encoded stream: ``dataset[s]`` is ``(inputs, targets, length)``, each window starting at ``s``.

    ``starts`` lists the windows by position (``dataset[k]`` starts at ``starts[k]``); ``None``
    indexes by start position itself (for a sampler that yields positions, as in training). A window
    past which fewer than ``seq_length`` predictions remain is padded: inputs with 0, targets with
    :data:`IGNORE_INDEX`; ``length`` is its number of real predictions.
    """

    def __init__(self, stream: Tensor, seq_length: int, starts: Sequence[int] | None = None) -> None:
        self.stream, self.seq_length, self.starts = stream, seq_length, starts

    def __len__(self) -> int:
        return len(self.stream) - 1 if self.starts is None else len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        start = int(index if self.starts is None else self.starts[index])
        length = min(self.seq_length, len(self.stream) - 1 - start)
        if length < 1 or start < 0:
            raise IndexError(f"Expected a start in [0, {len(self.stream) - 2}] but got {start}")
        inputs = torch.zeros(self.seq_length, dtype=torch.long)
        targets = torch.full((self.seq_length,), IGNORE_INDEX, dtype=torch.long)
        inputs[:length] = self.stream[start : start + length]
        targets[:length] = self.stream[start + 1 : start + length + 1]
        return inputs, targets, torch.tensor(length)  # (L,), (L,), ()


# -- reading and encoding ------------------------------------------------------------------------
def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, raw, gzipped or zipped (one member), recognized by its magic bytes; universal newlines."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    try:
        if magic[:2] == _GZIP_MAGIC:
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        if magic == _ZIP_MAGIC:
            with zipfile.ZipFile(path) as archive:
                members = [name for name in archive.namelist() if not name.endswith("/")]
                if len(members) != 1:
                    raise ValueError(f"Expected one file in the archive {path} but found {members}")
                with archive.open(members[0]) as raw:
                    return io.TextIOWrapper(raw, encoding="utf-8").read()
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (UnicodeDecodeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"Could not read {path} as UTF-8 text: {err}") from err


def parse_ptb_chars(text: str, source: str = "the text") -> str:
    """The symbols of a file in Mikolov's character format: every character except the separating spaces.

    >>> parse_ptb_chars("a _ b \\n c \\n ")
    'a_b\\nc\\n'

    Raises:
        ValueError: two symbols touch without a space (not the character format: a word-level file?).
    """
    clash = re.search(r"[^ \n][^ \n]", text)
    if clash:
        line = text.count("\n", 0, clash.start()) + 1
        raise ValueError(
            f"{source} is not in the character-level PTB format (one symbol, then a space): "
            f"{clash.group()!r} on line {line}. For word-level or ordinary text use corpus='text'."
        )
    return text.replace(" ", "")


def build_vocab(text: str) -> list[str]:
    """``["<unk>", *sorted distinct characters of text]``.

    >>> build_vocab("banana")
    ['<unk>', 'a', 'b', 'n']
    """
    return [UNK, *sorted(set(text))]


def encode(text: str, vocab: Sequence[str]) -> tuple[Tensor, Counter[str]]:
    """Character ids of ``text`` (``uint8`` if they fit, else ``int32``) and the counts of characters not in ``vocab``.

    >>> ids, unknown = encode("cab!", ["<unk>", "a", "b", "c"])
    >>> ids.tolist(), dict(unknown)
    ([3, 1, 2, 0], {'!': 1})
    """
    singles = {symbol: i for i, symbol in enumerate(vocab) if len(symbol) == 1}
    if not text:
        return torch.zeros(0, dtype=torch.uint8), Counter()
    if text.isascii() and len(vocab) <= 256:  # fast path: byte translation tables
        data = text.encode("ascii")
        table = bytearray([UNK_INDEX]) * 256
        known = bytearray()
        for symbol, i in singles.items():
            if ord(symbol) < 128:
                table[ord(symbol)] = i
                known.append(ord(symbol))
        unknown = Counter(data.translate(None, bytes(known)).decode("ascii"))
        return torch.frombuffer(bytearray(data.translate(table)), dtype=torch.uint8), unknown
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)  # code points
    size = max([int(points.max()) if len(points) else 0, *map(ord, singles)]) + 1
    lookup = torch.full((size,), UNK_INDEX, dtype=torch.int32)
    positions = torch.tensor([ord(s) for s in singles], dtype=torch.long)
    lookup[positions] = torch.tensor(list(singles.values()), dtype=torch.int32)
    ids = torch.index_select(lookup, 0, points)
    missing, counts = torch.unique(points[ids == UNK_INDEX], return_counts=True)
    return ids, Counter({chr(p): c for p, c in zip(missing.tolist(), counts.tolist())})


def _find(folder: Path, name: str, suffixes: Sequence[str] = ("", ".gz")) -> Path | None:
    for suffix in suffixes:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


# -- the data module -----------------------------------------------------------------------------
class CharLMDataModule(pl.LightningDataModule):
    """Character-level language modelling (BN §5.2–5.3, NP §5.1): batches ``(inputs, targets, lengths)``.

    ``inputs`` and ``targets`` are ``(B, L)`` int64 character ids, ``lengths`` ``(B,)`` int64 (all
    L except for the last segment of an evaluation stream). See the module documentation for the
    formats, the vocabulary and how examples are cut.

    Args:
        corpus: ``"ptb"`` (Mikolov's character-level Penn Treebank), ``"text8"``, or ``"text"``
            (plain UTF-8 files given by ``files`` or ``train_files``/``val_files``/``test_files``).
        data_dir: for ``ptb`` and ``text8``: the folder with the corpus files (``ptb.char.train.txt``,
            ``ptb.char.valid.txt``, ``ptb.char.test.txt``; or ``text8``/``text8.zip``), downloaded
            into it with ``download``. For ``text``: the folder that relative file names are
            resolved against (``None``: the working directory).
        train_files: ``text`` only: the training split's files, concatenated in order.
        val_files: ``text`` only: the validation split's files.
        test_files: ``text`` only: the test split's files.
        files: ``text`` only, instead of the three lists: files concatenated into one text that
            ``split`` cuts into training, validation and test splits, in that order.
        split: fractions of ``files`` for training, validation and test; they must sum to 1.
        seq_length: L, characters per example (the papers: 100 on PTB, 180 on text8).
        eval_lengths: extra test loaders over the test stream cut into segments of these lengths
            (generalization to longer sequences, BN Fig. 3b), e.g. ``[100, 200, 500, 1000]``.
        batch_size: training examples per batch (the papers: 64 on PTB, 128 on text8).
        eval_batch_size: segments per validation and test batch (default: ``batch_size``).
        num_workers: worker processes per data loader (0 reads in the main process).
        download: in ``prepare_data``, fetch missing ``ptb``/``text8`` files into ``data_dir``
            (Mikolov's ``simple-examples.tgz``, Mahoney's ``text8.zip``), checking their MD5s.
        shuffle_seed: seed of the training crops and orders; epoch k depends only on it and k.
        max_chars: keep only the first ``max_chars`` characters of each split (quick runs); the
            vocabulary then comes from the truncated training split.
        random_crop: start each training epoch's windows at a random offset (``True``) or at 0;
            ``None``: the papers' choice, random for ``ptb`` and ``text``, fixed for ``text8``.
        last_batch: the short last training batch of an epoch: ``keep``, ``drop``, ``merge`` it into
            the batch before, or ``auto``: merge when the model normalizes with batch statistics
            (``bn``, ``seqbn``), which cannot normalize one sample and normalize a few poorly;
            keep otherwise (see :mod:`rnorm.data.batching`).

    Example:
        >>> import shutil, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "book.txt").write_text("the cat sat on the mat.\\n" * 50)
        >>> data = CharLMDataModule("text", data_dir=str(folder), files=["book.txt"], seq_length=10, batch_size=4)
        >>> data.vocab_size, "".join(data.vocab[1:])
        (13, '\\n .acehmnost')
        >>> data.setup("fit")
        >>> inputs, targets, lengths = next(iter(data.train_dataloader()))
        >>> inputs.shape, targets.dtype, lengths.tolist()
        (torch.Size([4, 10]), torch.int64, [10, 10, 10, 10])
        >>> shutil.rmtree(folder)
    """

    def __init__(
        self,
        corpus: Literal["ptb", "text8", "text"] = "ptb",
        data_dir: str | None = None,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        files: list[str] | None = None,
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        seq_length: int = 100,
        eval_lengths: list[int] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        download: bool = False,
        shuffle_seed: int = 0,
        max_chars: int | None = None,
        random_crop: bool | None = None,
        last_batch: LastBatch = "auto",
    ) -> None:
        super().__init__()
        check_last_batch(last_batch)
        if corpus not in ("ptb", "text8", "text"):
            raise ValueError(f"Expected corpus 'ptb', 'text8' or 'text' but got {corpus!r}")
        split_files = {"train_files": train_files, "val_files": val_files, "test_files": test_files}
        if corpus == "text":
            given = [name for name, value in split_files.items() if value is not None]
            if files is not None and given:
                raise ValueError(f"Give either files (split by fraction) or {', '.join(split_files)}, not both")
            if files is None and len(given) != 3:
                raise ValueError(
                    "corpus='text' needs files (one text, split by `split`) or all of train_files, val_files and "
                    f"test_files; got {', '.join(given) or 'none of them'}"
                )
            for name, value in {"files": files, **split_files}.items():
                if value is not None and (isinstance(value, str) or len(value) == 0):
                    raise ValueError(f"Expected {name} to be a non-empty list of file names but got {value!r}")
        else:
            given = [name for name, value in {"files": files, **split_files}.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to corpus='text' only, not corpus={corpus!r}")
            if data_dir is None:
                expected = ", ".join(PTB_FILES.values()) if corpus == "ptb" else "text8 (or text8.zip)"
                raise ValueError(
                    f"corpus={corpus!r} needs data_dir: the folder that holds {expected} "
                    "(set download=True to fetch the files into it)"
                )
        split = tuple(float(f) for f in split)
        if len(split) != 3 or any(not 0 <= f <= 1 for f in split) or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
            raise ValueError(f"Expected three split fractions in [0, 1] that sum to 1 but got {split}")
        if seq_length < 1:
            raise ValueError(f"Expected seq_length >= 1 but got {seq_length}")
        for length in eval_lengths or []:
            if length < 1:
                raise ValueError(f"Expected eval_lengths >= 1 but got {eval_lengths}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or num_workers < 0:
            raise ValueError(
                f"Expected batch_size >= 1, eval_batch_size >= 1 (or None) and num_workers >= 0 but got "
                f"{batch_size}, {eval_batch_size} and {num_workers}"
            )
        if max_chars is not None and max_chars < 2:
            raise ValueError(f"Expected max_chars >= 2 (or None) but got {max_chars}")
        self.save_hyperparameters()
        self.corpus = corpus
        self.data_dir = data_dir
        self.files = files
        self.split_files = split_files
        self.split = split
        self.seq_length = seq_length
        self.eval_lengths = list(eval_lengths or [])
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.download = download
        self.shuffle_seed = shuffle_seed
        self.max_chars = max_chars
        self.random_crop = corpus != "text8" if random_crop is None else random_crop
        self.last_batch = last_batch
        #: Characters read as ``<unk>`` in each split encoded so far (``{"val": 3, …}``).
        self.unknown_counts: dict[str, int] = {}
        self._texts: dict[str, str] = {}  # split: its characters (after max_chars)
        self._streams: dict[str, Tensor] = {}  # split: its character ids with the current vocabulary
        self._vocab: list[str] | None = None

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        """``["<unk>", …]``: the checkpoint's if one was loaded, else built from the training split."""
        if self._vocab is None:
            self._vocab = build_vocab(self.text("train"))
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of symbols, ``<unk>`` included; reads the training split if no vocabulary is known yet."""
        return len(self.vocab)

    @property
    def test_lengths(self) -> list[int]:
        """Segment length of each test dataloader, in order: ``seq_length`` (the stream), then ``eval_lengths``."""
        return [self.seq_length, *self.eval_lengths]

    @property
    def folder(self) -> Path:
        """``data_dir`` (the working directory if ``None``)."""
        return Path(self.data_dir if self.data_dir is not None else ".").expanduser()

    # -- reading ---------------------------------------------------------------------------------
    def text(self, split: Literal["train", "val", "test"]) -> str:
        """The characters of a split (read on first use, after ``max_chars``).

        Raises:
            FileNotFoundError: the folder or a file is missing.
            ValueError: a file is empty or malformed, or the split has fewer than 2 characters.
        """
        if split not in SPLITS:
            raise ValueError(f"Expected a split in {SPLITS} but got {split!r}")
        if split not in self._texts:
            if self.corpus == "ptb":
                texts = {split: parse_ptb_chars(*self._read_ptb(split))}
            elif self.corpus == "text8":
                texts = self._read_text8()
            elif self.files is not None:
                texts = self._read_fractions()
            else:
                texts = {split: "".join(map(self._read, self._paths(self.split_files[f"{split}_files"])))}
            self._texts.update({name: text[: self.max_chars] for name, text in texts.items()})
        text = self._texts[split]
        if len(text) < 2:
            raise ValueError(
                f"The {split} split has {len(text)} character{'s' * (len(text) != 1)}; it needs at least 2 "
                f"(one input and its target). It was read from {self._source(split)}."
            )
        return text

    def _source(self, split: str) -> str:
        """Where a split comes from, for error messages."""
        if self.corpus == "ptb":
            return f"{PTB_FILES[split]} in {self.folder}"
        if self.corpus == "text8":
            return f"text8 in {self.folder}, cut {'/'.join(f'{n:,}' for n in TEXT8_SIZES)}"
        if self.files is not None:
            return f"files {self.files} cut by split={self.split}"
        return f"{split}_files {self.split_files[f'{split}_files']}"

    def _read(self, path: Path) -> str:
        text = read_text(path)
        if not text:
            raise ValueError(f"The text file {path} is empty")
        return text

    def _paths(self, names: Sequence[str]) -> list[Path]:
        paths = [self.folder / Path(name).expanduser() for name in names]
        missing = [str(p) for p in paths if not p.is_file() and not Path(f"{p}.gz").is_file()]
        if missing:
            raise FileNotFoundError(
                f"Text files not found: {', '.join(missing)} "
                f"(relative names are resolved against data_dir={self.data_dir!r})"
            )
        return [p if p.is_file() else Path(f"{p}.gz") for p in paths]

    def _missing(self, expected: str) -> FileNotFoundError:
        state = "does not exist" if not self.folder.is_dir() else "lacks them"
        return FileNotFoundError(
            f"Expected {expected} in {self.folder}, which {state}. Set download=True to fetch them there, "
            "or point data_dir at a folder that holds them."
        )

    def _read_ptb(self, split: str) -> tuple[str, str]:
        path = _find(self.folder, PTB_FILES[split])
        if path is None:
            raise self._missing(f"the Penn Treebank character files {', '.join(PTB_FILES.values())} (each raw or .gz)")
        return self._read(path), str(path)

    def _read_text8(self) -> dict[str, str]:
        path = _find(self.folder, TEXT8_FILE, ("", ".zip", ".gz"))
        if path is None:
            raise self._missing("text8 (or text8.zip, text8.gz)")
        text = self._read(path)
        train, val, test = TEXT8_SIZES
        if len(text) != train + val + test:
            raise ValueError(
                f"text8 has {train + val + test:,} characters but {path} has {len(text):,}: the file is incomplete "
                "or not text8; delete it and download it again"
            )
        return {"train": text[:train], "val": text[train : train + val], "test": text[train + val :]}

    def _read_fractions(self) -> dict[str, str]:
        text = "".join(self._read(path) for path in self._paths(self.files))
        num_train, num_val = round(self.split[0] * len(text)), round(self.split[1] * len(text))
        return {
            "train": text[:num_train],
            "val": text[num_train : num_train + num_val],
            "test": text[num_train + num_val :],
        }

    def stream(self, split: Literal["train", "val", "test"]) -> Tensor:
        """The split's character ids with the current vocabulary (encoded on first use; counts its unknowns)."""
        if split not in self._streams:
            ids, unknown = encode(self.text(split), self.vocab)
            self.unknown_counts[split] = sum(unknown.values())
            if unknown:
                listed = ", ".join(f"{char!r} x{count}" for char, count in unknown.most_common(10))
                rank_zero_warn(
                    f"{self.unknown_counts[split]:,} characters of the {split} split are not in the vocabulary "
                    f"({self.vocab_size} symbols from the training split) and read as {UNK}: {listed}"
                    f"{', …' if len(unknown) > 10 else ''}"
                )
            self._streams[split] = ids
        return self._streams[split]

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """With ``download``, fetch the ``ptb``/``text8`` files missing from ``data_dir``; files present are kept."""
        if not self.download or self.corpus == "text":
            return
        if self.corpus == "ptb":
            download_ptb(self.folder)
        else:
            download_text8(self.folder)

    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs (fit: train and val; validate: val; test, predict: test; None: all).

        Raises:
            ValueError: for fit, a training split shorter than ``seq_length + 1`` characters.
        """
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS):
            self.text(split)
        if stage in ("fit", None):
            self._check_train_length()

    def _check_train_length(self) -> None:
        size = len(self.text("train"))
        if size < self.seq_length + 1:
            raise ValueError(
                f"The training split has {size} characters, fewer than seq_length + 1 = {self.seq_length + 1} "
                f"(one example and its last target), read from {self._source('train')}: "
                "lower seq_length or give more text"
            )

    def train_dataloader(self) -> DataLoader:
        self._check_train_length()
        stream = self.stream("train")
        sampler = EpochCropSampler(len(stream), self.seq_length, self.shuffle_seed, crop=self.random_crop)
        batches = training_batches(sampler, self.batch_size, self.last_batch, self.trainer)
        return loader(CharWindows(stream, self.seq_length), self.num_workers, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.seq_length)

    def test_dataloader(self) -> list[DataLoader]:
        """The test stream in segments of ``seq_length``, then one loader per ``eval_lengths`` (:attr:`test_lengths`)."""
        return [self._eval_loader("test", length) for length in self.test_lengths]

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.seq_length)

    def _eval_loader(self, split: str, length: int) -> DataLoader:
        stream = self.stream(split)
        windows = CharWindows(stream, length, segment_starts(len(stream), length))
        return loader(windows, self.num_workers, batch_size=self.eval_batch_size)


    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The vocabulary: a model trained with it needs the same character ids."""
        return {"vocab": list(self.vocab)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Use a checkpoint's vocabulary from now on (streams are re-encoded with it when next needed).

        Raises:
            ValueError: the state has no well-formed vocabulary.
        """
        vocab = state_dict.get("vocab")
        if (
            not isinstance(vocab, (list, tuple))
            or not vocab
            or vocab[0] != UNK
            or not all(isinstance(s, str) for s in vocab)
            or len(set(vocab)) != len(vocab)
        ):
            raise ValueError(
                f"Expected a CharLMDataModule state with a vocabulary ['{UNK}', …] of distinct strings but got {vocab!r}"
            )
        vocab = list(vocab)
        if self._vocab is not None and self._vocab != vocab:
            rank_zero_warn(
                f"The checkpoint's vocabulary ({len(vocab)} symbols) differs from this data module's "
                f"({len(self._vocab)} symbols): using the checkpoint's, which the model was trained with."
            )
        if vocab != self._vocab:
            self._streams.clear()
            self.unknown_counts.clear()
        self._vocab = vocab


# -- downloads -----------------------------------------------------------------------------------
def download_ptb(folder: str | os.PathLike) -> None:
    """Fetch Mikolov's ``simple-examples.tgz`` (MD5-checked) and extract the three ``ptb.char`` files into ``folder``.

    Nothing is fetched when all three are there (raw or ``.gz``); the archive is deleted after extraction.
    """
    folder = Path(folder)
    if all(_find(folder, name) for name in PTB_FILES.values()):
        return
    archive = download_file(PTB_URLS, folder / "simple-examples.tgz", PTB_MD5)
    with tarfile.open(archive) as tar:
        members = {Path(member.name).name: member for member in tar.getmembers() if member.isfile()}
        for name in PTB_FILES.values():
            if name not in members:
                raise RuntimeError(f"{archive} has no {name}: is it Mikolov's simple-examples.tgz?")
            atomic_write_bytes(folder / name, tar.extractfile(members[name]).read())
    archive.unlink()


def download_text8(folder: str | os.PathLike) -> None:
    """Fetch Mahoney's ``text8.zip`` (MD5-checked) into ``folder`` unless ``text8`` (raw, zip or gz) is there.

    The archive is kept and read as it is.
    """
    folder = Path(folder)
    if _find(folder, TEXT8_FILE, ("", ".zip", ".gz")) is None:
        download_file(TEXT8_URLS, folder / f"{TEXT8_FILE}.zip", TEXT8_MD5)
