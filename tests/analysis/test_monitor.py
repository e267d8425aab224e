"""NormMonitor: grad_flow/* equals an independent ∂loss/∂h_t; popstats/* equals the buffers."""

import copy
import functools

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM
from rnorm.callbacks.monitoring import NormMonitor, evenly_spaced_steps
from rnorm.tasks import CharLanguageModel, SequenceClassifier


class Characters(LightningDataModule):
    vocab_size = 5

    def __init__(self) -> None:
        super().__init__()
        ids = torch.randint(0, 5, (16, 7), generator=torch.Generator().manual_seed(0))
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]  # (16, 6) each

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=8)


class Sequences(LightningDataModule):
    input_size, num_classes = 3, 2

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 6, 3, generator=generator), torch.randint(0, 2, (16,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, logger, monitor):
    return Trainer(
        default_root_dir=tmp_path, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_steps=2, callbacks=[monitor],
    )  # fmt: skip


def test_tensorboard_events_hold_the_gradient_flow_and_population_statistics(tmp_path):
    torch.manual_seed(0)
    model = CharLanguageModel(functools.partial(NormLSTM, hidden_size=4), vocab_size=5)  # no noise: deterministic
    initial = copy.deepcopy(model)
    data = Characters()
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    _trainer(tmp_path, logger, NormMonitor(every_n_steps=1, num_steps=3)).fit(model, data)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    steps = evenly_spaced_steps(6, 3)
    assert steps == [0, 2, 5]
    assert {f"grad_flow/t_{t:04d}" for t in steps} <= tags
    for site in ("input_norm", "recurrent_norm", "cell_norm"):
        assert {f"popstats/encoder.cells.0.{site}/{kind}_t{t:04d}" for kind in ("mean", "var") for t in steps} <= tags
    assert "popstats/encoder.cells.0.recurrent_norm/running_var_last" in events.Tags()["histograms"]

    # Independent ∂loss/∂h_t of the first batch at the initial weights (training mode, as in the
    # step): the cell stepped by hand, each h_t kept with retain_grad, so its .grad is the total
    # gradient through time (tests/nn/test_cell.py shows stepping equals the layer).
    inputs, targets = data.inputs[:8], data.targets[:8]
    cell, encoded = initial.encoder.cells[0], initial.encode_inputs(inputs)
    state, hidden = None, []
    for t in range(encoded.shape[1]):
        state = cell(encoded[:, t], state, t=t)
        state[0].retain_grad()
        hidden.append(state[0])
    initial._loss(initial.head(torch.stack(hidden, dim=1)), targets, None).backward()
    for t in steps:
        (first, *_) = events.Scalars(f"grad_flow/t_{t:04d}")
        assert first.step == 0
        # float32 summary values against a float32 recomputation in another order.
        assert first.value == pytest.approx(float(hidden[t].grad.norm()), rel=1e-5)
    assert len(events.Scalars("grad_flow/t_0000")) == 2  # every step

    # The population statistics logged at the last step are those the model ends with.
    norm = model.encoder.cells[0].recurrent_norm
    for t in steps:
        last = events.Scalars(f"popstats/encoder.cells.0.recurrent_norm/var_t{t:04d}")[-1]
        assert last.step == 1 and last.value == pytest.approx(float(norm.running_var[t].mean()), rel=1e-6)


def test_captured_gradient_is_the_total_gradient_through_time():
    torch.manual_seed(0)
    encoder = NormLSTM(3, 4, batch_first=False, input_norm="ln", recurrent_norm="ln", cell_norm="ln").double()
    x = torch.randn(6, 5, 3, dtype=torch.double)  # (T, B, D)
    weights = torch.randn(6, 5, 4, dtype=torch.double)
    monitor = NormMonitor()
    monitor.attach(encoder)
    output, (h_n, _) = encoder(x)
    ((output * weights).sum() + h_n.square().sum()).backward()  # direct and recurrent paths
    captured = monitor.detach()
    assert captured.shape == (5, 6, 4)  # batch first

    cell, state, hidden = encoder.cells[0], None, []
    for t in range(6):
        state = cell(x[t], state, t=t)
        state[0].retain_grad()
        hidden.append(state[0])
    ((torch.stack(hidden) * weights).sum() + state[0].square().sum()).backward()
    expected = torch.stack([h.grad for h in hidden], dim=1)  # (B, T, H)
    torch.testing.assert_close(captured, expected, rtol=1e-12, atol=1e-12)  # float64, same operations
    assert captured[:, 0].abs().sum() > 0
    encoder(x)[0].sum().backward()
    assert torch.equal(monitor.detach(), captured)  # the hook was removed: no new probe, no new gradient


def test_without_tensorboard_it_logs_through_the_module(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=4))  # the loss reads h_n only
    trainer = _trainer(tmp_path, False, NormMonitor(every_n_steps=1, num_steps=2))
    trainer.fit(model, Sequences())
    metrics = trainer.callback_metrics
    # The final state depends on every h_t through the recurrence, so every step has a gradient.
    assert float(metrics["grad_flow/t_0000"]) > 0 and float(metrics["grad_flow/t_0005"]) > 0
    norm = model.encoder.cells[0].cell_norm
    for t in (0, 5):
        logged = metrics[f"popstats/encoder.cells.0.cell_norm/mean_t{t:04d}"]
        assert float(logged) == pytest.approx(float(norm.running_mean[t].mean()))
