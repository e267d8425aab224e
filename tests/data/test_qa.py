"""The CNN question format, the relevance filter, entity shuffling, batches and the synthetic corpus.

Everything runs on corpora generated in ``tmp_path``; nothing touches the network.
"""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from rnorm.data import QADataModule, QAExample, QAFormatError, parse_question_file, write_synthetic_corpus
from rnorm.data import qa as qa_module
from rnorm.data.qa import (
    ENTITY_OFFSET,
    BucketBatchSampler,
    EpochDrawSampler,
    filter_passage,
    select_sentences,
    split_sentences,
)
from rnorm.data.qa_synthetic import SyntheticQuestion, synthetic_question
from rnorm.data.qa_synthetic import main as synthetic_main

GOOD = """http://example.com/story

@entity0 met @entity1 in paris . @entity1 left .

@placeholder met @entity1 in paris

@entity0

@entity0:Anna Smith
@entity1:Ben Chen
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cnn")
    write_synthetic_corpus(folder, num_train=48, num_valid=12, num_test=12, seed=3)
    return folder


def _write(folder: Path, text: str, name: str = "x.question") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the parser ----------------------------------------------------------------------------------
def test_parse_reads_every_field(tmp_path):
    example = parse_question_file(_write(tmp_path, GOOD))
    assert example == QAExample(
        path=str(tmp_path / "x.question"),
        url="http://example.com/story",
        passage="@entity0 met @entity1 in paris . @entity1 left .",
        question="@placeholder met @entity1 in paris",
        answer="@entity0",
        entities={"@entity0": "Anna Smith", "@entity1": "Ben Chen"},
    )
    assert example.answer_index == 0
    # Windows line ends and no final newline read the same.
    same = parse_question_file(_write(tmp_path, GOOD.strip().replace("\n", "\r\n"), "crlf.question"))
    assert (same.passage, same.question, same.answer, same.entities) == (example.passage, example.question, example.answer, example.entities)


def test_generated_files_round_trip(corpus):
    files = sorted(corpus.glob("*/*.question"))
    assert len(files) == 48 + 12 + 12
    for path in files:
        example = parse_question_file(path)
        assert re.fullmatch(r"[0-9a-f]{40}\.question", path.name)  # named by hash, like DeepMind's
        assert "@placeholder" in example.question.split() and example.answer in example.entities
        assert example.answer in example.passage.split()  # the full passage always answers
        # Entities are numbered 0..n-1, and the mapping covers every entity used.
        used = set(re.findall(r"@entity\d+", example.passage + " " + example.question))
        assert set(example.entities) == used | {example.answer} == {f"@entity{i}" for i in range(len(used))}
    # Writing a parsed example back gives the same file.
    example = parse_question_file(files[0])
    text = SyntheticQuestion(example.url, example.passage, example.question, example.answer, example.entities, False).to_text()
    assert text == files[0].read_text()


MALFORMED = {
    # name: (edit of GOOD's lines, the line named, words of the message)
    "answer not an entity": (lambda lines: lines.__setitem__(6, "Anna Smith"), 7, "of the form @entityN"),
    "answer not in the mapping": (lambda lines: lines.__setitem__(6, "@entity7"), 7, "entity mapping"),
    "no blank after the passage": (lambda lines: lines.__setitem__(3, "stray text"), 4, "blank separator line"),
    "no blank after the answer": (lambda lines: lines.__setitem__(7, "@entity0:Anna"), 8, "blank separator line"),
    "empty passage": (lambda lines: lines.__setitem__(2, "  "), 3, "expected the passage"),
    "empty url": (lambda lines: lines.__setitem__(0, ""), 1, "expected the URL"),
    "question without placeholder": (lambda lines: lines.__setitem__(4, "who met @entity1"), 5, "@placeholder"),
    "bad mapping line": (lambda lines: lines.__setitem__(9, "Ben Chen"), 10, "@entityN:name"),
    "entity mapped twice": (lambda lines: lines.__setitem__(9, "@entity0:Other"), 10, "mapped twice"),
    "truncated": (lambda lines: lines.__delitem__(slice(3, None)), 4, "blank separator line"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_files_name_the_file_the_line_and_what_was_expected(tmp_path, kind):
    edit, line, words = MALFORMED[kind]
    lines = GOOD.split("\n")
    edit(lines)
    path = _write(tmp_path, "\n".join(lines))
    with pytest.raises(QAFormatError) as error:
        parse_question_file(path)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert words in message and error.value.line == line and error.value.path == str(path)


def test_empty_and_undecodable_files(tmp_path):
    with pytest.raises(QAFormatError, match=r"line 1: expected the URL on line 1, but the file is empty"):
        parse_question_file(_write(tmp_path, ""))
    path = tmp_path / "latin1.question"
    path.write_bytes(GOOD.replace("Anna", "Ann\xe9").encode("latin-1"))
    with pytest.raises(QAFormatError, match="expected UTF-8"):
        parse_question_file(path)


# -- the relevance filter ------------------------------------------------------------------------
def test_split_sentences_cuts_after_end_tokens():
    assert split_sentences("a b . c ? d ! e".split()) == [["a", "b", "."], ["c", "?"], ["d", "!"], ["e"]]
    assert split_sentences([]) == []


def test_select_keeps_the_most_relevant_in_passage_order():
    question = "@placeholder visited @entity3 in new york".split()
    sentences = [s.split() for s in (
        "the weather was cold .",            # 0 shared words
        "@entity1 visited @entity3 .",       # 2: visited, @entity3
        "@entity2 met @entity4 in paris .",  # 1: in
        "@entity5 visited paris in new york .",  # 4: visited, in, new, york
        "@entity3 said nothing in court .",  # 2: @entity3, in (ties with 1: the earlier wins)
        "it was new .",                      # 1: new
    )]  # fmt: skip
    # By hand: the scores are 0, 2, 1, 4, 2, 1 (punctuation and @placeholder never count).
    assert select_sentences(sentences, question, 3) == [1, 3, 4]
    assert select_sentences(sentences, question, 1) == [3]
    assert select_sentences(sentences, question, 6) == [0, 1, 2, 3, 4, 5]
    assert select_sentences(sentences, question, None) == [0, 1, 2, 3, 4, 5]
    assert select_sentences([["."], ["?"]], ["@placeholder", "."], 1) == [0]  # all tie at 0: the first
    assert filter_passage("a . b x . c x y .", "x y @placeholder", 2) == "b x . c x y ."


def test_the_generator_strips_the_answer_exactly_when_it_says_so():
    stripped = 0
    for seed in range(300):
        example = synthetic_question(random.Random(seed), "u", strip_probability=0.4)
        kept = filter_passage(example.passage, example.question, 4).split()
        assert (example.answer not in kept) == example.stripped, example
        assert example.answer in example.passage.split()
        stripped += example.stripped
    assert 0.3 < stripped / 300 < 0.5  # about the requested 0.4


def test_answerable_fraction_is_the_fraction_of_answers_left_by_the_filter(corpus):
    reference = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        examples = [parse_question_file(p) for p in sorted((corpus / folder).glob("*.question"))]
        reference[split] = sum(e.answer in filter_passage(e.passage, e.question, 4).split() for e in examples) / len(examples)
    module = QADataModule(str(corpus), batch_size=4)
    module.setup("fit")
    assert module.answerable_fraction == pytest.approx(reference, abs=0)
    assert 0 < reference["train"] < 1
    whole = QADataModule(str(corpus), batch_size=4, num_relevant_sentences=None)
    whole.setup("fit")
    assert whole.answerable_fraction == {"train": 1.0, "val": 1.0}


# -- batches -------------------------------------------------------------------------------------
def _module(corpus: Path, **kwargs) -> QADataModule:
    options = dict(batch_size=4, bucket_size=2)
    options.update(kwargs)
    module = QADataModule(str(corpus), **options)
    module.setup("fit")
    return module


def test_batches_hold_padded_ids_lengths_candidates_and_answers(corpus):
    module = _module(corpus, shuffle_entities=False)
    E = module.num_entities
    assert module.vocab[: ENTITY_OFFSET + E] == ["<pad>", "<unk>", "@placeholder", *(f"@entity{i}" for i in range(E))]
    examples = module.examples("val")
    index = {token: i for i, token in enumerate(module.vocab)}
    for start, batch in zip(range(0, 12, 4), module.val_dataloader()):
        assert set(batch) == {"document", "document_lengths", "query", "query_lengths", "candidates", "answer"}
        assert batch["document"].dtype == batch["query"].dtype == batch["answer"].dtype == torch.long
        assert batch["candidates"].dtype == torch.bool and batch["candidates"].shape == (4, E)
        for row, (document, query, answer) in enumerate(examples[start : start + 4]):
            words = document.split()
            length = int(batch["document_lengths"][row])
            assert length == len(words)
            assert batch["document"][row, :length].tolist() == [index.get(w, 1) for w in words]
            assert batch["document"][row, length:].eq(0).all()
            assert batch["query"][row, : int(batch["query_lengths"][row])].tolist() == [index.get(w, 1) for w in query.split()]
            present = {int(w[len("@entity") :]) for w in words if w.startswith("@entity")}
            assert batch["candidates"][row].nonzero().flatten().tolist() == sorted(present)
            assert int(batch["answer"][row]) == answer
            assert bool(batch["candidates"][row, answer]) == (f"@entity{answer}" in words)


def test_training_batches_are_bucketed_whole_and_repeatable(corpus):
    module = _module(corpus, batch_size=4, bucket_size=3)
    loader = module.train_dataloader()
    assert isinstance(loader.batch_sampler, BucketBatchSampler)
    _set_sampler_epoch(loader, 5)  # what Lightning calls before every epoch
    assert loader.batch_sampler.sampler.epoch == 5
    batches = list(loader)
    assert len(batches) == len(loader) == 12  # 48 draws with replacement, in whole batches
    assert all(len(b["answer"]) == 4 for b in batches)
    again = _module(corpus, batch_size=4, bucket_size=3).train_dataloader()
    _set_sampler_epoch(again, 5)
    for first, second in zip(batches, again):
        for key in first:
            assert torch.equal(first[key], second[key])
    _set_sampler_epoch(again, 6)  # another epoch, other draws
    assert [b["document"].tolist() for b in again] != [b["document"].tolist() for b in batches]


@pytest.mark.parametrize("num_examples,batch_size,bucket_size,replacement", [(48, 4, 3, True), (13, 4, 2, False), (9, 4, 1, False), (10, 3, 5, False), (7, 8, 2, False)])
def test_bucket_batches_cover_the_draws_and_have_the_announced_length(num_examples, batch_size, bucket_size, replacement):
    lengths = [(7 * i) % 11 + 1 for i in range(num_examples)]
    draws = EpochDrawSampler(num_examples, num_examples, seed=1, replacement=replacement)
    sampler = BucketBatchSampler(draws, lengths, batch_size, bucket_size)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    indices = [index for batch in batches for index, _ in batch]
    assert sorted(indices) == sorted(draws)
    if not replacement:
        assert sorted(indices) == list(range(num_examples))  # every example once
    assert all(2 <= len(batch) <= batch_size + 1 for batch in batches)  # a last single example joins the batch before
    assert len({seed for batch in batches for _, seed in batch}) == len(indices)  # one entity seed per draw


def test_buckets_sort_by_document_length():
    lengths = list(range(40, 0, -1))
    sampler = BucketBatchSampler(EpochDrawSampler(40, seed=0, replacement=False), lengths, batch_size=4, bucket_size=10)
    for batch in sampler:  # one pool: each batch is 4 consecutive lengths
        got = sorted(lengths[i] for i, _ in batch)
        assert got == list(range(got[0], got[0] + 4))


def test_trim_unshared_tail_leaves_two_samples_at_every_step(corpus):
    module = _module(corpus, batch_size=4, bucket_size=1, trim_unshared_tail=True, shuffle_entities=False)
    plain = _module(corpus, batch_size=4, bucket_size=1, shuffle_entities=False)
    for trimmed, full in zip(module.train_dataloader(), plain.train_dataloader()):
        for key in ("document", "query"):
            lengths, original = trimmed[f"{key}_lengths"], full[f"{key}_lengths"]
            second = sorted(original.tolist())[-2]
            assert lengths.tolist() == original.clamp(max=second).tolist()
            assert trimmed[key].shape[1] == second
            steps = torch.arange(second).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
            assert (steps.sum(1) >= 2).all()
            assert torch.equal(trimmed[key], full[key][:, :second])
        # Candidates are those of what is left.
        reference = qa_module.candidates_of(trimmed["document"], trimmed["document_lengths"], module.num_entities)
        assert torch.equal(trimmed["candidates"], reference)


# -- entity shuffling ----------------------------------------------------------------------------
def test_entity_shuffling_permutes_document_query_answer_and_candidates_together(corpus):
    module = _module(corpus, shuffle_entities=True)
    dataset = module.dataset("train")
    E = module.num_entities
    collate = qa_module.QABatchCollator(E)
    changed = 0
    for index in range(len(dataset)):
        plain, shuffled = dataset[index], dataset[(index, 1000 + index)]
        mapping: dict[int, int] = {}
        for key in ("document", "query"):
            assert plain[key].shape == shuffled[key].shape
            for before, after in zip(plain[key].tolist(), shuffled[key].tolist()):
                if ENTITY_OFFSET <= before < ENTITY_OFFSET + E:
                    assert ENTITY_OFFSET <= after < ENTITY_OFFSET + E
                    assert mapping.setdefault(before - ENTITY_OFFSET, after - ENTITY_OFFSET) == after - ENTITY_OFFSET
                else:
                    assert before == after  # words untouched
        answer = int(plain["answer"])
        assert mapping.setdefault(answer, int(shuffled["answer"])) == int(shuffled["answer"])
        assert len(set(mapping.values())) == len(mapping)  # one-to-one
        changed += any(k != v for k, v in mapping.items())
        before, after = (collate([item])["candidates"][0].nonzero().flatten().tolist() for item in (plain, shuffled))
        assert before == sorted({i - ENTITY_OFFSET for i in plain["document"].tolist() if i >= ENTITY_OFFSET and i < ENTITY_OFFSET + E})
        assert after == sorted(mapping[k] for k in before)
        # The same seed gives the same permutation.
        assert torch.equal(dataset[(index, 1000 + index)]["document"], shuffled["document"])
    assert changed > len(dataset) // 2
    # Evaluation data is never shuffled.
    val = module.dataset("val")
    assert torch.equal(val[(0, 7)]["document"], val[0]["document"])


# -- vocabulary, entity numbers, checkpoints -----------------------------------------------------
def test_vocabulary_is_saved_and_restored(corpus):
    module = _module(corpus)
    state = module.state_dict()
    other = QADataModule(str(corpus), max_vocab_size=module.num_entities + 5)
    assert other.vocab_size == module.num_entities + 5 and other.vocab_size < module.vocab_size
    with pytest.warns(UserWarning, match="using the checkpoint's"):
        other.load_state_dict(state)
    assert other.vocab == module.vocab and other.num_entities == module.num_entities
    other.setup("fit")
    assert torch.equal(other.dataset("val").documents[0], module.dataset("val").documents[0])
    for bad in ({}, {"vocab": ["<pad>", "<unk>"]}, {"vocab": ["<unk>", "<pad>", "@placeholder", "@entity0"]}, {"vocab": [*state["vocab"], "a", "a"]}):
        with pytest.raises(ValueError, match="Expected a QADataModule state"):
            other.load_state_dict(bad)


def test_entity_numbers_beyond_the_training_range_are_renumbered(tmp_path):
    write_synthetic_corpus(tmp_path, num_train=8, num_valid=1, num_test=1, seed=0)
    E = QADataModule(str(tmp_path)).num_entities
    lines = GOOD.replace("@entity1", f"@entity{E + 40}").split("\n")
    folder = tmp_path / "validation"
    for path in folder.glob("*.question"):
        path.unlink()
    _write(folder, "\n".join(lines))
    module = QADataModule(str(tmp_path), batch_size=2)
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    # @entity0 stays 0; @entity{E+40} takes the smallest free number, 1, in document and query alike.
    words = "@entity0 met @entity1 in paris . @entity1 left .".split()
    index = {t: i for i, t in enumerate(module.vocab)}
    assert batch["document"][0].tolist() == [index.get(w, 1) for w in words]
    assert batch["query"][0].tolist() == [index.get(w, 1) for w in "@placeholder met @entity1 in paris".split()]
    with pytest.raises(ValueError, match="uses 3 distinct entities but the model has num_entities=2"):
        qa_module.encode_example("@entity0 @entity5 @entity9", "@placeholder", 0, index, 2, "the example")


def test_missing_split_folder_says_where_and_what(tmp_path):
    module = QADataModule(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError) as error:
        module.setup("fit")
    message = str(error.value)
    assert str(tmp_path / "nothing" / "training") in message and "download" in message and "generate_synthetic" in message


def test_generate_synthetic_writes_only_into_an_empty_folder(tmp_path):
    module = QADataModule(str(tmp_path / "synthetic"), generate_synthetic=True, synthetic_sizes=(6, 2, 2))
    module.prepare_data()
    assert len(list((tmp_path / "synthetic" / "training").glob("*.question"))) == 6
    module = QADataModule(str(tmp_path / "synthetic"), generate_synthetic=True, synthetic_sizes=(9, 2, 2))
    module.prepare_data()  # files are there: nothing is written
    assert len(list((tmp_path / "synthetic" / "training").glob("*.question"))) == 6
    with pytest.raises(ValueError, match="not both"):
        QADataModule(str(tmp_path), download=True, generate_synthetic=True)


def test_a_hand_placed_tarball_is_extracted_into_questions(tmp_path, corpus):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(corpus.glob("*/*.question")):
            tar.add(path, arcname=f"cnn/questions/{path.parent.name}/{path.name}")
    (tmp_path / "cnn.tgz").write_bytes(buffer.getvalue())
    module = QADataModule(str(tmp_path), download=True)
    with pytest.warns(UserWarning, match="another SHA-256"):
        module.prepare_data()
    assert not (tmp_path / "cnn.tgz").exists()
    assert len(list((tmp_path / "questions" / "training").glob("*.question"))) == 48
    assert module.folder == tmp_path / "questions"
    module.setup("fit")
    assert len(module.examples("train")) == 48


def test_generator_is_deterministic_and_runnable_as_a_module(tmp_path, capsys):
    assert synthetic_main([str(tmp_path / "a"), "--num-train", "3", "--num-valid", "1", "--num-test", "1", "--seed", "4"]) == 0
    assert "3 training" in capsys.readouterr().out
    write_synthetic_corpus(tmp_path / "b", num_train=3, num_valid=1, num_test=1, seed=4)
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.question")}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*.question")}
    assert files_a == files_b and len(files_a) == 5
    assert not list((tmp_path / "a").rglob("*.part"))  # atomic writes leave no partial files
