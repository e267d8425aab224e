"""DRAW, the Deep Recurrent Attentive Writer (Gregor et al., 2015), as in Norm-Prop §5.2.

A variational auto-encoder that reads and writes an image in ``glimpses`` steps. At step t
(Gregor et al. eq. 3–8)::

    x̂_t   = x − σ(c_{t−1})
    r_t    = read(x, x̂_t, h^dec_{t−1})                      (B, 2 N_r²)
    h^enc_t = RNN^enc(h^enc_{t−1}, [r_t, h^dec_{t−1}])
    z_t    ~ Q(Z_t | h^enc_t) = N(μ_t, σ_t²),  μ_t = W(h^enc_t), log σ_t = W(h^enc_t)
    h^dec_t = RNN^dec(h^dec_{t−1}, z_t)
    c_t    = c_{t−1} + write(h^dec_t)

with ``c_0 = 0`` and the cells' own (learned) initial states. The two RNNs are
:class:`~rnorm.nn.NormLSTMCell`\\ s, so each site's normalization (``none``, ``wn``, ``ln``,
``normprop``, even ``bn`` with statistics per glimpse) comes from the cell factories. The loss is the
variational bound in nats per image (eq. 9–12): the binary cross-entropy of the image under
``Bernoulli(σ(c_T))`` summed over pixels, plus ``Σ_t KL(Q(Z_t | h^enc_t) || N(0, I))``.

Attention is the Gaussian filterbank of Gregor et al. §3.2 (eq. 19–29): five numbers from a linear
layer of ``h^dec`` give the grid centre, stride, variance and intensity of an ``N × N`` grid of
Gaussian filters; reading is ``γ F_Y x F_Xᵀ`` (on ``x`` and ``x̂``), writing ``(1/γ̂) F̂_Yᵀ w F̂_X``
with its own filterbank and a patch ``w = W(h^dec)``. Pixel coordinates run from 1 to A (B), so that
``g̃ = 0`` is the image centre ``(A + 1) / 2`` of eq. 22.

>>> fy, fx, gamma = GaussianAttention(4, N=3, height=5, width=7)(torch.zeros(2, 4))
>>> tuple(fy.shape), tuple(fx.shape), tuple(gamma.shape)
((2, 3, 5), (2, 3, 7), (2,))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from rnorm.nn import NormLSTMCell
from rnorm.tasks.base import RecurrentTask, orthogonal_linear
from rnorm.utils.png import image_grid

__all__ = [
    "DRAW",
    "CellFactory",
    "DRAWOutput",
    "GaussianAttention",
    "attention_parameters",
    "filterbank",
    "gaussian_kl",
    "linear_head",
    "read_glimpse",
    "write_patch",
]

#: Builds a recurrent cell from its input size. In YAML a class path with init_args, e.g.
#: ``{class_path: rnorm.nn.NormLSTMCell, init_args: {hidden_size: 256, input_norm: normprop}}``.
CellFactory = Callable[[int], NormLSTMCell]


def linear_head(in_features: int, out_features: int, init: Literal["zero", "orthogonal"]) -> nn.Linear:
    """A linear layer on an LSTM state: zero weight and bias (``zero``), or orthogonal weight and zero bias."""
    if init not in ("zero", "orthogonal"):
        raise ValueError(f"Expected head_init 'zero' or 'orthogonal' but got {init!r}")
    layer = orthogonal_linear(in_features, out_features)
    if init == "zero":
        nn.init.zeros_(layer.weight)
    return layer


# -- the functional core -------------------------------------------------------------------------
def attention_parameters(raw: Tensor, N: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grid centre, stride, variance and intensity from the five outputs of the attention layer (eq. 21–24).

    Args:
        raw: ``(B, 5)``: ``g̃_X, g̃_Y, log σ², log δ̃, log γ``.
        N: the grid is ``N × N``.
        height, width: ``B`` and ``A`` of the paper, the image size in pixels.

    Returns:
        ``g_X, g_Y, δ, σ², γ``, each ``(B,)``: ``g_X = (A + 1)/2 (g̃_X + 1)``,
        ``g_Y = (B + 1)/2 (g̃_Y + 1)``, ``δ = (max(A, B) − 1)/(N − 1) δ̃`` (with ``N = 1`` the stride
        multiplies nothing), the rest exponentiated.
    """
    gx_tilde, gy_tilde, log_sigma2, log_delta, log_gamma = raw.unbind(-1)
    gx = (width + 1) / 2 * (gx_tilde + 1)
    gy = (height + 1) / 2 * (gy_tilde + 1)
    delta = (max(width, height) - 1) / max(N - 1, 1) * log_delta.exp()
    return gx, gy, delta, log_sigma2.exp(), log_gamma.exp()


