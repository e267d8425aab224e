"""The DeepMind CNN question-answering corpus (Hermann et al., 2015) as in BN §5.4 and Appendix C.

**The format.** One ``.question`` file per example, UTF-8, its lines::

    1  the article's URL
    2  (blank)
    3  the passage: one line of tokens, entities anonymized as @entityN
    4  (blank)
    5  the cloze question: one line with @placeholder where the answer was
    6  (blank)
    7  the answer: @entityN
    8  (blank)
    9… the entity mapping, one @entityN:name a line

:func:`parse_question_file` reads one into a :class:`QAExample` and raises :class:`QAFormatError`
(a ``ValueError``) naming the file, the line and what was expected. The splits are the folders
``training``, ``validation`` and ``test`` of ``data_dir``, or of ``data_dir/questions`` (the
tarball's ``cnn/questions`` layout) or ``data_dir/cnn/questions``.

**The relevance filter** (BN Appendix C: "we use only the 4 most relevant sentences from the
description, as identified by a string matching procedure"). The paper does not spell out the
procedure; here a passage is cut into sentences after each ``.``, ``?`` or ``!`` token
(:func:`split_sentences`), each sentence scores the number of distinct question words it contains
(``@placeholder`` and punctuation excluded), and the ``num_relevant_sentences`` best (earlier
first on ties) are kept in their original order (:func:`select_sentences`). An answer entity
that none of them contains cannot be found: the example stays, but its answer is not a candidate
(the paper's 57 % ceiling on CNN validation). :attr:`QADataModule.answerable_fraction` records
the fraction of answerable examples of each split.

**Ids.** ``<pad>`` is 0, ``<unk>`` 1, ``@placeholder`` 2, ``@entity0 … @entity{E-1}`` follow,
then the training split's words, most frequent first (ties alphabetically), up to
``max_vocab_size`` entries in all. ``E`` (``num_entities``) is one more than the largest entity
number in the training files unless given. Entity numbers carry no meaning across files
(DeepMind permutes them per file), so an evaluation file that uses a number ``>= E`` has its
entities renumbered into free numbers below ``E``. The vocabulary is the data module's state
(``state_dict``), stored in checkpoints, so that a restored model reads the same ids.

**Entity shuffling** (Appendix C: "shuffle the order of the placeholders in each text inside the
minibatch"): each time a training example is drawn, its entity numbers are permuted with a random
permutation of ``0..E-1``, the same for its document, query, answer and candidates. The
permutation comes from a seed drawn with the epoch's sample, which depends only on
``(seed, epoch)``: a run is repeatable, and epoch k is the same after a resume.

**Batches** are dicts: ``document`` ``(B, Td)`` int64 ids (0-padded), ``document_lengths``
``(B,)``, ``query`` ``(B, Tq)``, ``query_lengths`` ``(B,)``, ``candidates`` ``(B, E)`` bool (the
entities present in the, possibly filtered, document) and ``answer`` ``(B,)`` int64 in ``[0, E)``.

>>> split_sentences("a b . c ? d".split())
[['a', 'b', '.'], ['c', '?'], ['d']]
>>> select_sentences([["x", "y"], ["q", "z"], ["x", "q"]], ["q", "x", "@placeholder"], 2)
[0, 2]
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rnorm.data.batching import loader
from rnorm.data.download import download as download_file
from rnorm.data.download import file_digest
from rnorm.data.qa_synthetic import SPLIT_FOLDERS, write_synthetic_corpus
from rnorm.data.seeding import keyed_generator

__all__ = [
    "BucketBatchSampler",
    "EpochDrawSampler",
    "QABatchCollator",
    "QADataModule",
    "QADataset",
    "QAExample",
    "QAFormatError",
    "parse_question_file",
    "select_sentences",
    "split_sentences",
]

PAD, UNK, PLACEHOLDER = "<pad>", "<unk>", "@placeholder"
PAD_INDEX, UNK_INDEX, PLACEHOLDER_INDEX = 0, 1, 2
#: Id of ``@entity0``; ``@entityK`` is ``ENTITY_OFFSET + K``.
ENTITY_OFFSET = 3
SENTENCE_END = frozenset({".", "?", "!"})
SPLITS = {"train": "training", "val": "validation", "test": "test"}
_ENTITY = re.compile(r"@entity(\d+)")
_MAPPING = re.compile(r"(@entity\d+):(.*)")

#: The questions tarball (``cnn.tgz``, ~0.5 GB, holding ``cnn/questions/{training,validation,test}``),
#: linked from Kyunghyun Cho's DMQA page (https://cs.nyu.edu/~kcho/DMQA/) on Google Drive.
CNN_URLS = (
    "https://drive.usercontent.google.com/download?id=0BwmD_VLjROrfTTljRDVZMFJnVWM&export=download&confirm=t",
    "https://drive.google.com/uc?export=download&id=0BwmD_VLjROrfTTljRDVZMFJnVWM",
)
#: SHA-256 of ``cnn.tgz`` as ParlAI's ``qacnn`` task pins it. Neither DeepMind nor the DMQA page
#: publishes a checksum, so this is a third party's record of the file, not an authoritative one.
CNN_SHA256 = "9405beb90c9267e7769c86fa42720b7e479bcf38c64217c0d3f456ce8cd122ce"


# -- the file format -----------------------------------------------------------------------------
class QAFormatError(ValueError):
    """A ``.question`` file is malformed; the message names the file, the line and what was expected.

    Attributes:
        path: the file.
        line: the 1-based line number.
    """

    def __init__(self, path: str | os.PathLike, line: int, message: str) -> None:
        super().__init__(f"{path}, line {line}: {message}")
        self.path, self.line = str(path), line


@dataclass(frozen=True)
class QAExample:
    """One parsed ``.question`` file.

    Attributes:
        path: where it was read from.
        url: line 1.
        passage: line 3, tokens separated by single spaces.
        question: line 5, with ``@placeholder``.
        answer: line 7, ``@entityN``.
        entities: ``{"@entityN": name}`` from lines 9 on, in file order.
    """

    path: str
    url: str
    passage: str
    question: str
    answer: str
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        """``N`` of the answer ``@entityN``."""
        return int(self.answer[len("@entity") :])


def parse_question_file(path: str | os.PathLike) -> QAExample:
    """Read one DeepMind ``.question`` file (see the module documentation for its lines).

    Raises:
        QAFormatError: naming the file and line: too few lines, a missing blank separator, an
            empty URL, passage or question, a question without ``@placeholder``, an answer not of
            the form ``@entityN`` or missing from the mapping, or a malformed mapping line.
        OSError: the file cannot be read; ``UnicodeDecodeError`` is reported as ``QAFormatError``.
    """
    try:
        with open(path, encoding="utf-8") as handle:  # universal newlines: \r\n reads as \n
            lines = handle.read().split("\n")
    except UnicodeDecodeError as err:
        raise QAFormatError(path, 1, f"expected UTF-8 text: {err}") from err
    while lines and not lines[-1].strip():
        lines.pop()
    names = {1: "the URL", 3: "the passage", 5: "the question", 7: "the answer"}
    for number in range(1, 8):
        if number > len(lines):
            got = "it ends" if lines else "the file is empty"
            what = names.get(number, "a blank separator line")
            raise QAFormatError(path, number, f"expected {what} on line {number}, but {got} after {len(lines)} lines")
        text = lines[number - 1]
        if number % 2 == 0 and text.strip():
            after = names[number - 1]
            raise QAFormatError(path, number, f"expected a blank separator line after {after} but got {_show(text)}")
        if number % 2 == 1 and not text.strip():
            raise QAFormatError(path, number, f"expected {names[number]} but the line is empty")
    url, passage, question, answer = (lines[i].strip() for i in (0, 2, 4, 6))
    if PLACEHOLDER not in question.split():
        raise QAFormatError(path, 5, f"expected the question to contain {PLACEHOLDER} but got {_show(question)}")
    if not _ENTITY.fullmatch(answer):
        raise QAFormatError(path, 7, f"expected the answer to be of the form @entityN but got {_show(answer)}")
    if len(lines) > 7 and lines[7].strip():
        raise QAFormatError(path, 8, f"expected a blank separator line after the answer but got {_show(lines[7])}")
    entities: dict[str, str] = {}
    for number in range(9, len(lines) + 1):
        match = _MAPPING.fullmatch(lines[number - 1].strip())
        if match is None:
            got = _show(lines[number - 1])
            raise QAFormatError(path, number, f"expected an entity line @entityN:name but got {got}")
        if match.group(1) in entities:
            raise QAFormatError(path, number, f"{match.group(1)} is mapped twice")
        entities[match.group(1)] = match.group(2)
    if answer not in entities:
        where = f"lines 9-{len(lines)}" if entities else "no entity lines follow"
        raise QAFormatError(path, 7, f"expected the answer {answer} to be in the entity mapping ({where})")
    return QAExample(str(path), url, " ".join(passage.split()), " ".join(question.split()), answer, entities)


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# -- the relevance filter ------------------------------------------------------------------------
def split_sentences(tokens: Sequence[str]) -> list[list[str]]:
    """Cut a tokenized passage after every ``.``, ``?`` or ``!`` token (a trailing remainder is a sentence)."""
    sentences, current = [], []
    for token in tokens:
        current.append(token)
        if token in SENTENCE_END:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def _content_words(tokens: Sequence[str]) -> set[str]:
    """Distinct tokens that count for relevance: not ``@placeholder``, with a letter or digit."""
    return {t for t in tokens if t != PLACEHOLDER and any(c.isalnum() for c in t)}


def select_sentences(
    sentences: Sequence[Sequence[str]], question: Sequence[str], num_relevant: int | None
) -> list[int]:
    """Indices, in passage order, of the ``num_relevant`` sentences sharing most distinct words with the question.

    Ties go to the earlier sentence; ``None`` keeps every sentence.
    """
    if num_relevant is None or num_relevant >= len(sentences):
        return list(range(len(sentences)))
    words = _content_words(question)
    scores = [len(words & _content_words(sentence)) for sentence in sentences]
    ranked = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:num_relevant])


def filter_passage(passage: str, question: str, num_relevant: int | None) -> str:
    """The passage reduced to its ``num_relevant`` most relevant sentences (:func:`select_sentences`)."""
    if num_relevant is None:
        return passage
    sentences = split_sentences(passage.split())
    kept = select_sentences(sentences, question.split(), num_relevant)
    return " ".join(token for i in kept for token in sentences[i])


# -- vocabulary and encoding ---------------------------------------------------------------------
def build_vocab(examples: Sequence[tuple[str, str, int]], num_entities: int, max_size: int | None = None) -> list[str]:
    """``[<pad>, <unk>, @placeholder, @entity0, …, @entity{E-1}, words…]`` from ``(document, query, answer)``.

    >>> build_vocab([("@entity0 saw b b a .", "@placeholder saw a", 0)], num_entities=2)
    ['<pad>', '<unk>', '@placeholder', '@entity0', '@entity1', 'a', 'b', 'saw', '.']
    """
    specials = [PAD, UNK, PLACEHOLDER, *(f"@entity{i}" for i in range(num_entities))]
    counts: Counter[str] = Counter()
    for document, query, _ in examples:
        counts.update(document.split())
        counts.update(query.split())
    words = [w for w in counts if w not in (PAD, UNK, PLACEHOLDER) and not _ENTITY.fullmatch(w)]
    words.sort(key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[: max(0, max_size - len(specials))]
    return specials + words


def _entities_of(text: str) -> list[int]:
    return [int(m) for m in _ENTITY.findall(text)]


def encode_example(
    document: str, query: str, answer: int, index: Mapping[str, int], num_entities: int, source: str = "an example"
) -> tuple[Tensor, Tensor, int]:
    """Ids of a document and query (int32) and the answer's entity number, renumbering entities if needed.

    Entities numbered ``>= num_entities`` are given the smallest numbers the example does not use
    (entity numbers are arbitrary per file); the answer follows its entity.

    Raises:
        ValueError: the example uses more distinct entities than ``num_entities``.
    """
    used = sorted(set(_entities_of(document)) | set(_entities_of(query)) | {answer})
    renumber: dict[int, int] = {}
    if used and used[-1] >= num_entities:
        if len(used) > num_entities:
            raise ValueError(
                f"{source} uses {len(used)} distinct entities but the model has num_entities={num_entities}: "
                "set the data module's num_entities to at least that"
            )
        free = iter(sorted(set(range(num_entities)) - set(used)))
        renumber = {k: next(free) for k in used if k >= num_entities}

    def ids(text: str) -> Tensor:
        out = []
        for token in text.split():
            match = _ENTITY.fullmatch(token)
            if match:
                number = int(match.group(1))
                out.append(ENTITY_OFFSET + renumber.get(number, number))
            else:
                out.append(index.get(token, UNK_INDEX))
        return torch.tensor(out, dtype=torch.int32)

    return ids(document), ids(query), renumber.get(answer, answer)


# -- datasets, samplers, batches -----------------------------------------------------------------


class QADataset(Dataset):
    """Encoded examples; ``dataset[i]`` or ``dataset[(i, seed)]`` is a dict ``document``, ``query``, ``answer``.

    With a seed and ``shuffle_entities``, the example's entity numbers are permuted by
    ``randperm(num_entities)`` drawn from that seed, in document, query and answer alike.
    """

    def __init__(
        self,
        documents: Sequence[Tensor],
        queries: Sequence[Tensor],
        answers: Sequence[int],
        num_entities: int,
        shuffle_entities: bool = False,
    ) -> None:
        if not len(documents) == len(queries) == len(answers):
            sizes = f"{len(documents)}, {len(queries)}, {len(answers)}"
            raise ValueError(f"Expected as many documents, queries and answers but got {sizes}")
        self.documents, self.queries, self.answers = documents, queries, answers
        self.num_entities, self.shuffle_entities = num_entities, shuffle_entities

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def document_lengths(self) -> list[int]:
        return [len(d) for d in self.documents]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Tensor]:
        index, seed = (item, None) if isinstance(item, int) else item
        document, query = self.documents[index].long(), self.queries[index].long()
        answer = torch.tensor(int(self.answers[index]))
        if seed is not None and self.shuffle_entities:
            permutation = torch.randperm(self.num_entities, generator=torch.Generator().manual_seed(int(seed)))
            document, query = self._permute(document, permutation), self._permute(query, permutation)
            answer = permutation[answer]
        return {"document": document, "query": query, "answer": answer}

    def _permute(self, ids: Tensor, permutation: Tensor) -> Tensor:
        entity = (ids >= ENTITY_OFFSET) & (ids < ENTITY_OFFSET + self.num_entities)
        number = (ids - ENTITY_OFFSET).clamp(0, self.num_entities - 1)
        return torch.where(entity, ENTITY_OFFSET + permutation[number], ids)


class EpochDrawSampler(Sampler[int]):
    """The example indices of one training epoch, drawn from a generator seeded by ``(seed, epoch)``.

    ``replacement``: ``num_draws`` uniform draws with replacement (BN Appendix C); otherwise a
    permutation of every example. Lightning calls ``set_epoch`` before every epoch (it finds this
    sampler as ``batch_sampler.sampler``).

    >>> sampler = EpochDrawSampler(5, num_draws=8, seed=0)
    >>> sampler.set_epoch(1)
    >>> len(list(sampler)), list(sampler) == list(sampler)
    (8, True)
    """

    def __init__(
        self, num_examples: int, num_draws: int | None = None, seed: int = 0, replacement: bool = True
    ) -> None:
        super().__init__()
        self.num_examples, self.seed, self.replacement = num_examples, seed, replacement
        self.num_draws = num_examples if num_draws is None or not replacement else num_draws
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = keyed_generator(self.seed, self.epoch, "draws")
        if self.replacement:
            yield from torch.randint(self.num_examples, (self.num_draws,), generator=generator).tolist()
        else:
            yield from torch.randperm(self.num_examples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_draws


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Training batches of similar document lengths, in random order, each item ``(index, entity seed)``.

    The epoch's draws (``sampler``) are cut into pools of ``bucket_size`` batches; each pool is
    sorted by document length and cut into batches of ``batch_size``, and the epoch's batches
    are visited in a random order. A last batch of a single example (possible without
    replacement) joins the batch before it: batch statistics need two samples. Every draw gets a
    seed for its entity permutation. Everything depends only on ``(seed, epoch)``.
    """

    def __init__(
        self, sampler: EpochDrawSampler, lengths: Sequence[int], batch_size: int, bucket_size: int = 20
    ) -> None:
        super().__init__()
        if batch_size < 1 or bucket_size < 1:
            raise ValueError(f"Expected batch_size >= 1 and bucket_size >= 1 but got {batch_size} and {bucket_size}")
        self.sampler, self.lengths = sampler, torch.as_tensor(list(lengths))
        self.batch_size, self.bucket_size = batch_size, bucket_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        draws = torch.tensor(list(self.sampler), dtype=torch.long)
        pool_size = self.batch_size * self.bucket_size
        batches: list[list[int]] = []
        for start in range(0, len(draws), pool_size):
            pool = draws[start : start + pool_size]
            pool = pool[torch.sort(self.lengths[pool], stable=True).indices]
            batches.extend(pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size))
        if self.batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._batches()
        generator = keyed_generator(self.sampler.seed, self.sampler.epoch, "batches")
        order = torch.randperm(len(batches), generator=generator).tolist()
        seeds = torch.randint(2**62, (len(self.sampler),), generator=generator).tolist()
        position = 0
        for b in order:
            yield [(index, seeds[position + k]) for k, index in enumerate(batches[b])]
            position += len(batches[b])

    def __len__(self) -> int:
        pools, rest = divmod(len(self.sampler), self.batch_size * self.bucket_size)
        count = pools * self.bucket_size + math.ceil(rest / self.batch_size)
        merged = self.batch_size > 1 and count > 1 and rest % self.batch_size == 1
        return count - merged


