"""The comparison models, trained and sampled by the same harness as KAEM: a VAE and the latent EBM
of Pang et al. (2020) rebuilt from KAN layers (docs/design.md §5.6). Same decoder family (``build_decoder``
with the preset's decoder config and Q inputs), same Gaussian likelihood, same data pipeline,
training loop and checkpoint format; ``kaem-train --model vae|lebm`` selects them.

Like KAEM, each model maps per-seed uniforms ``u[B, noise_dim]`` to images in one call, so the
seed machinery, ``kaem-sample`` and ``kaem-eval`` treat all three alike. The latent EBM's
``generate`` runs its 60-step Langevin prior chain with normals taken from ``u``: deterministic
per seed, and the cost the sampling benchmark compares against KAEM's single pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from training.config import KAEMConfig, PosteriorConfig
from training.losses import LossOutput, StepContext, noisy_loglik
from training.mcmc import samplers
from training.model.decoder import build_decoder, child_seed, seeded_build
from training.model.kaem import LatentImageModel
from training.model.kan import KANLayer
from training.model.prior import normal_icdf

standard_normal = normal_icdf  # Φ⁻¹(u), u sanitised like the ITS inputs


def build_encoder(cfg: KAEMConfig) -> nn.Module:
    """Amortised Gaussian encoder x → (μ, log σ²) over the decoder's Q inputs: an MLP for the KAN
    decoder's grey images, stride-2 convolutions (LeakyReLU 0.2) for the colour presets."""
    C, H, W = cfg.decoder.image_shape
    Q, b = cfg.prior.Q, cfg.baseline
    if cfg.decoder.kind == "kan":
        h = b.encoder_hidden
        return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                             nn.Linear(h, 2 * Q))
    layers: list[nn.Module] = []
    c_in, h, w = C, H, W
    for c_out in b.encoder_channels:
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
        c_in, h, w = c_out, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * h * w, 2 * Q))


class VAE(LatentImageModel):
    """z ~ N(0, I_Q) → the preset's decoder; q(z|x) = N(μ(x), diag σ²(x)); trained on the ELBO."""

    def __init__(self, cfg: KAEMConfig, init_seed: int | None = None):
        super().__init__(cfg)
        gen = self.init_generator(cfg, init_seed)
        self.decoder = build_decoder(cfg.decoder, cfg.prior.Q, gen)
        self.encoder = seeded_build(child_seed(gen), lambda: build_encoder(cfg))

    @property
    def noise_dim(self) -> int:
        return self.cfg.prior.Q

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def latent_of_u(self, u: Tensor) -> Tensor:
        """The prior draw z = Φ⁻¹(u) that the decoder sees (latent health)."""
        return standard_normal(u)

    def generate(self, u: Tensor) -> Tensor:
        return torch.sigmoid(self.decode(self.latent_of_u(u)))


