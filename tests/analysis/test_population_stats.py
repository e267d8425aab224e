"""population-stats: the CSV holds the model's own population statistics; PNG, --no-plot, errors."""

import argparse
import csv
import functools

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM
from rnorm.analysis import population_stats
from rnorm.tasks import SequenceClassifier

T_MAX = 6


class Sequences(LightningDataModule):
    input_size, num_classes = 3, 2

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, T_MAX, 3, generator=generator), torch.randint(0, 2, (32,), generator=generator)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def _fit(tmp_path, **encoder_options):
    torch.manual_seed(0)
    encoder = functools.partial(NormLSTM, hidden_size=4, initial_state_noise=0.1, **encoder_options)
    model = SequenceClassifier(encoder)
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_epochs=2,
    )  # fmt: skip
    trainer.fit(model, Sequences())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # seqbn on the input site: a site with T_max = 1 next to the per-step ones.
    return _fit(tmp_path_factory.mktemp("fit"), input_norm="seqbn")


def _read(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_holds_the_models_buffers_at_the_sampled_units(trained, tmp_path):
    model, ckpt = trained
    written = population_stats.run(ckpt, tmp_path, units=3, seed=1, plot=False)
    assert written == [tmp_path / "population_stats.csv"]
    rows = _read(written[0])
    sites = {
        "encoder.cells.0.input_norm": 1,  # seqbn
        "encoder.cells.0.recurrent_norm": T_MAX,
        "encoder.cells.0.cell_norm": T_MAX,
    }
    assert {row["module"] for row in rows} == set(sites)
    assert len(rows) == sum(3 * t_max for t_max in sites.values())  # sites x units x T_max
    modules = dict(model.named_modules())
    for module, t_max in sites.items():
        norm = modules[module]
        assert norm.running_mean.shape[0] == t_max
        site_rows = [row for row in rows if row["module"] == module]
        units = {int(row["unit"]) for row in site_rows}
        assert len(units) == 3 and units <= set(range(norm.running_mean.shape[1]))
        assert sorted(int(row["t"]) for row in site_rows) == sorted(list(range(t_max)) * 3)
        for row in site_rows:
            unit, t = int(row["unit"]), int(row["t"])
            assert float(row["mean"]) == float(norm.running_mean[t, unit])
            assert float(row["var"]) == float(norm.running_var[t, unit])
    # Trained statistics, not the initial zeros and ones.
    assert any(float(row["mean"]) != 0.0 for row in rows) and any(float(row["var"]) != 1.0 for row in rows)


def test_units_are_seeded_and_the_same_for_mean_and_var(trained, tmp_path):
    _, ckpt = trained
    first = _read(population_stats.run(ckpt, tmp_path / "a", units=2, seed=5, plot=False)[0])
    again = _read(population_stats.run(ckpt, tmp_path / "b", units=2, seed=5, plot=False)[0])
    other = _read(population_stats.run(ckpt, tmp_path / "c", units=2, seed=6, plot=False)[0])
    assert first == again
    units = lambda rows: [(row["module"], row["unit"]) for row in rows]  # noqa: E731
    assert units(first) != units(other)


def test_plain_state_dict_files_are_accepted(trained, tmp_path):
    model, ckpt = trained
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    from_state_dict = population_stats.load_population_statistics(path)
    from_checkpoint = population_stats.load_population_statistics(ckpt)
    assert list(from_state_dict) == list(from_checkpoint)
    for module, (mean, var) in from_checkpoint.items():
        assert torch.equal(mean, from_state_dict[module][0]) and torch.equal(var, from_state_dict[module][1])


def test_cli_writes_a_png_and_no_plot_writes_none(trained, tmp_path):
    pytest.importorskip("matplotlib")
    _, ckpt = trained
    parser = argparse.ArgumentParser()
    population_stats.add_parser(parser.add_subparsers())
    args = parser.parse_args(["population-stats", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "fig")])
    written = args.run(args)
    png = tmp_path / "fig" / "population_stats.png"
    assert written == [tmp_path / "fig" / "population_stats.csv", png]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    from PIL import Image  # a matplotlib dependency

    with Image.open(png) as image:
        image.verify()
    args = parser.parse_args(
        ["population-stats", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "csv"), "--no_plot"]
    )
    assert args.run(args) == [tmp_path / "csv" / "population_stats.csv"]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["population_stats.csv"]


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        population_stats.run(missing, tmp_path)


def test_checkpoint_without_batch_norm_is_refused(tmp_path):
    _, ckpt = _fit(tmp_path, input_norm="ln", recurrent_norm="ln", cell_norm="ln")
    with pytest.raises(ValueError, match="has no per-step population statistics: was it trained with bn?"):
        population_stats.run(ckpt, tmp_path / "out")
    assert not (tmp_path / "out" / "population_stats.csv").exists()


def test_a_crafted_checkpoint_runs_no_code(crafted_checkpoint, tmp_path):
    path, marker = crafted_checkpoint
    with pytest.raises(ValueError, match="is not a valid rnorm/Lightning checkpoint") as error:
        population_stats.run(path, tmp_path / "out", plot=False)
    assert not marker.exists() and "weights_only=False" not in str(error.value)
    assert not (tmp_path / "out").exists()