def filterbank(center: Tensor, delta: Tensor, sigma2: Tensor, N: int, size: int) -> Tensor:
    """One axis of the Gaussian filterbank (eq. 19–20, 25–26): ``(B, N, size)``, each row summing to 1.

    ``F[i, a] = exp(−(a − μ_i)² / 2σ²) / Z_i`` for pixels ``a = 1 … size`` and filters ``i = 1 … N``
    centred at ``μ_i = center + (i − N/2 − 0.5) δ``; ``Z_i`` normalizes each row (computed as a
    softmax, so a grid far outside the image still gives normalized rows).

    Args:
        center, delta, sigma2: ``(B,)``: grid centre, stride and variance, in pixels.
        N: filters.
        size: pixels along this axis.
    """
    offsets = torch.arange(1, N + 1, dtype=center.dtype, device=center.device) - N / 2 - 0.5  # (N,)
    mu = center.unsqueeze(1) + offsets * delta.unsqueeze(1)  # (B, N)
    pixels = torch.arange(1, size + 1, dtype=center.dtype, device=center.device)  # (size,)
    logits = -((pixels - mu.unsqueeze(2)) ** 2) / (2 * sigma2.view(-1, 1, 1))  # (B, N, size)
    return logits.softmax(dim=-1)


def read_glimpse(image: Tensor, fy: Tensor, fx: Tensor, gamma: Tensor) -> Tensor:
    """``γ F_Y x F_Xᵀ`` (eq. 27, one of its two halves): ``(B, N, N)`` from an image ``(B, H, W)``,
    filterbanks ``fy`` ``(B, N, H)`` and ``fx`` ``(B, N, W)``, intensity ``γ`` ``(B,)``."""
    return gamma.view(-1, 1, 1) * (fy @ image @ fx.transpose(1, 2))


def write_patch(patch: Tensor, fy: Tensor, fx: Tensor, gamma: Tensor) -> Tensor:
    """``(1/γ̂) F̂_Yᵀ w F̂_X`` (eq. 29): ``(B, H, W)`` from a patch ``w`` ``(B, N, N)``."""
    return (fy.transpose(1, 2) @ patch @ fx) / gamma.view(-1, 1, 1)


