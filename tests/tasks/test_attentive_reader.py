"""The Attentive Reader: its equations against a hand-written loop, padding, the loss, every config.

Numbers are checked in float64 against per-example references that never see padding, with an
absolute tolerance of 1e-10 (float64 rounding of sums taken over different shapes is ~1e-16).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from rnorm import cli as cli_module
from rnorm import lightning_cli, norms
from rnorm.data import QADataModule, write_synthetic_corpus
from rnorm.data.qa import candidates_of
from rnorm.nn import NormLSTM
from rnorm.norms import BatchStatisticsNorm, SequenceBatchNorm, TimeBatchNorm
from rnorm.tasks import AttentiveReader

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "qa").glob("*.yaml"))
ATOL = 1e-10
V, E = 30, 6

#: The variants of BN §5.4: encoder strategies (NormLSTM's default is bn/bn/bn) and attention_norm.
VARIANTS = {
    "lstm": (dict(input_norm="none", recurrent_norm="none", cell_norm="none"), "none"),
    "bnlstm": ({}, "none"),
    "bn-everywhere": ({}, "seqbn"),
    "bn-everywhere-per-position": ({}, "bn"),
    "bn-e*": (dict(input_norm="seqbn"), "seqbn"),
    "bn-e**": (dict(input_norm="seqbn", bidirectional=True), "seqbn"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _reader(variant: str, hidden_size: int = 5, **kwargs) -> AttentiveReader:
    encoder, attention = VARIANTS[variant]
    torch.manual_seed(0)
    options = dict(vocab_size=V, num_entities=E, embedding_size=4, attention_norm=attention, attention_size=7)
    options.update(kwargs)
    return AttentiveReader(functools.partial(NormLSTM, hidden_size=hidden_size, **encoder), **options).double()


def _batch(lengths: list[int], query_lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    B = len(lengths)
    document = torch.randint(3, V, (B, max(lengths)), generator=generator)
    query = torch.randint(3, V, (B, max(query_lengths)), generator=generator)
    document_lengths, query_lengths_t = torch.tensor(lengths), torch.tensor(query_lengths)
    document[torch.arange(max(lengths)).unsqueeze(0) >= document_lengths.unsqueeze(1)] = 0
    query[torch.arange(max(query_lengths)).unsqueeze(0) >= query_lengths_t.unsqueeze(1)] = 0
    candidates = candidates_of(document, document_lengths, E)
    answer = torch.randint(0, E, (B,), generator=generator)
    return dict(document=document, document_lengths=document_lengths, query=query, query_lengths=query_lengths_t,
                candidates=candidates, answer=answer)  # fmt: skip


def _warm(model: AttentiveReader) -> AttentiveReader:
    """A few training-mode passes, so that population statistics are not the initial 0 and 1."""
    model.train()
    for seed in range(3):
        model(_batch([6, 6, 5, 3], [3, 3, 2, 1], seed=10 + seed))  # every step has 2 unpadded samples
    return model.eval()


# -- the equations ---------------------------------------------------------------------------------
def _normalized(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A term's normalization in evaluation, written out: identity, or population-statistics BN."""
    if type(norm).__name__ == "Identity":
        return x
    assert isinstance(norm, (SequenceBatchNorm, TimeBatchNorm)) and not norm.training
    mean, var = norm.running_mean[0], norm.running_var[0]  # one slot: seqbn, or bn on a (1, B, F) term at t = 0
    return norm.gamma * (x - mean) / torch.sqrt(var + norm.eps)


