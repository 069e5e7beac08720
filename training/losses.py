"""Posterior estimators as losses with one shared signature (spec §5.2):

    loss_fn(model, x, gen, cfg) -> LossOutput

``gen`` is a per-step ``torch.Generator`` (all noise comes from it, so a step is a pure function
of (parameters, batch, seed, step, rank)). Later estimators (ULA/MALA/annealing) register here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.profiler import record_function

from training.config import PosteriorConfig
from training.model import KAEM
from training.resample import RESAMPLERS


@dataclass
class LossOutput:
    loss: Tensor  # scalar to minimise
    stats: dict[str, float] = field(default_factory=dict)  # detached numbers for logs
    z: Tensor | None = None  # latent samples the grid refit may use (prior samples under IS)


def importance_sampling_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig) -> LossOutput:
    """IS maximum likelihood with residual resampling (spec §5.3):
    L = −[ Σ_s ω_{b,s}(log π̃(z_idx) + ℓ_{b,idx}) averaged over b − Ê_prior log π̃(z') ]."""
    prior, dev = model.prior, x.device
    B, S = x.shape[0], cfg.n_samples

    # 1. N_s exact prior proposals shared by the batch, and N_s fresh ones for the CD term.
    with torch.no_grad(), record_function("kaem.prior_its"):
        cdf = prior.cdf_table()
        z = prior.sample(torch.rand(S, prior.u_dim, generator=gen, device=dev), cdf)
        z_prior = prior.sample(torch.rand(S, prior.u_dim, generator=gen, device=dev), cdf)

    # 2. ℓ_{b,s} = log p(x_b | z_s) with fresh decoder noise per (b, s).
    with record_function("kaem.decoder"):
        logits = model.decode(z)
    with record_function("kaem.likelihood"):
        noise = None
        if cfg.decoder_noise and model.sigma_n > 0:
            noise = torch.randn(B, S, logits[0].numel(), generator=gen, device=dev)
        ell = model.log_likelihood(x, logits, noise)

    # 3-5. Weights = likelihoods (the proposal is the prior); resample rows whose ESS is low.
    with torch.no_grad(), record_function("kaem.resample"):
        w = torch.softmax(ell, dim=1)
        ess = 1.0 / (w * w).sum(1)
        resample = (ess < cfg.ess_threshold * S).unsqueeze(1)
        v = torch.rand(B, S, generator=gen, device=dev)
        keep = torch.arange(S, device=dev).expand(B, S)
        idx = torch.where(resample, RESAMPLERS[cfg.resampler](w, v), keep)
        # 6. Paper's rule: ω = 1/N_s after resampling, ω = w otherwise. (The reference applies a
        #    softmax to the probabilities instead; spec §9 bug 3.)
        omega = torch.where(resample, torch.full_like(w, 1.0 / S), w)

    with record_function("kaem.prior_energy"):
        logp = prior.log_prob(z, normalized=not cfg.contrastive)  # [S]
        # 7. Contrastive prior term over fresh ITS samples (exact, so no MCMC bias).
        prior_term = prior.log_prob(z_prior).mean() if cfg.contrastive else torch.zeros((), device=dev)
    ell_post = (omega * ell.gather(1, idx)).sum(1)  # [B]
    post = (omega * logp[idx]).sum(1) + ell_post
    loss = -(post.mean() - prior_term)

    with torch.no_grad():
        n_pix = x[0].numel()
        log_px = torch.logsumexp(ell, 1) - math.log(S)  # IS estimate of log p(x) (+ const)
        stats = {
            "loss": float(loss),
            "loglik": float(ell_post.mean()),
            "log_px": float(log_px.mean()),
            "rmse": float(torch.sqrt(torch.clamp(-ell_post.mean() * 2 * model.sigma**2 / n_pix, min=0))),
            "ess": float(ess.mean()),
            "resampled": float(resample.float().mean()),
            "prior_post": float(post.mean() - ell_post.mean()),
            "prior_prior": float(prior_term),
        }
    return LossOutput(loss=loss, stats=stats, z=z)


LossFn = Callable[[KAEM, Tensor, torch.Generator, PosteriorConfig], LossOutput]
POSTERIORS: dict[str, LossFn] = {"is": importance_sampling_loss}
