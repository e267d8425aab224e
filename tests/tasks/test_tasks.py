"""The task modules: sizes from the data, training, checkpoints, metrics, input encodings."""

import functools
import math

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM
from rnorm.metrics import BitsPerCharacter
from rnorm.tasks import CharLanguageModel, SequenceClassifier


class ToySequences(LightningDataModule):
    """Class = which of 3 symbols the first step shows; the rest is noise (an LSTM learns it fast)."""

    input_size, num_classes = 4, 3

    def __init__(self, size: int = 96, steps: int = 6, batch_size: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 3, (size,), generator=generator)
        self.x = 0.3 * torch.randn(size, steps, 4, generator=generator)
        self.x[torch.arange(size), 0, self.y] += 2.0
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class ToyText(LightningDataModule):
    vocab_size = 5

    def __init__(self) -> None:
        super().__init__()
        stream = torch.arange(5).repeat(40)[: 14 * 13 + 1]  # 0 1 2 3 4 0 1 2 ...: perfectly predictable
        self.inputs = stream[:-1].reshape(14, 13)
        self.targets = stream[1:].reshape(14, 13)
        self.lengths = torch.full((14,), 13)
        self.lengths[-2:] = 7  # padded tails, as a stream's last segment

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets, self.lengths.clone().fill_(13)), batch_size=7, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets, self.lengths), batch_size=5)

    test_dataloader = val_dataloader


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    options.update(kwargs)
    return Trainer(**options)


def test_classifier_takes_its_sizes_from_the_data_and_learns(tmp_path):
    torch.manual_seed(0)
    # bn on every site; initial-state noise as in BN §5.1: without it the recurrent term of step 0
    # has zero batch variance, and running population statistics that lag the weights are
    # amplified by 1/sqrt(eps) in evaluation (tests/callbacks covers exact re-estimation).
    encoder = functools.partial(NormLSTM, hidden_size=8, initial_state_noise=0.1)
    model = SequenceClassifier(encoder, optimizer=functools.partial(torch.optim.Adam, lr=0.05))
    assert model.encoder is None  # sizes unknown until setup
    trainer = _trainer(tmp_path, max_epochs=8, enable_checkpointing=False)
    trainer.fit(model, ToySequences())
    assert (model.hparams.input_size, model.hparams.num_classes) == (4, 3)
    assert model.encoder.input_size == 4 and model.head.out_features == 3
    result = trainer.test(model, ToySequences(), verbose=False)[0]
    # Chance is 1/3; the first-step symbol is unmistakable, so a working pipeline gets far above it.
    assert result["test/acc"] > 0.8


def test_classifier_checkpoint_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=8, input_norm="bn"))
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, ToySequences())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # The encoder factory is a functools.partial here, which a weights-only load refuses to unpickle.
    restored = SequenceClassifier.load_from_checkpoint(path, weights_only=False)
    model.eval(), restored.eval()
    x = ToySequences().x[:10]
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    assert restored.encoder.cells[0].recurrent_norm.t_max == 6


def test_classifier_rejects_sizes_that_disagree_with_the_data(tmp_path):
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=8), input_size=4, num_classes=7)
    with pytest.raises(ValueError, match="num_classes=7, but the data module has num_classes=3"):
        _trainer(tmp_path, fast_dev_run=True).fit(model, ToySequences())


def test_classifier_needs_sizes_from_somewhere(tmp_path):
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=8))
    data = ToySequences()
    with pytest.raises(ValueError, match="needs 'input_size'"):
        _trainer(tmp_path, fast_dev_run=True).fit(model, train_dataloaders=data.train_dataloader())


def test_encoder_factory_must_build_a_norm_lstm():
    with pytest.raises(TypeError, match="build a NormLSTM, but it built LSTM"):
        SequenceClassifier(lambda size: torch.nn.LSTM(size, 4), input_size=3, num_classes=2)


def test_gradient_norm_and_learning_rate_are_logged(tmp_path):
    model = SequenceClassifier(
        functools.partial(NormLSTM, hidden_size=8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5),
    )
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, ToySequences())
    logged = trainer.logged_metrics
    assert float(logged["train/grad_norm"]) > 0
    # Per-step schedule: the lr logged before the 3rd step is 0.1 * 0.5^2.
    assert float(logged["train/lr"]) == pytest.approx(0.025)


def test_bits_per_character_counts_every_real_character_once():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    lengths = torch.tensor([5, 2, 4])
    metric = BitsPerCharacter()
    metric.update(logits[:2], targets[:2], lengths[:2])  # split over two batches
    metric.update(logits[2:], targets[2:], lengths[2:])
    log_probs = logits.log_softmax(-1)
    nats = [-log_probs[b, t, targets[b, t]] for b in range(3) for t in range(int(lengths[b]))]
    expected = float(torch.stack(nats).mean()) / math.log(2)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)  # float32 logits, float64 sum


@pytest.mark.parametrize("encoding", ["onehot", "embedding", "orthogonal"])
def test_language_model_learns_a_periodic_stream(tmp_path, encoding):
    torch.manual_seed(0)
    model = CharLanguageModel(
        functools.partial(NormLSTM, hidden_size=16, input_norm="ln", recurrent_norm="ln", cell_norm="ln"),
        optimizer=functools.partial(torch.optim.Adam, lr=0.03),
        input_encoding=encoding,
    )
    trainer = _trainer(tmp_path, max_epochs=15, enable_checkpointing=False)
    trainer.fit(model, ToyText())
    bpc = trainer.validate(model, ToyText(), verbose=False)[0]["val/bpc"]
    # A uniform guess costs log2(5) = 2.32 bits; the stream is deterministic after one character.
    assert bpc < 0.5


def test_orthogonal_input_matrix_is_fixed_and_orthogonal():
    model = CharLanguageModel(functools.partial(NormLSTM, hidden_size=4), input_encoding="orthogonal", vocab_size=6)
    matrix = model.input_matrix
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(6), rtol=0, atol=1e-5)
    assert "input_matrix" in model.state_dict()
    assert all(p is not matrix for p in model.parameters())
    assert torch.equal(model.encode_inputs(torch.tensor([[2, 5]]))[0], matrix[[2, 5]])


def test_onehot_rejects_an_embedding_size():
    with pytest.raises(ValueError, match="embedding_size applies to 'embedding' and 'orthogonal'"):
        CharLanguageModel(functools.partial(NormLSTM, hidden_size=4), embedding_size=8)


def test_validation_bpc_is_the_whole_stream_value(tmp_path):
    model = CharLanguageModel(functools.partial(NormLSTM, hidden_size=8, input_norm="none", recurrent_norm="none", cell_norm="none"))
    data = ToyText()
    result = _trainer(tmp_path).validate(model, data, verbose=False)[0]
    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets, lengths in data.val_dataloader():
            log_probs = model(inputs, lengths).log_softmax(-1)
            for b in range(len(lengths)):
                n = int(lengths[b])
                nats -= float(log_probs[b, torch.arange(n), targets[b, :n]].sum())
                count += n
    assert result["val/bpc"] == pytest.approx(nats / count / math.log(2), rel=1e-5)


def test_a_task_without_build_or_population_forward_cannot_be_instantiated():
    from rnorm.tasks import RecurrentTask

    class Forgetful(RecurrentTask[NormLSTM]):
        def build(self) -> None:
            pass

    with pytest.raises(TypeError, match="abstract method population_forward"):
        Forgetful(functools.partial(NormLSTM, hidden_size=2))
