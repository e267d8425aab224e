"""DRAW: the Gaussian filterbank attention against a per-pixel loop of Gregor et al.'s formulas, the
variational bound against closed forms, training, sample grids as PNG files, population statistics,
checkpoints, and every ``configs/draw`` config under ``fast_dev_run`` on the shipped MNIST sample.

References are written here independently of rnorm: Python floats and ``math`` for the attention,
``torch.distributions`` for the KL term, the Bernoulli log-likelihood written out for the
reconstruction term; a standard PNG decoder (zlib, and Pillow where installed) for the image files.
Sizes are tiny (hidden 8, 3 glimpses, z of 4) so the file runs in seconds.
"""

import functools
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributions import Normal, kl_divergence

from rnorm import cli as cli_module
from rnorm import lightning_cli
from rnorm.data import BinarizedMNISTDataModule
from rnorm.nn import NormLSTM, NormLSTMCell
from rnorm.norms import estimate_population_statistics
from rnorm.norms.batch_norm import TimeBatchNorm
from rnorm.tasks import DRAW
from rnorm.tasks.draw import GaussianAttention, attention_parameters, filterbank, gaussian_kl, read_glimpse, write_patch
from rnorm.utils.png import encode_png, image_grid, write_png

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "draw").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cell(norm: str = "none", hidden_size: int = 8, **kwargs) -> functools.partial:
    cell_norm = "none" if norm == "wn" else norm
    return functools.partial(
        NormLSTMCell, hidden_size=hidden_size, input_norm=norm, recurrent_norm=norm, cell_norm=cell_norm, **kwargs
    )


def _model(norm: str = "none", **kwargs) -> DRAW:
    options = dict(glimpses=3, latent_size=4, image_height=28, image_width=28, num_samples=4)
    options.update(kwargs)
    return DRAW(_cell(norm), _cell(norm), **options)


def _images(count: int = 16) -> torch.Tensor:
    dm = BinarizedMNISTDataModule(source="mnist", binarization="threshold", val_size=count, batch_size=count)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


# --- the attention, against the paper's formulas ---------------------------------------------------------


def reference_filterbanks(raw: list[float], N: int, A: int, B: int) -> tuple[list, list, float]:
    """Gregor et al. eq. 19-26 for one image, in floats: F_X (N x A), F_Y (N x B) and γ.

    Pixel coordinates a = 1..A, b = 1..B (so that g̃ = 0 is the centre (A + 1)/2 of eq. 22);
    filters i = 1..N centred at g + (i - N/2 - 0.5) δ.
    """
    gx_t, gy_t, log_sigma2, log_delta_t, log_gamma = raw
    gx, gy = (A + 1) / 2 * (gx_t + 1), (B + 1) / 2 * (gy_t + 1)
    delta = (max(A, B) - 1) / (N - 1) * math.exp(log_delta_t)
    sigma2 = math.exp(log_sigma2)

    def bank(g: float, size: int) -> list:
        rows = []
        for i in range(1, N + 1):
            mu = g + (i - N / 2 - 0.5) * delta
            weights = [math.exp(-((a - mu) ** 2) / (2 * sigma2)) for a in range(1, size + 1)]
            z = sum(weights)
            rows.append([w / z for w in weights])
        return rows

    return bank(gx, A), bank(gy, B), math.exp(log_gamma)


RAW = [
    [0.0, 0.0, 0.0, 0.0, 0.0],  # centred, spanning the image
    [0.3, -0.5, 0.7, -1.2, 0.4],
    [-0.9, 0.8, -1.5, 0.5, -0.6],
]


