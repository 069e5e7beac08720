"""KAEM = energy prior + decoder + Gaussian likelihood, rebuilt only from a ``KAEMConfig``; the base
class every model of the harness (KAEM and the baselines) shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from training.config import KAEMConfig
from training.model.decoder import build_decoder
from training.model.prior import BucketLookup, EnergyPrior


class LatentImageModel(nn.Module):
    """What every model in the harness shares: a decoder g_Φ from a Q-dim latent to pre-sigmoid
    logits, the Gaussian likelihood with σ and σ_n, and a single ``generate(u)`` from uniforms
    ``u[B, noise_dim]`` (one row per image seed) to images in [0, 1]."""

    decoder: nn.Module

    def __init__(self, cfg: KAEMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.sigma = cfg.likelihood.sigma
        self.sigma_n = cfg.likelihood.sigma_n

    @staticmethod
    def init_generator(cfg: KAEMConfig, init_seed: int | None) -> torch.Generator:
        return torch.Generator().manual_seed(cfg.train.seed if init_seed is None else init_seed)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: one learning rate for everything unless a model says otherwise."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def optimizer(self, lr: float) -> torch.optim.Adam:
        """Adam over :meth:`param_groups`, fused (one kernel over all parameters: on CPU 0.6 ms a step for the
        fmnist KAEM's 1.6 M parameters, against 8 ms for the per-parameter loop Adam defaults to there)."""
        return torch.optim.Adam(self.param_groups(lr), fused=True)

    @property
    def noise_dim(self) -> int:
        raise NotImplementedError

    def generate(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def log_likelihood_paired(self, x: Tensor, logits: Tensor, noise: Tensor | None = None) -> Tensor:
        """ℓ_b = −||x_b − sigmoid(g_b + σ_n ε_b)||² / (2σ²) for matched rows (one chain per image), [B].

        x[B, C, H, W], logits[B, C, H, W], noise[B, C·H·W] or None (Langevin gradients use none)."""
        g = logits.flatten(1)
        if noise is not None:
            g = g + self.sigma_n * noise
        resid = x.flatten(1) - torch.sigmoid(g)
        return -(resid * resid).sum(1) / (2 * self.sigma**2)


class KAEM(LatentImageModel):
    def __init__(self, cfg: KAEMConfig, init_seed: int | None = None):
        super().__init__(cfg)
        gen = self.init_generator(cfg, init_seed)
        self.prior = EnergyPrior(cfg.prior, gen)
        self.decoder = build_decoder(cfg.decoder, cfg.prior.Q, gen)

    def param_groups(self, lr: float) -> list[dict]:
        """The prior at ``lr · train.prior_lr_ratio``, the decoder at ``lr`` (one group when the ratio is 1)."""
        ratio = self.cfg.train.prior_lr_ratio
        if ratio == 1.0:
            return super().param_groups(lr)
        return [{"params": list(self.prior.parameters()), "lr": lr * ratio},
                {"params": list(self.decoder.parameters()), "lr": lr}]

    @property
    def u_dim(self) -> int:
        return self.prior.u_dim

    @property
    def noise_dim(self) -> int:
        return self.prior.u_dim

    def decode(self, z: Tensor) -> Tensor:
        """Pre-sigmoid decoder output g_Φ(h(z)), [B, C, H, W]."""
        return self.decoder(self.prior.latent(z))

    def frozen_decode(self) -> Callable[[Tensor], Tensor]:
        """:meth:`decode` with the decoder's current weights detached and precomputed (no parameter
        gradient; gradients in z still flow): for the decodes inside one training step's sampler."""
        dec = self.decoder.frozen()
        return lambda z: dec(self.prior.latent(z))

    def latent_of_u(self, u: Tensor, cdf: Tensor | None = None, lookup: BucketLookup | None = None) -> Tensor:
        """Decoder input h[B, Q] of the uniforms ``u[B, D]`` (differentiable in u: latent health)."""
        return self.prior.latent(self.prior.sample(u, cdf, lookup))

    def generate(self, u: Tensor, cdf: Tensor | None = None, lookup: BucketLookup | None = None) -> Tensor:
        """Single forward pass u → x = sigmoid(g_Φ(h(F⁻¹(u)))) in [0, 1], [B, C, H, W], no noise."""
        return torch.sigmoid(self.decoder(self.latent_of_u(u, cdf, lookup)))

    def log_likelihood(self, x: Tensor, logits: Tensor, noise: Tensor | None) -> Tensor:
        """ℓ_{b,s} = −||x_b − sigmoid(g_s + σ_n ε_{b,s})||² / (2σ²) for all pairs, [B, S].

        x[B, C, H, W], logits[S, C, H, W], noise[B, S, C·H·W] or None. Without noise the square
        expands into one (B×D)·(D×S) matmul, several times cheaper than the [B, S, D] tensor."""
        xb = x.flatten(1)
        g = logits.flatten(1)
        if noise is None:
            return self.log_likelihood_of_means(x, torch.sigmoid(g))
        if torch.is_grad_enabled() and g.requires_grad:
            return _NoisyGaussianLogLik.apply(xb, g, noise, self.sigma_n, self.sigma)
        # forward only (importance weights): one [B, S, D] buffer, updated in place
        t = torch.addcmul(g.unsqueeze(0), noise, torch.tensor(self.sigma_n, dtype=g.dtype)).sigmoid_()
        sq = torch.linalg.vector_norm(t.sub_(xb.unsqueeze(1)), dim=-1).square_()
        return -sq / (2 * self.sigma**2)

    def log_likelihood_of_means(self, x: Tensor, means: Tensor) -> Tensor:
        """ℓ_{b,s} = −||x_b − m_s||² / (2σ²) for decoded means m[S, C·H·W] = sigmoid(g_s) without noise, [B, S]:
        the square expanded into one (B×D)·(D×S) matmul."""
        xb = x.flatten(1)
        sq = (xb * xb).sum(1, keepdim=True) - 2 * xb @ means.T + (means * means).sum(1)
        return -sq / (2 * self.sigma**2)


class _NoisyGaussianLogLik(torch.autograd.Function):
    """ℓ_{b,s} = −Σ_d (x_bd − sigmoid(g_sd + σ_n ε_bsd))² / (2σ²) with a hand-written backward.

    The [B, S, D] tensor dominates the IS step (docs/design.md §11.7); autograd's generic graph makes
    ~15 passes over it, this makes ~8 (measured in benchmarks/train_step.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, noise: Tensor, sigma_n: float, sigma: float) -> Tensor:
        xhat = torch.addcmul(g.unsqueeze(0), noise, torch.tensor(sigma_n, dtype=g.dtype)).sigmoid_()
        resid = x.unsqueeze(1) - xhat  # [B, S, D]
        ctx.save_for_backward(resid, xhat)
        ctx.sigma = sigma
        return torch.linalg.vector_norm(resid, dim=-1).square_().div_(-2 * sigma**2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        resid, xhat = ctx.saved_tensors
        # dℓ/dg = (x − x̂) · x̂(1 − x̂) / σ², summed over b with the incoming weights.
        t = torch.mul(xhat, 1.0 - xhat).mul_(resid)
        grad_g = torch.einsum("bs,bsd->sd", grad_out, t).div_(ctx.sigma**2)
        return None, grad_g, None, None, None


def nhwc(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` → ``[N, H, W, C]``. With one channel a reshape, the same values: in the exported graph a
    Transpose copies (~65 µs for the mean at batch 256) where a Reshape of a contiguous tensor does not."""
    n, c, h, w = x.shape
    return x.reshape(n, h, w, 1) if c == 1 else x.permute(0, 2, 3, 1)


def to_uint8_nhwc(mean: Tensor) -> Tensor:
    """Decoder mean ``[N, C, H, W]`` in [0, 1] to uint8 ``[N, H, W, C]`` (round half up, clamped).

    The exported graph uses this very function, so eager and served pixels agree bit for bit."""
    scaled = torch.clamp(mean, 0.0, 1.0) * 255.0 + 0.5
    return nhwc(torch.floor(scaled).to(torch.uint8))
