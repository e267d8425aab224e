"""A synthetic corpus in the DeepMind CNN question format, for tests and quick offline runs.

Every example is a short "news" passage of fact sentences between anonymized entities
(``@entity3 praised @entity0 in new york .``) and a cloze question that restates one fact with one
of its entities replaced by ``@placeholder`` (``@placeholder praised @entity0 in new york``). The
answer is the entity the placeholder hides, and it always appears in the passage, so the task is
learnable: find the sentence with the question's verb and place (or, failing that, its verb and
other entity), and read off the entity in the placeholder's role. Distractors that share the verb
or the place, unrelated facts and filler sentences make attention necessary.

With probability ``strip_probability`` an example is made so that the answering sentence is *not*
among the ``num_relevant`` sentences most relevant to the question by word overlap (the filter of
:func:`rnorm.data.qa.select_sentences`, BN Appendix C): the answering sentence omits the place,
and ``num_relevant`` distractors repeat the question's verb and place. The answer entity then
appears nowhere else, so the filter strips it, as the paper's heuristic stripped the answer from
about 43 % of the CNN validation passages (an upper bound of 57 % accuracy). The full passage
still answers the question.

As in DeepMind's files, each file numbers its entities with a random permutation of ``0..n-1``
and is named by the SHA-1 of its URL. Files are written atomically (complete or absent).

Run it as ``python -m rnorm.data.qa_synthetic OUT_DIR --num-train 1000``.

>>> import tempfile
>>> from rnorm.data.qa import parse_question_file
>>> counts = write_synthetic_corpus(tempfile.mkdtemp(), num_train=3, num_valid=1, num_test=1, seed=0)
>>> counts
{'training': 3, 'validation': 1, 'test': 1}
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["SPLIT_FOLDERS", "SyntheticQuestion", "synthetic_question", "write_synthetic_corpus"]

#: The DeepMind split folders, in the order training, validation, test.
SPLIT_FOLDERS = ("training", "validation", "test")

VERBS = (
    "met", "visited", "praised", "called", "hired", "sued", "thanked", "interviewed", "defeated",
    "joined", "followed", "criticized", "warned", "replaced", "endorsed", "married",
)  # fmt: skip
#: Every place has at least two words, so a distractor (verb and place) outranks a placeless
#: answering sentence (verb and the other entity) in word overlap.
PLACES = (
    ("in", "paris"), ("in", "london"), ("in", "new", "york"), ("at", "the", "summit"),
    ("at", "the", "stadium"), ("in", "court"), ("on", "monday"), ("on", "friday"),
    ("in", "berlin"), ("at", "the", "airport"), ("in", "tokyo"), ("at", "the", "hospital"),
)  # fmt: skip
#: Sentences without entities or place words (at most "the", so at most one word of overlap).
FILLERS = (
    "officials said talks would continue .",
    "more details were not released .",
    "it was not clear what happened next .",
    "the weather was cold .",
    "police said nobody was hurt .",
    "a spokesman declined to comment .",
)
FIRST_NAMES = ("anna", "ben", "carla", "david", "elena", "farid", "grace", "hugo", "ines", "jamal", "kate", "liam")
LAST_NAMES = ("smith", "garcia", "chen", "okafor", "novak", "rossi", "tanaka", "muller", "silva", "haddad")


@dataclass(frozen=True)
class SyntheticQuestion:
    """One generated example, before it is written: the fields of a ``.question`` file.

    ``stripped`` says whether it was made so that the relevance filter removes the answer.
    """

    url: str
    passage: str
    question: str
    answer: str
    entities: dict[str, str]
    stripped: bool

    def to_text(self) -> str:
        """The ``.question`` file: URL, passage, question, answer and entity lines, blank-separated."""
        mapping = "\n".join(f"{entity}:{name}" for entity, name in self.entities.items())
        return f"{self.url}\n\n{self.passage}\n\n{self.question}\n\n{self.answer}\n\n{mapping}\n"


def synthetic_question(
    rng: random.Random,
    url: str,
    strip_probability: float = 0.43,
    num_relevant: int = 4,
    num_entities: tuple[int, int] = (5, 9),
) -> SyntheticQuestion:
    """Draw one example (see the module documentation).

    Args:
        rng: the source of randomness.
        url: the example's URL (line 1 of its file).
        strip_probability: probability that the answering sentence ranks below ``num_relevant``
            distractors in word overlap with the question.
        num_relevant: the number of sentences the relevance filter keeps.
        num_entities: the inclusive range of how many entities an example draws from.
    """
    low, high = num_entities
    if low < 4 or high < low:
        raise ValueError(f"Expected num_entities = (low, high) with 4 <= low <= high but got {num_entities}")
    people = list(range(rng.randint(low, high)))  # local entity numbers
    subject, obj = rng.sample(people, 2)
    verb, place = rng.choice(VERBS), rng.choice(PLACES)
    hide_subject = rng.random() < 0.5
    answer, other = (subject, obj) if hide_subject else (obj, subject)
    stripped = rng.random() < strip_probability

    sentences: list[list[object]] = []
    answering = [subject, verb, obj] + ([] if stripped else list(place)) + ["."]
    sentences.append(answering)
    # Distractors, between other entities. When stripped: num_relevant of them repeat the verb and
    # the place, and so outrank the placeless answering sentence. Otherwise a few repeat the verb or
    # the place, not both: the answering sentence is the only one with both.
    bystanders = [p for p in people if p not in (answer, other)]
    other_verbs, other_places = [v for v in VERBS if v != verb], [p for p in PLACES if p != place]
    for _ in range(num_relevant if stripped else rng.randint(0, 3)):
        first, second = rng.sample(bystanders, 2)
        if stripped:
            sentences.append([first, verb, second, *place, "."])
        elif rng.random() < 0.5:
            sentences.append([first, verb, second, *rng.choice(other_places), "."])
        else:
            sentences.append([first, rng.choice(other_verbs), second, *place, "."])
    # Unrelated facts: another verb, so that the answering sentence stays the only match; when
    # stripped, without the answer entity, so that the filter really removes it.
    pool = bystanders + [other] if stripped else people
    for _ in range(rng.randint(1, 3)):
        first, second = rng.sample(pool, 2)
        sentences.append([first, rng.choice(other_verbs), second, *rng.choice(PLACES), "."])
    for _ in range(rng.randint(0, 2)):
        sentences.append(FILLERS[rng.randrange(len(FILLERS))].split())
    rng.shuffle(sentences)

    # Number the entities that occur with a random permutation, as DeepMind's files do.
    used = sorted({token for sentence in sentences for token in sentence if isinstance(token, int)})
    ids = dict(zip(used, rng.sample(range(len(used)), len(used))))
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], len(used))

    def word(token: object) -> str:
        return f"@entity{ids[token]}" if isinstance(token, int) else str(token)

    passage = " ".join(word(token) for sentence in sentences for token in sentence)
    question = [word(subject), verb, word(obj), *place]
    question[0 if hide_subject else 2] = "@placeholder"
    entities = {f"@entity{i}": names[i] for i in range(len(used))}
    return SyntheticQuestion(url, passage, " ".join(question), word(answer), entities, stripped)


def write_synthetic_corpus(
    folder: str | os.PathLike,
    num_train: int = 1000,
    num_valid: int = 200,
    num_test: int = 200,
    seed: int = 0,
    strip_probability: float = 0.43,
    num_relevant: int = 4,
    num_entities: tuple[int, int] = (5, 9),
) -> dict[str, int]:
    """Write ``folder/{training,validation,test}/<sha1 of url>.question`` files.

    The corpus depends only on the arguments: the same call writes the same bytes. Existing files
    of the same names are replaced.

    Args:
        folder: where the three split folders go (created if needed).
        num_train: examples in ``training``.
        num_valid: examples in ``validation``.
        num_test: examples in ``test``.
        seed: seed of the whole corpus.
        strip_probability: probability that the relevance filter strips the answer (about 0.43
            mimics the CNN validation set's 57 % ceiling of BN Appendix C).
        num_relevant: the number of sentences the filter is assumed to keep.
        num_entities: inclusive range of the number of entities per example.

    Returns:
        The number of files written per split folder.
    """
    if not 0.0 <= strip_probability <= 1.0:
        raise ValueError(f"Expected strip_probability in [0, 1] but got {strip_probability}")
    counts = dict(zip(SPLIT_FOLDERS, (num_train, num_valid, num_test)))
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"Expected a non-negative number of {split} examples but got {count}")
        for index in range(count):
            url = f"http://synthetic.rnorm.invalid/{split}/{seed}/{index}"
            digest = hashlib.sha256(url.encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "little"))
            example = synthetic_question(rng, url, strip_probability, num_relevant, num_entities)
            name = hashlib.sha1(url.encode()).hexdigest()
            atomic_write_bytes(Path(folder) / split / f"{name}.question", example.to_text().encode("utf-8"))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rnorm.data.qa_synthetic OUT_DIR [--num-train N] …``."""
    parser = argparse.ArgumentParser(
        prog="python -m rnorm.data.qa_synthetic",
        description="Write a synthetic corpus in the DeepMind CNN question format.",
    )
    parser.add_argument("out_dir", help="folder that receives training/, validation/ and test/")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-valid", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip-probability", type=float, default=0.43)
    parser.add_argument("--num-relevant", type=int, default=4)
    args = parser.parse_args(argv)
    sizes = (args.num_train, args.num_valid, args.num_test)
    counts = write_synthetic_corpus(args.out_dir, *sizes, args.seed, args.strip_probability, args.num_relevant)
    print(", ".join(f"{count} {split}" for split, count in counts.items()) + f" examples written to {args.out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
