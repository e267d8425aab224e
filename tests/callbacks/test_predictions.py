"""``rnorm predict``'s file for every task: what each example gets, checked against the model itself."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM, NormLSTMCell
from rnorm.callbacks import PredictionWriter
from rnorm.callbacks.predictions import collate_predictions
from rnorm.data import QADataModule, write_synthetic_corpus
from rnorm.tasks import DRAW, AttentiveReader, CharLanguageModel, SequenceClassifier

# The file's numbers come from the same model in the same process, batch for batch: equal up to
# float32 rounding of a different batching (the reference runs all examples at once).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _predict(tmp_path, model, data):
    writer = PredictionWriter()
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", callbacks=[writer],
    )  # fmt: skip
    trainer.predict(model, data, return_predictions=False)
    assert writer.written == tmp_path / "predictions.pt"
    return torch.load(writer.written, weights_only=True)  # plain tensors only


class Loaders(LightningDataModule):
    def __init__(self, *tensors: torch.Tensor, batch_size: int, **sizes: int) -> None:
        super().__init__()
        self.tensors, self.batch_size = tensors, batch_size
        for name, value in sizes.items():
            setattr(self, name, value)

    def predict_dataloader(self):
        return DataLoader(TensorDataset(*self.tensors), batch_size=self.batch_size)


def test_classifier_file_holds_class_probabilities_and_target(tmp_path, capsys):
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, 3), torch.randint(0, 4, (7,))
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=6), input_size=3, num_classes=4).eval()
    saved = _predict(tmp_path, model, Loaders(x, y, batch_size=3))
    assert f"Predictions for 7 examples written to {tmp_path / 'predictions.pt'}" in capsys.readouterr().out
    assert sorted(saved) == ["index", "prediction", "probabilities", "target"]
    with torch.no_grad():
        expected = F.softmax(model(x), dim=1)
    torch.testing.assert_close(saved["probabilities"], expected, **TOLERANCE)
    assert torch.equal(saved["prediction"], expected.argmax(1)) and torch.equal(saved["target"], y)
    assert saved["index"].tolist() == list(range(7))


def test_language_model_file_holds_each_characters_log_probability(tmp_path):
    torch.manual_seed(0)
    inputs, targets = torch.randint(0, 5, (5, 6)), torch.randint(0, 5, (5, 6))
    lengths = torch.tensor([6, 6, 6, 6, 2])
    targets[4, 2:] = -100  # padded as a stream's last segment
    model = CharLanguageModel(functools.partial(NormLSTM, hidden_size=6), vocab_size=5).eval()
    saved = _predict(tmp_path, model, Loaders(inputs, targets, lengths, batch_size=2))
    with torch.no_grad():
        log_softmax = F.log_softmax(model(inputs, lengths), dim=-1)
    expected = log_softmax.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    expected[4, 2:] = 0.0
    torch.testing.assert_close(saved["log_prob"], expected, **TOLERANCE)
    assert torch.equal(saved["target"], targets) and torch.equal(saved["lengths"], lengths)
    bpc = -expected.sum(1) / lengths / math.log(2)
    torch.testing.assert_close(saved["bpc"], bpc, **TOLERANCE)


def test_reader_file_pads_attention_to_the_longest_document(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "cnn"
    write_synthetic_corpus(folder, num_train=12, num_valid=4, num_test=5, seed=0)
    data = QADataModule(str(folder), batch_size=2, eval_batch_size=2)
    model = AttentiveReader(functools.partial(NormLSTM, hidden_size=4), embedding_size=4)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    data.setup("predict")
    model.hparams.vocab_size, model.hparams.num_entities = data.vocab_size, data.num_entities
    model.build()
    model.eval()
    saved = _predict(tmp_path, model, data)
    documents = data.dataset("test").documents
    longest = max(len(d) for d in documents)
    assert saved["attention"].shape == (5, longest) and saved["probabilities"].shape == (5, data.num_entities)
    assert saved["document_lengths"].tolist() == [len(d) for d in documents]
    for row, length in zip(saved["attention"], saved["document_lengths"]):
        torch.testing.assert_close(row[:length].sum(), torch.tensor(1.0))  # a distribution over the document
        assert row[length:].abs().sum() == 0
    del trainer


def test_draw_file_holds_the_bound_reconstructions_and_prior_samples(tmp_path):
    torch.manual_seed(0)
    images = (torch.rand(5, 4 * 4) > 0.5).float()
    cell = functools.partial(NormLSTMCell, hidden_size=6, input_norm="none", recurrent_norm="none", cell_norm="none")
    model = DRAW(cell, cell, glimpses=2, latent_size=3, image_height=4, image_width=4, num_samples=3).eval()
    saved = _predict(tmp_path, model, Loaders(images, batch_size=2))
    assert saved["nll_bound"].shape == (5,) and saved["reconstruction"].shape == (5, 4, 4)
    torch.testing.assert_close(saved["nll_bound"], saved["recon"] + saved["kl"])
    assert torch.equal(saved["samples"], model.prior_samples()) and saved["samples"].shape == (3, 4, 4)
    assert bool(((saved["reconstruction"] >= 0) & (saved["reconstruction"] <= 1)).all())


def test_collate_pads_and_wraps_plain_tensors():
    collated = collate_predictions([torch.ones(2, 1), torch.zeros(1, 2)])
    assert collated["prediction"].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