def gaussian_kl(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """``KL(N(μ, σ²) || N(0, I))`` over the last dimension (eq. 11): ``½ Σ (μ² + σ² − 2 log σ − 1)``.

    >>> gaussian_kl(torch.zeros(3), torch.zeros(3))
    tensor(0.)
    """
    return 0.5 * (mu.square() + (2 * log_sigma).exp() - 2 * log_sigma - 1).sum(dim=-1)


# -- modules -------------------------------------------------------------------------------------
class GaussianAttention(nn.Module):
    """The attention parameters of an ``N × N`` filterbank from ``h^dec`` (eq. 21): a linear layer.

    Args:
        input_size: features of ``h^dec``.
        N: the grid is ``N × N``.
        height, width: the image size.
        init: the linear layer's initialization (see :func:`linear_head`); ``zero`` starts at a grid centred
            on the image, spanning it (``δ̃ = 1``), with ``σ² = γ = 1``.

    ``forward(h)`` returns ``(F_Y (B, N, H), F_X (B, N, W), γ (B,))``.
    """

    def __init__(
        self, input_size: int, N: int, height: int, width: int, init: Literal["zero", "orthogonal"] = "zero"
    ) -> None:
        super().__init__()
        if N < 1:
            raise ValueError(f"Expected an attention grid N >= 1 but got {N}")
        self.N, self.height, self.width = N, height, width
        self.linear = linear_head(input_size, 5, init)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gx, gy, delta, sigma2, gamma = attention_parameters(self.linear(h), self.N, self.height, self.width)
        fy = filterbank(gy, delta, sigma2, self.N, self.height)  # (B, N, H)
        fx = filterbank(gx, delta, sigma2, self.N, self.width)  # (B, N, W)
        return fy, fx, gamma

    def extra_repr(self) -> str:
        return f"N={self.N}, height={self.height}, width={self.width}"


class DRAWOutput(NamedTuple):
    """What a pass over a batch gives: the final canvas and the posterior of every glimpse."""

    logits: Tensor  #: ``(B, H·W)``: the final canvas ``c_T``, Bernoulli logits of the pixels.
    mu: Tensor  #: ``(T, B, Z)``.
    log_sigma: Tensor  #: ``(T, B, Z)``.


class DRAW(RecurrentTask[NormLSTMCell]):
    """DRAW on binarized images (Gregor et al. 2015; NP §5.2): training on the variational bound.

    Batches are ``(B, H·W)`` float tensors of 0/1 (or tuples whose first element is one), as
    :class:`~rnorm.data.BinarizedMNISTDataModule` gives. Logged: ``train/loss`` (the bound),
    ``{train,val,test}/recon`` and ``/kl`` (its two terms), ``val/nll_bound`` and
    ``test/nll_bound``, all in nats per image. After each validation (not the sanity check) a grid
    of samples from the prior and one of validation images over their reconstructions are written
    as PNG files to ``<log_dir>/samples/`` and, with a TensorBoard logger, logged as images (the
    callback :class:`~rnorm.callbacks.SampleGrids`, which the task adds itself).

    Args:
        encoder: builds the encoder cell from its input size (``2 read_size² + decoder hidden size``),
            e.g. ``{class_path: rnorm.nn.NormLSTMCell, init_args: {hidden_size: 256}}`` in YAML.
        decoder: builds the decoder cell from its input size (``latent_size``).
        optimizer: builds the optimizer (NP §5.2: Adam, lr 1e-2).
        lr_scheduler: optional learning-rate schedule (NP §5.2: exponential decay of 1e-3).
        lr_scheduler_interval: step the schedule every optimizer ``step`` or every ``epoch``.
        read_size: ``N`` of the read attention (NP §5.2: 2, a 2 × 2 grid).
        write_size: ``N`` of the write attention (NP §5.2: 5).
        glimpses: steps ``T`` (NP §5.2: 64).
        latent_size: dimension of each ``z_t`` (NP §5.2: 100).
        image_height: ``None`` to take the data module's ``image_height``.
        image_width: ``None`` to take the data module's ``image_width``.
        num_samples: images per sample grid; 0 writes none.
        sample_seed: seed of the prior noise behind the sample grids (the same every epoch, so
            that successive grids show the same latent draws).
        head_init: initialization of the linear layers on the LSTM states (attention parameters,
            write patch, posterior): ``zero`` (default) starts from ``Q = N(0, I)``, a blank canvas
            and attention spanning the image; ``orthogonal`` uses orthogonal weights, which with
            normalized hidden states of standard deviation near 1 makes the initial KL term enormous
            (about 10^5 nats) and Adam at lr 1e-2 diverge. The cells' own matrices are initialized
            by their ``input_init``/``recurrent_init`` (orthogonal by default, as NP §5.2 says).
    """

    data_sizes = ("image_height", "image_width")

    def __init__(
        self,
        encoder: CellFactory,
        decoder: CellFactory,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        read_size: int = 2,
        write_size: int = 5,
        glimpses: int = 64,
        latent_size: int = 100,
        image_height: int | None = None,
        image_width: int | None = None,
        num_samples: int = 64,
        sample_seed: int = 0,
        head_init: Literal["zero", "orthogonal"] = "zero",
    ) -> None:
        super().__init__(encoder, optimizer, lr_scheduler, lr_scheduler_interval)
        if min(read_size, write_size, glimpses, latent_size) < 1:
            raise ValueError(
                "Expected read_size, write_size, glimpses and latent_size >= 1 but got "
                f"{read_size}, {write_size}, {glimpses} and {latent_size}"
            )
        if num_samples < 0:
            raise ValueError(f"Expected num_samples >= 0 but got {num_samples}")
        if head_init not in ("zero", "orthogonal"):
            raise ValueError(f"Expected head_init 'zero' or 'orthogonal' but got {head_init!r}")
        self.save_hyperparameters()
        self.decoder_factory = decoder
        self.decoder: NormLSTMCell | None = None
        self._build_if_sized()

    # -- building --------------------------------------------------------------------------------
    def build(self) -> None:
        hp = self.hparams
        height, width = hp.image_height, hp.image_width
        self.decoder = self._build_cell(self.decoder_factory, hp.latent_size, "decoder")
        self.encoder = self._build_cell(self.encoder_factory, 2 * hp.read_size**2 + self.decoder.hidden_size, "encoder")
        hidden_dec, init = self.decoder.hidden_size, hp.head_init
        self.read_attention = GaussianAttention(hidden_dec, hp.read_size, height, width, init)
        self.write_attention = GaussianAttention(hidden_dec, hp.write_size, height, width, init)
        self.write_head = linear_head(hidden_dec, hp.write_size**2, init)
        self.posterior = linear_head(self.encoder.hidden_size, 2 * hp.latent_size, init)  # μ and log σ

    @staticmethod
    def _build_cell(factory: CellFactory, input_size: int, name: str) -> NormLSTMCell:
        cell = factory(input_size)
        if not isinstance(cell, NormLSTMCell):
            raise TypeError(f"Expected the {name} factory to build a NormLSTMCell, but it built {type(cell).__name__}.")
        return cell

    # -- the model -------------------------------------------------------------------------------
    def _write(self, h_dec: Tensor) -> Tensor:
        """``write(h^dec)`` (eq. 29): ``(B, H·W)``."""
        N = self.hparams.write_size
        fy, fx, gamma = self.write_attention(h_dec)
        patch = self.write_head(h_dec).view(-1, N, N)  # (B, N, N)
        return write_patch(patch, fy, fx, gamma).flatten(1)  # (B, H·W)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> DRAWOutput:
        """Encode and reconstruct ``x`` ``(B, H·W)``.

        Args:
            x: the images, pixels in [0, 1].
            noise: ``(T, B, Z)`` standard normal draws behind ``z_t = μ_t + σ_t ε_t``; ``None`` draws them.
        """
        hp = self.hparams
        B = x.shape[0]
        height, width, T, Z = hp.image_height, hp.image_width, hp.glimpses, hp.latent_size
        if x.dim() != 2 or x.shape[1] != height * width:
            raise ValueError(f"Expected images of shape (B, {height * width}) but got {tuple(x.shape)}")
        if noise is not None and noise.shape != (T, B, Z):
            raise ValueError(f"Expected noise of shape {(T, B, Z)} but got {tuple(noise.shape)}")
        images = x.view(B, height, width)
        canvas = x.new_zeros(B, height * width)  # c_0
        enc_state = self.encoder.initial_state(B)
        dec_state = self.decoder.initial_state(B)
        mus, log_sigmas = [], []
        for t in range(T):
            h_dec = dec_state[0]
            x_hat = (x - torch.sigmoid(canvas)).view(B, height, width)  # eq. 3
            fy, fx, gamma = self.read_attention(h_dec)
            halves = [read_glimpse(images, fy, fx, gamma), read_glimpse(x_hat, fy, fx, gamma)]  # eq. 27
            read = torch.cat(halves, dim=1)  # (B, 2N, N)
            enc_state = self.encoder(torch.cat([read.flatten(1), h_dec], dim=1), enc_state, t=t)  # eq. 5
            mu, log_sigma = self.posterior(enc_state[0]).chunk(2, dim=1)  # (B, Z) each
            eps = torch.randn_like(mu) if noise is None else noise[t]
            z = mu + log_sigma.exp() * eps  # eq. 6, reparameterized
            dec_state = self.decoder(z, dec_state, t=t)  # eq. 7
            canvas = canvas + self._write(dec_state[0])  # eq. 8
            mus.append(mu)
            log_sigmas.append(log_sigma)
        return DRAWOutput(canvas, torch.stack(mus), torch.stack(log_sigmas))

    @torch.no_grad()
    def generate(self, num_images: int, noise: Tensor | None = None) -> Tensor:
        """Images from the prior (eq. 13–15): ``(num_images, H, W)`` pixel probabilities ``σ(c_T)``.

        Args:
            num_images: how many.
            noise: ``(T, num_images, Z)`` draws of ``z``; ``None`` draws them.
        """
        hp = self.hparams
        T, Z = hp.glimpses, hp.latent_size
        device = self.write_head.weight.device
        if noise is None:
            noise = torch.randn(T, num_images, Z, device=device)
        canvas = torch.zeros(num_images, hp.image_height * hp.image_width, device=device)
        dec_state = self.decoder.initial_state(num_images)
        for t in range(T):
            dec_state = self.decoder(noise[t].to(device), dec_state, t=t)
            canvas = canvas + self._write(dec_state[0])
        return torch.sigmoid(canvas).view(num_images, hp.image_height, hp.image_width)

    def bound(self, x: Tensor, output: DRAWOutput) -> tuple[Tensor, Tensor]:
        """The two terms of the negative variational bound per image, in nats: reconstruction
        ``−log D(x | c_T)`` (eq. 9) and ``Σ_t KL`` (eq. 10–11), each ``(B,)``."""
        recon = F.binary_cross_entropy_with_logits(output.logits, x, reduction="none").sum(dim=1)
        kl = gaussian_kl(output.mu, output.log_sigma).sum(dim=0)
        return recon, kl

    # -- training --------------------------------------------------------------------------------
    @staticmethod
    def _images(batch: Any) -> Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def _step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, DRAWOutput]:
        x = self._images(batch)
        output = self(x)
        recon, kl = self.bound(x, output)
        loss = (recon + kl).mean()
        on_step = stage == "train"
        options = dict(on_step=on_step, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log(f"{stage}/loss" if stage == "train" else f"{stage}/nll_bound", loss, prog_bar=True, **options)
        self.log(f"{stage}/recon", recon.mean(), **options)
        self.log(f"{stage}/kl", kl.mean(), **options)
        return loss, x, output

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Logs the bound; returns ``{"images", "reconstructions"}`` ``(B, H, W)`` for the sample grids."""
        _, x, output = self._step(batch, "val")
        shape = (len(x), self.hparams.image_height, self.hparams.image_width)
        return {"images": x.detach().view(shape), "reconstructions": torch.sigmoid(output.logits.detach()).view(shape)}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"nll_bound", "recon", "kl"}``, each ``(B,)`` in nats, and ``reconstruction`` ``(B, H, W)``:
        the pixel probabilities ``σ(c_T)``."""
        x = self._images(batch)
        output = self(x)
        recon, kl = self.bound(x, output)
        shape = (len(x), self.hparams.image_height, self.hparams.image_width)
        return {"nll_bound": recon + kl, "recon": recon, "kl": kl, "reconstruction": torch.sigmoid(output.logits).view(shape)}

    def population_forward(self, batch: Any) -> None:
        """One pass as in training (the population-statistics callback calls it for ``bn`` cells)."""
        self(self._images(batch))

    # -- sample grids ----------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """The sample grids after each validation (:class:`~rnorm.callbacks.SampleGrids`), unless ``num_samples`` is 0."""
        from rnorm.callbacks.samples import SampleGrids

        return [SampleGrids(self.hparams.num_samples)] if self.hparams.num_samples > 0 else []

    def prior_samples(self) -> Tensor:
        """``num_samples`` images from the prior ``(S, H, W)``, from the fixed noise of ``sample_seed``
        (the same draws every time, so that successive grids are comparable)."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.sample_seed)
        noise = torch.randn(hp.glimpses, hp.num_samples, hp.latent_size, generator=generator)
        return self.generate(hp.num_samples, noise).cpu()

    def sample_grids(self, originals: Tensor | None = None, reconstructions: Tensor | None = None) -> dict[str, Tensor]:
        """``{"prior": …, "reconstruction": …}`` grid images in [0, 1]: :meth:`prior_samples`, and rows of
        ``originals`` ``(n, H, W)`` each above its row of ``reconstructions`` (when given)."""
        count = self.hparams.num_samples
        columns = math.ceil(math.sqrt(count))
        grids = {"prior": image_grid(self.prior_samples(), columns)}
        if originals is not None and reconstructions is not None:
            n, height, width = originals.shape
            rows = math.ceil(n / columns)
            blank = originals.new_full((rows * columns - n, height, width), 0.5)
            pairs = torch.stack(
                [torch.cat([originals, blank]).view(rows, columns, height, width),
                 torch.cat([reconstructions, blank]).view(rows, columns, height, width)],
                dim=1,
            )  # (rows, 2, columns, H, W): a row of images, then their reconstructions
            grids["reconstruction"] = image_grid(pairs.view(-1, height, width), columns)
        return grids

    def prediction_extras(self) -> dict[str, Tensor]:
        """Added to ``rnorm predict``'s file: ``samples``, :meth:`prior_samples` (none if ``num_samples`` is 0)."""
        return {"samples": self.prior_samples()} if self.hparams.num_samples > 0 else {}