class QABatchCollator:
    """Pads examples into a batch dict, computes the candidates and, optionally, trims the unshared tail.

    ``trim_unshared_tail`` crops every document at the batch's second-longest document length, and
    every query at the second-longest query length, so that every step of the encoders has at
    least two unpadded samples (per-step batch statistics need two). Only the longest document
    and query lose their tails; their candidates are those of what remains.
    """

    def __init__(self, num_entities: int, trim_unshared_tail: bool = False) -> None:
        self.num_entities, self.trim_unshared_tail = num_entities, trim_unshared_tail

    def __call__(self, items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        document, document_lengths = self._pad([item["document"] for item in items])
        query, query_lengths = self._pad([item["query"] for item in items])
        return {
            "document": document,
            "document_lengths": document_lengths,
            "query": query,
            "query_lengths": query_lengths,
            "candidates": candidates_of(document, document_lengths, self.num_entities),
            "answer": torch.stack([item["answer"] for item in items]).long(),
        }

    def _pad(self, sequences: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        if self.trim_unshared_tail and len(sequences) > 1:
            lengths = lengths.clamp(max=int(lengths.topk(2).values[1]))
        padded = torch.full((len(sequences), int(lengths.max())), PAD_INDEX, dtype=torch.long)  # (B, T)
        for row, (sequence, length) in enumerate(zip(sequences, lengths.tolist())):
            padded[row, :length] = sequence[:length]
        return padded, lengths


def candidates_of(document: Tensor, lengths: Tensor, num_entities: int) -> Tensor:
    """``(B, E)`` bool: which entities occur in the unpadded part of each document ``(B, T)``.

    >>> candidates_of(torch.tensor([[3, 9, 5], [4, 0, 0]]), torch.tensor([3, 1]), 3).tolist()
    [[True, False, True], [False, True, False]]
    """
    number = document - ENTITY_OFFSET  # (B, T)
    real = torch.arange(document.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    valid = (number >= 0) & (number < num_entities) & real
    counts = torch.zeros(document.shape[0], num_entities, dtype=torch.long)
    counts.scatter_add_(1, number.clamp(0, num_entities - 1), valid.long())
    return counts > 0


# -- the data module -----------------------------------------------------------------------------
class QADataModule(pl.LightningDataModule):
    """The CNN question-answering task (BN §5.4, Appendix C) for the Attentive Reader.

    See the module documentation for the file format, the relevance filter, the ids, the entity
    shuffling and the batches.

    Args:
        data_dir: the folder with ``training/``, ``validation/`` and ``test/`` of ``.question``
            files (directly, or under ``questions/`` or ``cnn/questions/``).
        batch_size: training examples per batch (the paper: 64; 40 for BN-e* and BN-e**).
        eval_batch_size: examples per validation and test batch; ``None``: ``batch_size``.
        num_relevant_sentences: keep only this many passage sentences, the most relevant to the
            question by word overlap, in their original order (the paper: 4); ``None`` keeps the
            whole passage (the full task of BN Table 4).
        shuffle_entities: in training, permute the entity numbers of an example each time it is
            drawn (the paper's practice); validation and test read them as written.
        max_vocab_size: the most entries of the vocabulary, special tokens and entities included;
            the rarer training words read as ``<unk>``. ``None``: every training word.
        num_entities: the number of entity ids ``E``; ``None``: one more than the largest entity
            number of the training files.
        bucket_size: training batches per pool sorted by document length (1: no bucketing
            beyond one batch); the batches of an epoch are visited in random order.
        replacement: draw each training epoch's examples uniformly with replacement (the paper),
            as many as there are examples; ``False``: every example once per epoch.
        trim_unshared_tail: training only: crop every document of a batch at the second-longest
            document length (queries likewise), so that every step has at least two unpadded
            samples. Needed with per-step batch normalization (``bn``), which refuses a step with
            a single sample; the price is the tail of the longest document (and query) of each
            batch, which bucketing keeps short.
        num_workers: data-loader worker processes.
        seed: seed of the training draws, batch order and entity permutations; epoch k depends
            only on it and k.
        download: in ``prepare_data``, fetch DeepMind's CNN questions (``cnn.tgz``) into
            ``data_dir`` when no split folders are there.
        generate_synthetic: in ``prepare_data``, write a synthetic corpus in the same format
            (:mod:`rnorm.data.qa_synthetic`) into ``data_dir`` when it holds no ``.question`` files:
            offline quick runs and tests.
        synthetic_sizes: training, validation and test examples of that corpus.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_relevant_sentences: int | None = 4,
        shuffle_entities: bool = True,
        max_vocab_size: int | None = None,
        num_entities: int | None = None,
        bucket_size: int = 20,
        replacement: bool = True,
        trim_unshared_tail: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = False,
        generate_synthetic: bool = False,
        synthetic_sizes: tuple[int, int, int] = (1000, 200, 200),
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or num_workers < 0:
            raise ValueError(
                f"Expected batch_size >= 1, eval_batch_size >= 1 (or None) and num_workers >= 0 but got "
                f"{batch_size}, {eval_batch_size} and {num_workers}"
            )
        if num_relevant_sentences is not None and num_relevant_sentences < 1:
            raise ValueError(f"Expected num_relevant_sentences >= 1 (or None) but got {num_relevant_sentences}")
        if num_entities is not None and num_entities < 1:
            raise ValueError(f"Expected num_entities >= 1 (or None) but got {num_entities}")
        if bucket_size < 1:
            raise ValueError(f"Expected bucket_size >= 1 but got {bucket_size}")
        if download and generate_synthetic:
            raise ValueError("Choose download (the real CNN questions) or generate_synthetic, not both")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_relevant_sentences = num_relevant_sentences
        self.shuffle_entities = shuffle_entities
        self.max_vocab_size = max_vocab_size
        self.bucket_size = bucket_size
        self.replacement = replacement
        self.trim_unshared_tail = trim_unshared_tail
        self.num_workers = num_workers
        self.seed = seed
        self.download = download
        self.generate_synthetic = generate_synthetic
        self.synthetic_sizes = tuple(synthetic_sizes)
        self._num_entities = num_entities
        #: Fraction of each split's examples whose answer survives the relevance filter (the ceiling on accuracy).
        self.answerable_fraction: dict[str, float] = {}
        self._examples: dict[str, list[tuple[str, str, int]]] = {}  # split: (document, query, answer) as text
        self._max_entity: dict[str, int] = {}  # split: largest entity number in its files
        self._datasets: dict[str, QADataset] = {}  # split: encoded with the current vocabulary
        self._vocab: list[str] | None = None

    # -- where the files are ---------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The folder holding the split folders (``data_dir``, its ``questions/`` or ``cnn/questions/``)."""
        root = Path(self.data_dir).expanduser()
        for candidate in (root, root / "questions", root / "cnn" / "questions"):
            if any((candidate / name).is_dir() for name in SPLIT_FOLDERS):
                return candidate
        return root

    def _files(self, split: str) -> list[Path]:
        folder = self.folder / SPLITS[split]
        files = sorted(folder.glob("*.question")) if folder.is_dir() else []
        if not files:
            state = "has no .question files" if folder.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"Expected the {split} split's .question files in {folder}, which {state}. data_dir should hold "
                f"{', '.join(SPLIT_FOLDERS)} (or questions/ with them); set download: true to fetch the CNN "
                "questions, or generate_synthetic: true for a synthetic corpus."
            )
        return files

    # -- reading ---------------------------------------------------------------------------------
    def examples(self, split: Literal["train", "val", "test"]) -> list[tuple[str, str, int]]:
        """The split's ``(filtered document, query, answer number)`` examples, read on first use."""
        if split not in SPLITS:
            raise ValueError(f"Expected a split in {tuple(SPLITS)} but got {split!r}")
        if split not in self._examples:
            examples, answerable, largest = [], 0, -1
            for path in self._files(split):
                example = parse_question_file(path)
                document = filter_passage(example.passage, example.question, self.num_relevant_sentences)
                if not document:
                    raise QAFormatError(path, 3, "expected a passage with at least one token")
                examples.append((document, example.question, example.answer_index))
                answerable += example.answer in document.split()
                numbers = [example.answer_index, *(int(e[len("@entity") :]) for e in example.entities)]
                largest = max(largest, *numbers, *_entities_of(example.passage), *_entities_of(example.question))
            self._examples[split] = examples
            self._max_entity[split] = largest
            self.answerable_fraction[split] = answerable / len(examples)
            n = self.num_relevant_sentences
            kept = "every sentence" if n is None else f"the {n} most relevant sentences"
            rank_zero_info(
                f"{len(examples):,} {split} examples from {self.folder / SPLITS[split]}; keeping {kept}, "
                f"{self.answerable_fraction[split]:.1%} still contain their answer."
            )
        return self._examples[split]

    @property
    def num_entities(self) -> int:
        """``E``: the checkpoint's if one was loaded, else the argument, else from the training split."""
        if self._vocab is not None:
            return sum(1 for token in self._vocab if _ENTITY.fullmatch(token))
        if self._num_entities is None:
            self.examples("train")
            self._num_entities = self._max_entity["train"] + 1
        return self._num_entities

    @property
    def vocab(self) -> list[str]:
        """``[<pad>, <unk>, @placeholder, @entity0…, words…]``: the checkpoint's, else from the training split."""
        if self._vocab is None:
            self._vocab = build_vocab(self.examples("train"), self.num_entities, self.max_vocab_size)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Entries of :attr:`vocab`."""
        return len(self.vocab)

    def dataset(self, split: Literal["train", "val", "test"]) -> QADataset:
        """The split encoded with the current vocabulary (on first use)."""
        if split not in self._datasets:
            index = {token: i for i, token in enumerate(self.vocab)}
            documents, queries, answers = [], [], []
            for number, (document, query, answer) in enumerate(self.examples(split)):
                d, q, a = encode_example(document, query, answer, index, self.num_entities, f"{split} example {number}")
                documents.append(d)
                queries.append(q)
                answers.append(a)
            shuffle = split == "train" and self.shuffle_entities
            self._datasets[split] = QADataset(documents, queries, answers, self.num_entities, shuffle)
        return self._datasets[split]

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """``download`` or ``generate_synthetic`` into ``data_dir`` when it holds no question files yet."""
        if not (self.download or self.generate_synthetic):
            return
        if any(next(self.folder.glob(f"{name}/*.question"), None) for name in SPLIT_FOLDERS):
            return
        if self.generate_synthetic:
            train, valid, test = self.synthetic_sizes
            write_synthetic_corpus(self.data_dir, train, valid, test, seed=self.seed)
        else:
            download_cnn_questions(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs (fit: train and val; validate: val; test, predict: test; None: all)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, tuple(SPLITS)):
            self.examples(split)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # With replacement, whole batches only: as many draws as examples, rounded up to a batch.
        num_draws = math.ceil(len(dataset) / self.batch_size) * self.batch_size
        draws = EpochDrawSampler(len(dataset), num_draws, self.seed, self.replacement)
        batches = BucketBatchSampler(draws, dataset.document_lengths, self.batch_size, self.bucket_size)
        return self._loader(dataset, batch_sampler=batches, trim=self.trim_unshared_tail)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), batch_size=self.eval_batch_size)

    def _loader(self, dataset: QADataset, trim: bool = False, **batching: Any) -> DataLoader:
        return loader(dataset, self.num_workers, collate_fn=QABatchCollator(self.num_entities, trim), **batching)

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, entities included: a model trained with it needs the same ids."""
        return {"vocab": list(self.vocab)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Use a checkpoint's vocabulary (and so its ``num_entities``) from now on.

        Raises:
            ValueError: the state has no well-formed vocabulary.
        """
        vocab = state_dict.get("vocab")
        ok = isinstance(vocab, (list, tuple)) and all(isinstance(t, str) for t in vocab)
        ok = ok and len(set(vocab)) == len(vocab)
        if ok:
            entities = [t for t in vocab if _ENTITY.fullmatch(t)]
            expected = [PAD, UNK, PLACEHOLDER, *(f"@entity{i}" for i in range(len(entities)))]
            ok = bool(entities) and list(vocab[: len(expected)]) == expected
        if not ok:
            raise ValueError(
                f"Expected a QADataModule state with a vocabulary [{PAD}, {UNK}, {PLACEHOLDER}, @entity0, …, "
                f"words…] of distinct strings but got {str(vocab)[:200]}"
            )
        vocab = list(vocab)
        if self._vocab is not None and self._vocab != vocab:
            rank_zero_warn(
                f"The checkpoint's vocabulary ({len(vocab)} entries) differs from this data module's "
                f"({len(self._vocab)}): using the checkpoint's, which the model was trained with."
            )
        if vocab != self._vocab:
            self._datasets.clear()
        self._vocab = vocab


# -- download ------------------------------------------------------------------------------------
def download_cnn_questions(folder: str | os.PathLike) -> Path:
    """Fetch ``cnn.tgz`` (:data:`CNN_URLS`, SHA-256-checked against :data:`CNN_SHA256`) and extract its questions.

    The three split folders land in ``folder/questions/`` (moved there whole once extracted, so
    they are complete or absent); the archive is deleted afterwards. Google Drive may answer with
    a confirmation page instead of the file: the checksum then fails and the error says how to
    download the file by hand. A ``cnn.tgz`` already in ``folder`` is used as it is (with a
    warning if its checksum differs).

    Raises:
        RuntimeError: every URL failed or gave a file with another checksum.
    """
    folder = Path(folder).expanduser()
    target = folder / "questions"
    if all((target / name).is_dir() for name in SPLIT_FOLDERS):
        return target
    archive = folder / "cnn.tgz"
    failures = []
    if archive.exists() and file_digest(archive, "sha256") != CNN_SHA256:  # put there by hand: used, never deleted
        rank_zero_warn(f"{archive} has another SHA-256 than ParlAI's record of cnn.tgz, {CNN_SHA256}; using it.")
    for url in CNN_URLS if not archive.exists() else ():
        try:
            download_file([url], archive, md5=None, timeout=600.0)
        except RuntimeError as err:
            failures.append(str(err).split("\n", 1)[-1].strip())
            continue
        got = file_digest(archive, "sha256")
        if got == CNN_SHA256:
            break
        archive.unlink()  # Google Drive's confirmation page, most likely
        failures.append(f"{url}: SHA-256 {got}, expected {CNN_SHA256}")
    if not archive.exists():
        raise RuntimeError(
            "Could not download cnn.tgz:\n  " + "\n  ".join(failures) + "\nDownload the CNN questions from "
            f"https://cs.nyu.edu/~kcho/DMQA/ by hand and put cnn.tgz (or its extracted questions/ folder) in {folder}."
        )
    partial = folder / ".questions.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and "/questions/" in f"/{member.name}" and member.name.endswith(".question")):
                continue
            split = Path(member.name).parent.name
            if split in SPLIT_FOLDERS:
                member.name = f"{split}/{Path(member.name).name}"
                try:
                    tar.extract(member, partial, filter="data")
                except TypeError:  # Python without extraction filters: names were just made safe above
                    tar.extract(member, partial)
    os.replace(partial, target)
    archive.unlink()
    return target