class LatentEBM(LatentImageModel):
    """π(z) ∝ exp(f(z)) π0(z) on R^Q with a deep KAN energy Q → 200 → 200 → 1 (docs/design.md §5.6)."""

    def __init__(self, cfg: KAEMConfig, init_seed: int | None = None):
        super().__init__(cfg)
        gen = self.init_generator(cfg, init_seed)
        b = cfg.baseline
        widths = (cfg.prior.Q, *b.energy_hidden, 1)
        self.energy = nn.ModuleList(
            KANLayer(i, o, b.energy_basis, b.energy_grid, (-3.0, 3.0), b.energy_act, gen)
            for i, o in zip(widths[:-1], widths[1:], strict=True)
        )
        self.decoder = build_decoder(cfg.decoder, cfg.prior.Q, gen)

    @property
    def noise_dim(self) -> int:
        return self.cfg.prior.Q * (1 + self.cfg.baseline.prior_steps)

    def param_groups(self, lr: float) -> list[dict]:
        """The energy trains at ``baseline.energy_lr`` (Pang et al.: far below the generator's), the
        decoder at the run's learning rate like the KAEM's."""
        return [{"params": list(self.energy.parameters()), "lr": self.cfg.baseline.energy_lr},
                {"params": list(self.decoder.parameters()), "lr": lr}]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def frozen_decode(self) -> Callable[[Tensor], Tensor]:
        """:meth:`decode` with the decoder's weights detached and precomputed (posterior chains)."""
        return self.decoder.frozen()

    def log_prior(self, z: Tensor) -> Tensor:
        """Unnormalised log π̃(z) = f(z) + log π0(z) per sample, [B] (no tractable log Z)."""
        f = z
        for layer in self.energy:
            f = layer(f)
        f = f.squeeze(-1)
        return f - 0.5 * (z * z).sum(-1) if self.cfg.baseline.energy_pi0 == "gaussian" else f

    def sample_prior(self, z0: Tensor, gen: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """ULA from N(0, I) on the prior alone (the old reference also added a likelihood term
        against an all-zeros image, docs/design.md §9 bug 6: not here)."""
        b = self.cfg.baseline
        return samplers.ula(self.log_prior, z0, b.prior_step_size, b.prior_steps, gen, noise)

    def generate(self, u: Tensor) -> Tensor:
        Q, T = self.cfg.prior.Q, self.cfg.baseline.prior_steps
        n = standard_normal(u)
        noise = n[:, Q:].reshape(-1, T, Q).transpose(0, 1)
        return torch.sigmoid(self.decode(self.sample_prior(n[:, :Q], noise=noise)))


def _stats(model: LatentImageModel, x: Tensor, loss: Tensor, ell: Tensor, **extra: Tensor) -> dict[str, float]:
    with torch.no_grad():
        rmse = torch.sqrt(torch.clamp(-ell.mean() * 2 * model.sigma**2 / x[0].numel(), min=0))
        return {"loss": float(loss), "loglik": float(ell.mean()), "rmse": float(rmse),
                **{k: float(v.mean()) for k, v in extra.items()}}


def vae_loss(model: VAE, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
             ctx: StepContext | None = None) -> LossOutput:
    """−ELBO = −E_q[log p(x|z)] + KL(q(z|x) ‖ N(0, I)), one reparameterised draw per image. The
    likelihood is the harness's Gaussian with σ; decoder noise σ_n is KAEM's and is not used."""
    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape, generator=gen, device=x.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    ell = model.log_likelihood_paired(x, model.decode(z))
    kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1)
    loss = -(ell - kl).mean()
    return LossOutput(loss=loss, stats=_stats(model, x, loss, ell, kl=kl, elbo=ell - kl), z=z.detach())


def lebm_loss(model: LatentEBM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
              ctx: StepContext | None = None) -> LossOutput:
    """Spec §5.6: L = −(Ê_post[log π̃(z) + ℓ(x|z)] − Ê_prior-ULA[log π̃(z')]). Prior samples: the
    60-step ULA prior chain from N(0, I); posterior: ULA chains per image from N(0, I) (Pang et al.)
    with the preset's Langevin step size and steps. Not a bound on log p(x): its data term is the
    posterior log-likelihood."""
    B, Q, dev = x.shape[0], model.cfg.prior.Q, x.device
    z_prior = model.sample_prior(torch.randn(B, Q, generator=gen, device=dev), gen)
    z0 = torch.randn(B, Q, generator=gen, device=dev)

    decode = model.frozen_decode()

    def target(z: Tensor) -> Tensor:
        return model.log_prior(z) + model.log_likelihood_paired(x, decode(z))

    z = samplers.ula(target, z0, cfg.step_size, cfg.langevin_steps, gen)
    ell = noisy_loglik(model, x, z, gen, cfg)
    post, prior = model.log_prior(z), model.log_prior(z_prior)
    loss = -((post + ell).mean() - prior.mean())
    return LossOutput(loss=loss, stats=_stats(model, x, loss, ell, prior_post=post, prior_prior=prior), z=z)