@pytest.mark.parametrize("N", [2, 3, 5])
def test_filterbank_matches_a_per_pixel_loop_of_the_paper(N):
    A, B = 7, 5  # width, height: different, to catch swapped axes
    raw = torch.tensor(RAW, dtype=torch.float64)
    gx, gy, delta, sigma2, gamma = attention_parameters(raw, N, height=B, width=A)
    fx, fy = filterbank(gx, delta, sigma2, N, A), filterbank(gy, delta, sigma2, N, B)
    assert fx.shape == (3, N, A) and fy.shape == (3, N, B)
    for n, values in enumerate(RAW):
        ref_fx, ref_fy, ref_gamma = reference_filterbanks(values, N, A, B)
        torch.testing.assert_close(fx[n], torch.tensor(ref_fx, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fy[n], torch.tensor(ref_fy, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        assert gamma[n].item() == pytest.approx(ref_gamma, rel=1e-12)


def test_centred_filters_are_symmetric_about_the_image_centre():
    # g̃ = 0, N = 2, A = 28: the two filters sit at 14.5 -/+ 13.5 * 0.5 ... mirror images of each other.
    fx = filterbank(torch.tensor([14.5]), torch.tensor([27.0]), torch.tensor([1.0]), 2, 28)[0]
    torch.testing.assert_close(fx[0], fx[1].flip(0))
    assert fx[0].argmax().item() == 0 and fx[1].argmax().item() == 27  # at pixels 1 and 28


def test_filterbank_rows_are_normalized_even_far_outside_the_image():
    raw = torch.tensor([[0.2, -0.1, -2.0, 0.0, 0.0], [40.0, -40.0, -3.0, 2.0, 0.0]])  # the second: far away
    gx, gy, delta, sigma2, _ = attention_parameters(raw, 5, 28, 28)
    for bank in (filterbank(gx, delta, sigma2, 5, 28), filterbank(gy, delta, sigma2, 5, 28)):
        assert torch.isfinite(bank).all() and (bank >= 0).all()
        torch.testing.assert_close(bank.sum(-1), torch.ones(2, 5))


def test_read_and_write_match_per_pixel_sums():
    A, B, N = 7, 5, 3
    g = torch.Generator().manual_seed(0)
    raw = torch.tensor(RAW, dtype=torch.float64)
    gx, gy, delta, sigma2, gamma = attention_parameters(raw, N, height=B, width=A)
    fx, fy = filterbank(gx, delta, sigma2, N, A), filterbank(gy, delta, sigma2, N, B)
    image = torch.rand(3, B, A, generator=g, dtype=torch.float64)
    patch = torch.randn(3, N, N, generator=g, dtype=torch.float64)
    glimpse, canvas = read_glimpse(image, fy, fx, gamma), write_patch(patch, fy, fx, gamma)
    assert glimpse.shape == (3, N, N) and canvas.shape == (3, B, A)
    for n in range(3):
        FX, FY, gam = fx[n].tolist(), fy[n].tolist(), gamma[n].item()
        x, w = image[n].tolist(), patch[n].tolist()
        for i in range(N):  # eq. 27: γ Σ_b Σ_a F_Y[i, b] x[b, a] F_X[j, a]
            for j in range(N):
                ref = gam * sum(FY[i][b] * x[b][a] * FX[j][a] for b in range(B) for a in range(A))
                assert glimpse[n, i, j].item() == pytest.approx(ref, rel=1e-12)
        for b in range(B):  # eq. 29: (1/γ) Σ_i Σ_j F_Y[i, b] w[i, j] F_X[j, a]
            for a in range(A):
                ref = sum(FY[i][b] * w[i][j] * FX[j][a] for i in range(N) for j in range(N)) / gam
                assert canvas[n, b, a].item() == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_attention_layer_starts_centred_spanning_the_image():
    # Zero weights: g̃ = log σ² = log δ̃ = log γ = 0, the reference's first case.
    fy, fx, gamma = GaussianAttention(8, 3, height=5, width=7)(torch.randn(2, 8))
    ref_fx, ref_fy, ref_gamma = reference_filterbanks([0.0] * 5, 3, 7, 5)
    for n in range(2):
        torch.testing.assert_close(fx[n], torch.tensor(ref_fx, dtype=torch.float32))
        torch.testing.assert_close(fy[n], torch.tensor(ref_fy, dtype=torch.float32))
    assert gamma.tolist() == [ref_gamma] * 2 == [1.0, 1.0]


def test_model_reads_2n2_values_and_writes_the_whole_image():
    model = _model(read_size=2, write_size=5)
    assert model.encoder.input_size == 2 * 2**2 + model.decoder.hidden_size  # [read(x), read(x̂), h_dec]
    assert model.decoder.input_size == 4 and model.posterior.out_features == 8
    assert model.write_head.out_features == 25
    output = model(_images(3))
    assert output.logits.shape == (3, 784) and output.mu.shape == output.log_sigma.shape == (3, 3, 4)


# --- the bound -------------------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, log_sigma = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    reference = kl_divergence(Normal(mu, log_sigma.exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, log_sigma), reference, rtol=1e-12, atol=1e-12)


def test_bound_terms_match_closed_forms_and_are_finite():
    torch.manual_seed(0)
    model = _model(head_init="orthogonal").double()  # orthogonal heads: every term is non-trivial
    x = _images(6).double()
    noise = torch.randn(3, 6, 4, dtype=torch.float64)
    output = model(x, noise)
    recon, kl = model.bound(x, output)
    p = torch.sigmoid(output.logits)
    reference_recon = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1)  # -log Bernoulli(x | σ(c_T)), eq. 9
    standard = Normal(torch.zeros_like(output.mu), torch.ones_like(output.mu))
    reference_kl = kl_divergence(Normal(output.mu, output.log_sigma.exp()), standard).sum((0, 2))  # eq. 10-11
    torch.testing.assert_close(recon, reference_recon, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kl, reference_kl, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(recon).all() and torch.isfinite(kl).all() and (kl > 0).all()
    # The same noise gives the same pass; other noise another one.
    torch.testing.assert_close(model(x, noise).logits, output.logits)
    assert not torch.allclose(model(x).logits, output.logits)


def test_zero_heads_start_at_the_prior_with_a_blank_canvas():
    # c_T = 0: every pixel has probability 1/2, so the bound is 784 log 2 nats exactly, and Q = N(0, I).
    model, x = _model().double(), _images(4).double()
    recon, kl = model.bound(x, model(x))
    torch.testing.assert_close(recon, torch.full((4,), 784 * math.log(2), dtype=torch.float64))
    assert torch.equal(kl, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["none", "wn", "ln", "normprop"])
def test_bound_decreases_over_a_few_adam_steps_on_a_fixed_batch(norm):
    torch.manual_seed(0)
    model = _model(norm)
    x = _images(16)
    noise = torch.randn(3, 16, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def bound() -> float:
        recon, kl = model.bound(x, model(x, noise))
        return (recon + kl).mean()

    start = bound().item()
    for _ in range(40):
        optimizer.zero_grad()
        bound().backward()
        optimizer.step()
    end = bound().item()
    # From 784 log 2 = 543 nats (zero heads) to about 215-230 nats here in 40 steps, for every strategy.
    assert math.isfinite(end) and end < 0.6 * start, (start, end)


def test_generate_gives_probabilities_of_the_image_shape():
    model = _model(head_init="orthogonal").eval()
    images = model.generate(5)
    assert images.shape == (5, 28, 28) and (images >= 0).all() and (images <= 1).all()
    noise = torch.randn(3, 5, 4)
    torch.testing.assert_close(model.generate(5, noise), model.generate(5, noise))


def test_factories_must_build_cells_and_inputs_are_checked():
    with pytest.raises(TypeError, match="Expected the encoder factory to build a NormLSTMCell, but it built NormLSTM"):
        DRAW(functools.partial(NormLSTM, hidden_size=8), _cell(), image_height=28, image_width=28)
    model = _model()
    with pytest.raises(ValueError, match=r"Expected images of shape \(B, 784\) but got \(2, 783\)"):
        model(torch.zeros(2, 783))
    with pytest.raises(ValueError, match=r"Expected noise of shape \(3, 2, 4\)"):
        model(torch.zeros(2, 784), torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="head_init 'zero' or 'orthogonal'"):
        _model(head_init="xavier")


# --- batch normalization per glimpse --------------------------------------------------------------------


def test_population_forward_feeds_per_glimpse_statistics():
    # Initial-state noise: without it the recurrent term of glimpse 0 has no batch variance (BN §5.1).
    cell = _cell("bn", initial_state_noise=0.1)
    model = DRAW(cell, cell, glimpses=3, latent_size=4, image_height=28, image_width=28)
    x = _images(8)
    used = estimate_population_statistics(model, [x, x], forward=lambda m, batch: m.population_forward(batch))
    norms = [m for m in model.modules() if isinstance(m, TimeBatchNorm)]
    assert used == 2 and len(norms) == 6  # three sites of two cells
    for norm in norms:
        assert norm.num_batches_tracked.tolist() == [2, 2, 2]  # one statistic per glimpse, from both batches
    model.eval()
    recon, kl = model.bound(x, model(x))
    assert torch.isfinite(recon + kl).all()


# --- Lightning: logging, sample grids, checkpoints ------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, torch.Tensor]:
    """A minimal independent decoder for 8-bit grayscale, filter-0 PNGs: checks every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        position += 12 + length
    assert [kind for kind, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = torch.tensor(list(raw), dtype=torch.uint8).view(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every row
    return width, height, rows[:, 1:]


def test_png_encoding_round_trips(tmp_path):
    image = torch.rand(5, 9, generator=torch.Generator().manual_seed(0))
    path = write_png(tmp_path / "sub" / "x.png", image)
    width, height, pixels = _decode_png(path.read_bytes())
    assert (width, height) == (9, 5)
    assert torch.equal(pixels, (image * 255).round().to(torch.uint8))
    assert not list((tmp_path / "sub").glob(".*.part"))  # no temporary file left behind
    Image = pytest.importorskip("PIL.Image")
    decoded = Image.open(path)
    assert decoded.mode == "L" and decoded.size == (9, 5)
    assert list(decoded.getdata()) == pixels.flatten().tolist()
    with pytest.raises(ValueError, match="Expected a non-empty"):
        encode_png(torch.zeros(2, 2, 2))


def test_image_grid_places_images_row_by_row():
    images = torch.arange(3).float().view(3, 1, 1).expand(3, 2, 2) / 2
    grid = image_grid(images, columns=2, padding=1, pad_value=-1)
    assert grid.shape == (7, 7)
    assert grid[1:3, 1:3].eq(0).all() and grid[1:3, 4:6].eq(0.5).all() and grid[4:6, 1:3].eq(1).all()
    assert grid[4:6, 4:6].eq(-1).all() and grid[0].eq(-1).all()  # empty cell and padding


def test_training_logs_the_bound_and_writes_sample_grids(tmp_path, monkeypatch):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    images_logged = []
    record = lambda tag, image, global_step: images_logged.append((tag, image.shape))  # noqa: E731
    monkeypatch.setattr(logger.experiment, "add_image", record)
    model = _model(num_samples=4)
    dm = BinarizedMNISTDataModule(source="mnist", val_size=6, batch_size=4)
    trainer = Trainer(
        default_root_dir=tmp_path, logger=logger, max_epochs=2, limit_train_batches=2, limit_val_batches=2,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/recon", "train/kl", "val/nll_bound", "val/recon", "val/kl"):
        assert math.isfinite(float(metrics[name])), name
    torch.testing.assert_close(metrics["val/nll_bound"], metrics["val/recon"] + metrics["val/kl"])
    assert (model.hparams.image_height, model.hparams.image_width) == (28, 28)  # from the data module

    samples = Path(logger.log_dir) / "samples"
    names = sorted(path.name for path in samples.iterdir())
    assert names == [f"epoch={e:03d}-{kind}.png" for e in (0, 1) for kind in ("prior", "reconstruction")]
    width, height, _ = _decode_png((samples / "epoch=001-prior.png").read_bytes())
    assert (width, height) == (2 * 29 + 1, 2 * 29 + 1)  # 4 samples: 2 x 2 cells of 28 + 1 padding
    width, height, _ = _decode_png((samples / "epoch=001-reconstruction.png").read_bytes())
    assert (width, height) == (2 * 29 + 1, 4 * 29 + 1)  # 2 rows of 2 images, each above its reconstruction
    assert images_logged == [("samples/prior", (1, 59, 59)), ("samples/reconstruction", (1, 117, 59))] * 2
    # Same seed, same epoch-to-epoch prior noise: the grid changes only because the model does.
    assert (samples / "epoch=000-prior.png").read_bytes() != (samples / "epoch=001-prior.png").read_bytes()


def test_checkpoint_restores_the_model(tmp_path):
    model = _model("normprop", head_init="orthogonal")
    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(model)
    path = tmp_path / "draw.ckpt"
    trainer.save_checkpoint(path)
    restored = DRAW.load_from_checkpoint(path, weights_only=False)  # the hyperparameters hold the cell factories
    x, noise = _images(2), torch.randn(3, 2, 4)
    torch.testing.assert_close(restored(x, noise).logits, model(x, noise).logits)


# --- every configs/draw config --------------------------------------------------------------------------


def test_there_are_four_draw_configs():
    assert [path.stem for path in CONFIGS] == ["baseline", "ln", "normprop", "wn"]


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_fits_and_tests_on_the_shipped_sample(path, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"
    args = [
        "fit", "--config", str(path),
        "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--data.init_args.source=mnist", "--data.init_args.data_dir=null",
        "--data.init_args.batch_size=4", "--data.init_args.val_size=8",
        "--model.init_args.encoder.init_args.hidden_size=8", "--model.init_args.decoder.init_args.hidden_size=8",
        "--model.init_args.glimpses=3", "--model.init_args.latent_size=4", "--model.init_args.num_samples=4",
    ]  # fmt: skip
    instances = []
    original_init = lightning_cli.RnormCLI.__init__

    def recording_init(self, *a, **k):
        instances.append(self)
        original_init(self, *a, **k)

    monkeypatch.setattr(lightning_cli.RnormCLI, "__init__", recording_init)
    assert cli_module.main(args) == 0
    cli = instances[0]
    assert cli.trainer.state.fn == "test"  # test_after_fit
    assert math.isfinite(float(cli.trainer.callback_metrics["test/nll_bound"]))
    model = cli.model
    assert isinstance(model, DRAW) and model.encoder.hidden_size == 8 and model.decoder.hidden_size == 8
    assert model.hparams.glimpses == 3 and model.encoder.input_size == 2 * 4 + 8
    # The config's own strategies reached both cells.
    norms = {type(norm).__name__ for cell in (model.encoder, model.decoder) for norm in cell.norms}
    expected = {
        "baseline": {"Identity"}, "wn": {"WeightNorm", "Identity"}, "ln": {"LayerNorm"}, "normprop": {"NormProp"}
    }  # fmt: skip
    assert norms == expected[path.stem]
    if path.stem == "normprop":
        assert all(norm.gamma_init == 0.5 for cell in (model.encoder, model.decoder) for norm in cell.norms)
    assert type(model.lr_schedulers()).__name__ == "ExponentialLR"
    assert [p.name for p in (root / "version_0" / "samples").iterdir()] and list(cwd.iterdir()) == []  # the run's folder