def _reference(model: AttentiveReader, batch: dict[str, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (E,) and attention (T_b,) of example b, run alone without padding, attention by a loop."""
    T, Tq = int(batch["document_lengths"][b]), int(batch["query_lengths"][b])
    y, _ = model.encoder(model.embedding(batch["document"][b : b + 1, :T]))  # (1, T, Dy)
    q, _ = model.query_encoder(model.embedding(batch["query"][b : b + 1, :Tq]))  # (1, Tq, Dq)
    H = model.query_encoder.hidden_size
    u = q[0, -1] if model.query_encoder.num_directions == 1 else torch.cat([q[0, -1, :H], q[0, 0, H:]])
    memory, joint = model.readout.memory, model.joint
    W_ym, W_um = memory.weights
    N_ym, N_um = memory.norms
    scores = []
    for t in range(T):
        m_t = torch.tanh(_normalized(N_ym, W_ym @ y[0, t]) + _normalized(N_um, W_um @ u) + memory.bias)
        scores.append(float(model.readout.score.weight[0] @ m_t))
    top = max(scores)
    weights = [math.exp(e - top) for e in scores]
    s = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    r = sum(s[t] * y[0, t] for t in range(T))
    W_rg, W_ug = joint.weights
    g = torch.tanh(_normalized(joint.norms[0], W_rg @ r) + _normalized(joint.norms[1], W_ug @ u) + joint.bias)
    logits = model.head.weight @ g + model.head.bias
    return logits.masked_fill(~batch["candidates"][b], float("-inf")), s


@pytest.mark.parametrize("variant", ["lstm", "bnlstm", "bn-everywhere", "bn-e*", "bn-e**"])
def test_logits_and_attention_match_a_per_example_loop(variant):
    model = _warm(_reader(variant))
    batch = _batch([7, 3, 5, 1], [4, 2, 4, 1])
    with torch.no_grad():
        out = model.read(batch["document"], batch["document_lengths"], batch["query"], batch["query_lengths"], batch["candidates"])
        for b, length in enumerate(batch["document_lengths"].tolist()):
            logits, attention = _reference(model, batch, b)
            torch.testing.assert_close(out.logits[b], logits, atol=ATOL, rtol=0)
            torch.testing.assert_close(out.attention[b, :length], attention, atol=ATOL, rtol=0)
    # s(t) sums to 1 over the unpadded positions and is exactly 0 on padding.
    padding = torch.arange(7).unsqueeze(0) >= batch["document_lengths"].unsqueeze(1)
    assert out.attention[padding].eq(0).all()
    torch.testing.assert_close(out.attention.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert out.logits[~batch["candidates"]].eq(float("-inf")).all() and out.logits[batch["candidates"]].isfinite().all()


# -- padding ---------------------------------------------------------------------------------------
def _logits(model: AttentiveReader, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def _pad(batch: dict[str, torch.Tensor], document: int, query: int) -> dict[str, torch.Tensor]:
    out = dict(batch)
    out["document"] = torch.nn.functional.pad(batch["document"], (0, document))
    out["query"] = torch.nn.functional.pad(batch["query"], (0, query))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_and_other_examples_change_no_logit_in_evaluation(variant):
    model = _warm(_reader(variant))
    batch = _batch([6, 4, 6, 2], [3, 3, 1, 2])
    expected = _logits(model, batch)
    torch.testing.assert_close(_logits(model, _pad(batch, 5, 3)), expected, atol=ATOL, rtol=0)
    longer = _batch([11, 6, 4], [5, 2, 2], seed=3)  # a longer document and query join the batch
    torch.testing.assert_close(_logits(model, _join(batch, longer))[:4], expected, atol=ATOL, rtol=0)


def _join(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One batch of the examples of both, padded to the longer document and query."""
    joined = {}
    for key in first:
        if key in ("document", "query"):
            width = max(first[key].shape[1], second[key].shape[1])
            parts = [torch.nn.functional.pad(part[key], (0, width - part[key].shape[1])) for part in (first, second)]
            joined[key] = torch.cat(parts)
        else:
            joined[key] = torch.cat([first[key], second[key]])
    return joined


@pytest.mark.parametrize("variant", ["bnlstm", "bn-everywhere-per-position", "bn-e**"])
def test_padding_changes_nothing_in_training_either(variant):
    # Training statistics are taken over unpadded entries only, so extra padding changes no logit.
    model = _reader(variant).train()
    batch = _batch([6, 6, 4, 3], [3, 3, 2, 1], seed=1)  # every step has 2 unpadded samples
    torch.testing.assert_close(_logits(model, _pad(batch, 4, 2)), _logits(model, batch), atol=ATOL, rtol=0)


# -- loss, errors, population statistics ---------------------------------------------------------
def test_loss_covers_the_answerable_examples_and_errors_count_the_rest():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    candidates = torch.tensor([[True, True, False], [True, False, True], [True, True, True], [False, False, False]])
    logits = logits.masked_fill(~candidates, float("-inf"))
    answer = torch.tensor([1, 1, 1, 0])  # answerable: rows 0 and 2
    loss, errors, answerable = AttentiveReader._loss_and_errors(logits, answer, candidates)
    # By hand: row 0: -log(e^0.5 / (e^2 + e^0.5)); row 2: -log(e^3 / (e + e^3 + 1)).
    row0 = -math.log(math.exp(0.5) / (math.exp(2.0) + math.exp(0.5)))
    row2 = -math.log(math.exp(3.0) / (math.exp(1.0) + math.exp(3.0) + 1.0))
    assert float(loss) == pytest.approx((row0 + row2) / 2, abs=1e-12)
    assert errors.tolist() == [1.0, 1.0, 0.0, 1.0] and int(answerable) == 2
    none = AttentiveReader._loss_and_errors(logits[[1, 3]].requires_grad_(), answer[[1, 3]], candidates[[1, 3]])[0]
    none.backward()  # no answerable example: a zero loss that still backpropagates
    assert float(none) == 0.0


def test_population_forward_estimates_every_batch_statistic():
    model = _reader("bn-e**")
    batch = _batch([6, 6, 4, 3], [3, 3, 2, 2])
    used = norms.estimate_population_statistics(model, [batch, batch], forward=lambda m, b: m.population_forward(b))
    assert used == 2
    found = [m for m in model.modules() if isinstance(m, BatchStatisticsNorm)]
    attention = [*model.readout.memory.norms, *model.joint.norms]
    assert all(isinstance(n, SequenceBatchNorm) for n in attention) and all(n in found for n in attention)
    for norm in found:
        assert norm.num_batches_tracked.max() == 2, norm


@pytest.mark.parametrize("name", sorted(norms.available()))
def test_every_registered_strategy_can_normalize_the_attention(name):
    try:
        model = _reader("lstm", attention_norm=name).train()
    except ValueError as err:  # a strategy that declines the input site says so
        assert "cannot normalize the 'input' site" in str(err)
        return
    batch = _batch([6, 6, 4, 3], [3, 3, 2, 2])
    loss, _, _ = model._loss_and_errors(model(batch), batch["answer"], batch["candidates"])
    loss.backward()
    assert math.isfinite(float(loss))
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


def test_unknown_attention_norm_lists_the_names():
    with pytest.raises(ValueError, match="not a registered normalizer. Available names: "):
        AttentiveReader(functools.partial(NormLSTM, hidden_size=4), attention_norm="nosuch")


# -- learning and checkpoints on the synthetic task ------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qa")
    write_synthetic_corpus(folder, num_train=64, num_valid=16, num_test=16, seed=0)
    return folder


@pytest.mark.parametrize("variant", ["lstm", "bn-e**"])
def test_a_few_steps_on_the_synthetic_task_reduce_the_loss(corpus, variant):
    data = QADataModule(str(corpus), batch_size=16, trim_unshared_tail=True, num_relevant_sentences=None)
    data.setup("fit")
    model = _reader(variant, hidden_size=16, vocab_size=data.vocab_size, num_entities=data.num_entities,
                    embedding_size=16, attention_size=None).float()  # fmt: skip
    batches = list(data.train_dataloader())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(model._loss_and_errors(model(b), b["answer"], b["candidates"])[0]) for b in batches) / len(batches)

    model.train()
    before = mean_loss()
    for step in range(30):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        model._loss_and_errors(model(batch), batch["answer"], batch["candidates"])[0].backward()
        optimizer.step()
    after = mean_loss()
    assert after < 0.8 * before, (before, after)


def test_checkpoints_keep_the_vocabulary_and_sizes(corpus, tmp_path):
    data = QADataModule(str(corpus), batch_size=8, trim_unshared_tail=True)
    model = AttentiveReader(functools.partial(NormLSTM, hidden_size=4, input_norm="seqbn"), embedding_size=4)
    options = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer = Trainer(max_steps=2, limit_val_batches=1, enable_checkpointing=False, **options)
    trainer.fit(model, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["QADataModule"]["vocab"] == data.vocab
    restored = AttentiveReader.load_from_checkpoint(path, weights_only=False).eval()  # hparams hold factories
    assert (restored.hparams.vocab_size, restored.hparams.num_entities) == (data.vocab_size, data.num_entities)
    batch = next(iter(data.val_dataloader()))
    torch.testing.assert_close(_logits(restored, batch), _logits(model.eval(), batch))
    # Another data module (a smaller vocabulary) takes the checkpoint's vocabulary when testing it.
    other = QADataModule(str(corpus), batch_size=8, max_vocab_size=data.num_entities + 8)
    result = Trainer(enable_checkpointing=False, **options).test(restored, other, ckpt_path=str(path), verbose=False, weights_only=False)[0]
    assert other.vocab == data.vocab and 0.0 <= result["test/error"] <= 1.0


# -- every config --------------------------------------------------------------------------------
FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.encoder.init_args.hidden_size=8",
    "--model.init_args.embedding_size=8",
    "--population_statistics.num_batches=2",
    "--data.init_args.batch_size=4",
]


def _fit(monkeypatch, args: list[str]):
    """``rnorm fit`` through :func:`rnorm.cli.main`, keeping the CLI object."""
    made = []

    class Recording(lightning_cli.RnormCLI):
        def __init__(self, *a, **k) -> None:
            made.append(self)
            super().__init__(*a, **k)

    monkeypatch.setattr(sys, "argv", ["rnorm"])
    monkeypatch.setattr(lightning_cli, "RnormCLI", Recording)
    assert cli_module.main(["fit", *args]) == 0
    return made[0]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_fits_and_tests_under_fast_dev_run(path, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(path.read_text())
    cli = _fit(monkeypatch, ["--config", str(path), *FAST, f"--trainer.default_root_dir={tmp_path / 'root'}",
                             f"--data.init_args.data_dir={corpus}"])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.fn == "test" and math.isfinite(float(metrics["test/error"]))
    assert config["test_after_fit"] and config["trainer"]["callbacks"][0]["init_args"] == {"monitor": "val/error", "mode": "min", "save_last": True}
    # The config's variant reached the model.
    encoder = config["model"]["init_args"]["encoder"]["init_args"]
    for reader_encoder in (cli.model.encoder, cli.model.query_encoder):
        assert reader_encoder.hidden_size == 8 and reader_encoder.bidirectional == encoder.get("bidirectional", False)
        sites = [type(reader_encoder.cells[0].norms[i]).__name__ for i in range(3)]
        assert sites == [type(norms.create(encoder[f"{site}_norm"], site=site, num_features=8)).__name__
                         for site in ("input", "recurrent", "cell")]  # fmt: skip
    attention = type(cli.model.readout.memory.norms[0]).__name__
    assert attention == type(norms.create(config["model"]["init_args"]["attention_norm"], site="input", num_features=8)).__name__
    assert cli.trainer.gradient_clip_val == config["trainer"]["gradient_clip_val"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()  # nothing in the working directory


def test_quick_config_generates_its_corpus_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = next(p for p in CONFIGS if p.name == "quick.yaml")
    folder = tmp_path / "generated"
    cli = _fit(monkeypatch, ["--config", str(quick), *FAST, f"--trainer.default_root_dir={tmp_path / 'root'}",
                             f"--data.init_args.data_dir={folder}", "--data.init_args.synthetic_sizes=[12, 4, 4]"])  # fmt: skip
    assert len(list((folder / "training").glob("*.question"))) == 12
    assert 0.0 <= float(cli.trainer.callback_metrics["test/error"]) <= 1.0
