"""Posterior estimators as losses with one shared signature (docs/design.md §5.2), chosen by name:

    loss_fn(model, x, gen, cfg, ctx) -> LossOutput

``gen`` is a per-step ``torch.Generator`` (all noise comes from it, so a step is a pure function
of (parameters, batch, seed, step, rank, carried sampler state)). ``ctx`` gives the training
progress (the annealing schedule) and the sampler state carried across steps (MALA step sizes);
the new state comes back in ``LossOutput.carry`` and the training loop checkpoints it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.profiler import record_function

from training.config import PosteriorConfig
from training.mcmc import samplers
from training.mcmc.resample import RESAMPLERS, inverse_cumsum
from training.model.kaem import KAEM, LatentImageModel
from training.model.prior import normal_cdf, normal_icdf, sanitize_u


@dataclass
class StepContext:
    step: int = 0  # training iteration i (the annealing power follows i / total_steps)
    total_steps: int = 1
    carry: dict[str, Tensor] = field(default_factory=dict)  # sampler state from the previous step
    # Persistent chains (posterior.persistent): each row's stored chain, [B, u_dim], NaN rows for images not
    # visited yet (layout: see is_ula_loss)
    chains: Tensor | None = None


@dataclass
class LossOutput:
    loss: Tensor  # scalar to minimise
    stats: dict[str, float] = field(default_factory=dict)  # detached numbers for logs
    z: Tensor | None = None  # IS: the prior proposals; Langevin/annealing: posterior chains (refits)
    carry: dict[str, Tensor] = field(default_factory=dict)  # sampler state for the next step
    chains: Tensor | None = None  # persistent chains: each row's chain where this step left it, [B, u_dim]


def importance_sampling_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
                             ctx: StepContext | None = None) -> LossOutput:
    """IS maximum likelihood with residual resampling (docs/design.md §5.3):
    L = −[ Σ_s ω_{b,s}(log π̃(z_idx) + ℓ_{b,idx}) averaged over b − Ê_prior log π̃(z') ].

    The B×N_s likelihoods that set the weights are computed forward only; the loss is then built from
    the (b, proposal) pairs that carry weight after resampling (about one per image when the ESS is
    ~1), so the decoder-noise likelihood's backward and the prior energies run on those alone (and the
    decoder's backward, when N_s > B). Same draws, value and gradients as
    :func:`importance_sampling_loss_reference`."""
    dev = x.device
    B, S = x.shape[0], cfg.n_samples

    # 1. N_s exact prior proposals shared by the batch, and fresh ones for the CD term.
    cdf, log_z = _prior_tables(model, cfg)
    _, z, z_prior = _proposals(model, S, cfg.cd_samples or S, gen, dev, cdf)

    # 2. ℓ_{b,s} = log p(x_b | z_s) with fresh decoder noise per (b, s): forward only. With N_s ≤ B most
    #    proposals end up carrying weight (each image picks about one when the ESS is ~1), so they are decoded
    #    once, with gradients, and the weights read the detached logits; with more proposals than images a
    #    frozen forward for the weights and a gradient decode of the used ones (step 7) cost less. (At N_s = B,
    #    interleaved A/B of the schema-1 step: 62.6 ms one pass, 64.4 ms two.)
    one_pass = S <= B
    with record_function("kaem.decoder"):
        if one_pass:
            logits_grad = model.decode(z)
            logits = logits_grad.detach()
        else:
            with torch.no_grad():
                logits = model.frozen_decode()(z)
    with torch.no_grad(), record_function("kaem.likelihood"):
        noise = _decoder_noise(model, cfg, (B, S, logits[0].numel()), gen, dev)
        ell = model.log_likelihood(x, logits, noise)

    # 3-6. Weights, ESS, resampling and the paper's ω; then the weight of proposal j in row b,
    #      W_{b,j} = Σ_s ω_{b,s} [idx_{b,s} = j], and the pairs (b, j) where it is not zero.
    with torch.no_grad(), record_function("kaem.resample"):
        idx, omega, ess, resample = _resample(ell, gen, cfg)
        W = torch.zeros_like(ell).scatter_add_(1, idx, omega)
        b_k, j_k = W.nonzero(as_tuple=True)
        used, pos = torch.unique(j_k, return_inverse=True)
        w_k, w_used = W[b_k, j_k], W.sum(0)[used]
        ell_post = (omega * ell.gather(1, idx)).sum(1)  # [B], for the logs

    # 7. The loss on the weighted pairs, with gradients; the CD prior term over fresh ITS samples.
    with record_function("kaem.decoder"):
        logits_used = logits_grad[used] if one_pass else model.decode(z[used])
    with record_function("kaem.likelihood"):
        ell_k = model.log_likelihood_paired(x[b_k], logits_used[pos], None if noise is None else noise[b_k, j_k])
    prior_post, prior_term = _prior_terms(model, z[used], w_used / B, z_prior, cfg, log_z)
    loss = -((w_k * ell_k).sum() / B + prior_post - prior_term)
    stats = _is_stats(model, x, loss, ell, ell_post, float(prior_post.detach()), prior_term, ess, resample)
    return LossOutput(loss=loss, stats=stats, z=z)


def importance_sampling_loss_reference(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
                                       ctx: StepContext | None = None) -> LossOutput:
    """The direct form of :func:`importance_sampling_loss`: every (b, s) likelihood and every proposal's
    energy carry gradients. Kept as the definition the fast form is tested against, and as the
    ``reference`` variant of benchmarks/train_step.py."""
    prior, dev = model.prior, x.device
    B, S = x.shape[0], cfg.n_samples
    with torch.no_grad(), record_function("kaem.prior_its"):
        cdf = prior.cdf_table()
    _, z, z_prior = _proposals(model, S, cfg.cd_samples or S, gen, dev, cdf)
    with record_function("kaem.decoder"):
        logits = model.decode(z)
    with record_function("kaem.likelihood"):
        ell = model.log_likelihood(x, logits, _decoder_noise(model, cfg, (B, S, logits[0].numel()), gen, dev))
    with torch.no_grad(), record_function("kaem.resample"):
        idx, omega, ess, resample = _resample(ell.detach(), gen, cfg)
    with record_function("kaem.prior_energy"):
        logp = prior.log_prob(z, normalized=not cfg.contrastive)  # [S]
        prior_term = prior.log_prob(z_prior).mean() if cfg.contrastive else torch.zeros((), device=dev)
    ell_post = (omega * ell.gather(1, idx)).sum(1)  # [B]
    post = (omega * logp[idx]).sum(1) + ell_post
    loss = -(post.mean() - prior_term)
    stats = _is_stats(model, x, loss, ell.detach(), ell_post.detach(), float((post.mean() - ell_post.mean()).detach()),
                      prior_term, ess, resample)
    return LossOutput(loss=loss, stats=stats, z=z)


def _prior_tables(model: KAEM, cfg: PosteriorConfig) -> tuple[Tensor, Tensor | None]:
    """The step's CDF table and, where the loss needs it (the mixture always, any prior when the loss is
    not contrastive), the differentiable log Z [Q, P]: one evaluation of the energies on the quadrature
    nodes per step, shared by the draws, the Langevin target and both terms of the loss."""
    prior = model.prior
    with record_function("kaem.prior_energy"):
        return prior.tables(with_log_z=prior.kind == "mixture" or not cfg.contrastive)


def _prior_terms(model: KAEM, z_post: Tensor, w_post: Tensor, z_prior: Tensor, cfg: PosteriorConfig,
                 log_z: Tensor | None) -> tuple[Tensor, Tensor]:
    """The loss's two prior terms on draws without gradient: (Σ_n w_n log π̃(z_n) over the posterior states,
    normalised when the loss is not contrastive; Ê_prior log π̃(z') over the CD draws, or 0 when not contrastive),
    both from one weighted pass over the prior's basis (EnergyPrior.log_prob_sums)."""
    prior = model.prior
    with record_function("kaem.prior_energy"):
        if not cfg.contrastive:
            post = prior.log_prob_sums(z_post, w_post.unsqueeze(1), normalized=True, log_z=log_z)[0]
            return post, torch.zeros((), device=z_post.device)
        n, m = len(z_post), len(z_prior)
        a = z_post.new_zeros(n + m, 2)
        a[:n, 0] = w_post
        a[n:, 1] = 1.0 / m
        post, cd = prior.log_prob_sums(torch.cat([z_post, z_prior]), a, log_z=log_z)
        return post, cd


def _proposals(model: KAEM, n: int, n_cd: int, gen: torch.Generator, device: torch.device, cdf: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(u, z, z'): n exact ITS prior draws z = F⁻¹(u) from the table ``cdf`` and n_cd fresh ones z' for
    the CD term (no gradient)."""
    prior = model.prior
    with torch.no_grad(), record_function("kaem.prior_its"):
        u = sanitize_u(torch.rand(n, prior.u_dim, generator=gen, device=device))
        z = prior.sample(u, cdf)
        z_prior = prior.sample(torch.rand(n_cd, prior.u_dim, generator=gen, device=device), cdf)
    return u, z, z_prior


def _decoder_noise(model: LatentImageModel, cfg: PosteriorConfig, shape: tuple[int, ...], gen: torch.Generator,
                   device: torch.device) -> Tensor | None:
    """ε ~ N(0, I) for the pre-activation noise σ_n ε of the loss's likelihood terms, when configured."""
    if cfg.decoder_noise and model.sigma_n > 0:
        return standard_normal(shape, gen, torch.device(device))
    return None


NOISE_CHUNKS = 4  # fixed, so the numbers never depend on the machine's thread count
_noise_pool: ThreadPoolExecutor | None = None


def standard_normal(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    """ε ~ N(0, I) of ``shape`` from ``gen``. A large CPU draw (the B×N_s×D decoder noise of IS: 7.8 M numbers,
    a third of its step) is split into :data:`NOISE_CHUNKS` chunks, each from its own generator seeded from
    ``gen``, filled by parallel threads: torch's CPU normal_ with a generator runs on one core. The numbers
    depend on ``gen`` alone, not on how many threads fill them."""
    global _noise_pool
    out = torch.empty(shape, device=device)
    if device.type != "cpu" or out.numel() < (1 << 20):
        return out.normal_(generator=gen)
    seeds = torch.randint(0, 2**62, (NOISE_CHUNKS,), generator=gen).tolist()
    chunks = out.view(-1).chunk(NOISE_CHUNKS)

    def fill(i: int) -> None:
        chunks[i].normal_(generator=torch.Generator().manual_seed(seeds[i]))

    workers = min(NOISE_CHUNKS, torch.get_num_threads())
    if workers < 2:
        for i in range(NOISE_CHUNKS):
            fill(i)
        return out
    if _noise_pool is None:
        _noise_pool = ThreadPoolExecutor(NOISE_CHUNKS, thread_name_prefix="kaem-noise")
    list(_noise_pool.map(fill, range(NOISE_CHUNKS)))
    return out


def _resample(ell: Tensor, gen: torch.Generator, cfg: PosteriorConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spec §5.3 steps 3-6 on ℓ[B, S]: weights = likelihoods (the proposal is the prior), rows whose
    ESS < threshold·N_s are resampled. Returns (idx[B, S], ω[B, S], ESS[B], resampled[B, 1])."""
    B, S = ell.shape
    w = torch.softmax(ell, dim=1)
    ess = 1.0 / (w * w).sum(1)
    resample = (ess < cfg.ess_threshold * S).unsqueeze(1)
    v = torch.rand(B, S, generator=gen, device=ell.device)
    keep = torch.arange(S, device=ell.device).expand(B, S)
    idx = torch.where(resample, RESAMPLERS[cfg.resampler](w, v), keep)
    # Paper's rule: ω = 1/N_s after resampling, ω = w otherwise. (The reference applies a softmax
    # to the probabilities instead; docs/design.md §9 bug 3.)
    omega = torch.where(resample, torch.full_like(w, 1.0 / S), w)
    return idx, omega, ess, resample


def _is_stats(model: KAEM, x: Tensor, loss: Tensor, ell: Tensor, ell_post: Tensor, prior_post: float,
              prior_term: Tensor, ess: Tensor, resample: Tensor) -> dict[str, float]:
    with torch.no_grad():
        n_pix = x[0].numel()
        return {
            "loss": float(loss),
            "loglik": float(ell_post.mean()),
            "log_px": float(samplers.importance_log_evidence(ell).mean()),  # IS estimate of log p(x) (+ const)
            "rmse": float(torch.sqrt(torch.clamp(-ell_post.mean() * 2 * model.sigma**2 / n_pix, min=0))),
            "ess": float(ess.mean()),
            "resampled": float(resample.float().mean()),
            "prior_post": prior_post,
            "prior_prior": float(prior_term),
        }


# ---- Langevin-family estimators (docs/design.md §5.4-5.5) ------------------------------------------------


def _prior_draws(model: KAEM, n: int, gen: torch.Generator, device: torch.device, cdf: Tensor) -> Tensor:
    """n exact ITS prior samples from the step's table (no gradient): chain starts and the CD term's z'."""
    with torch.no_grad(), record_function("kaem.prior_its"):
        return model.prior.sample(torch.rand(n, model.u_dim, generator=gen, device=device), cdf)


def _log_prior_fn(model: KAEM, log_z: Tensor | None) -> samplers.LogTarget:
    """log π̃(z) for Langevin targets. KART layouts are used unnormalised (log Z does not move z); the
    mixture needs its per-component log Z, the step's, held constant."""
    prior = model.prior
    if prior.kind != "mixture":
        return prior.log_prob
    log_z = log_z.detach()
    return lambda z: prior.log_prob(z, log_z=log_z)


def _log_lik_fn(model: KAEM, x: Tensor, decode: Callable[[Tensor], Tensor] | None = None) -> samplers.LogTarget:
    """ℓ(x_b | z_b) without decoder noise (the Langevin gradient uses none, docs/design.md §5.4), through the step's
    frozen decoder (chains need gradients in z only)."""
    decode = decode or model.frozen_decode()
    return lambda z: model.log_likelihood_paired(x, decode(z))


def noisy_loglik(model: LatentImageModel, x: Tensor, z: Tensor, gen: torch.Generator, cfg: PosteriorConfig) -> Tensor:
    """ℓ(x_b | z_b) with fresh decoder noise when configured: the loss's data term, [B]."""
    logits = model.decode(z)
    return model.log_likelihood_paired(x, logits, _decoder_noise(model, cfg, logits.flatten(1).shape, gen, x.device))


def _posterior_loss(model: KAEM, x: Tensor, z_post: Tensor, z_prior: Tensor, ell: Tensor, cfg: PosteriorConfig,
                    log_z: Tensor | None, data_term: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """L = −[Ê_post(log π̃(z) + ℓ(x|z)) − Ê_prior(log π̃(z'))] on detached chain states (docs/design.md §5.2),
    with ell[B] = ℓ(x_b | z_b) and the step's log Z (:func:`_prior_tables`). ``data_term`` replaces
    Ê_post ℓ (the thermodynamic integral)."""
    logp, prior_term = _prior_terms(model, z_post, torch.full((len(z_post),), 1.0 / len(z_post), device=x.device),
                                    z_prior, cfg, log_z)
    data = ell.mean() if data_term is None else data_term
    loss = -(data + logp - prior_term)
    with torch.no_grad():
        n_pix = x[0].numel()
        stats = {
            "loss": float(loss),
            "loglik": float(ell.mean()),
            "rmse": float(torch.sqrt(torch.clamp(-ell.mean() * 2 * model.sigma**2 / n_pix, min=0))),
            "prior_post": float(logp),
            "prior_prior": float(prior_term),
        }
    return loss, stats


def ula_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
             ctx: StepContext | None = None) -> LossOutput:
    """"Vanilla" Langevin MLE: B chains (one per image) from ITS prior samples, ``langevin_steps``
    ULA moves on log π̃(z) + log p(x|z), the loss of §5.2 at the final states."""
    B, dev = x.shape[0], x.device
    cdf, log_z = _prior_tables(model, cfg)
    z0, z_prior = _prior_draws(model, B, gen, dev, cdf), _prior_draws(model, B, gen, dev, cdf)
    log_prior, log_lik = _log_prior_fn(model, log_z), _log_lik_fn(model, x)
    with record_function("kaem.langevin"):
        z = samplers.ula(lambda z: log_prior(z) + log_lik(z), z0, cfg.step_size, cfg.langevin_steps, gen)
    with record_function("kaem.decoder"):
        ell = noisy_loglik(model, x, z, gen, cfg)
    loss, stats = _posterior_loss(model, x, z, z_prior, ell, cfg, log_z)
    stats["eta"] = cfg.step_size
    return LossOutput(loss=loss, stats=stats, z=z)


def is_ula_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
                ctx: StepContext | None = None) -> LossOutput:
    """Resample-move in the prior's noise space (IS, then Langevin; docs/design.md §5.3 + §5.4).

    Every prior draw is z = F⁻¹(u) with u = Φ(ε), ε ~ N(0, I): in ε the prior is exactly N(0, I) and
    the posterior is p(ε | x) ∝ N(ε; 0, I)·p(x | z(ε)). Each image draws its chain start from the N_s
    shared proposals by their importance weights (the likelihoods), then ``langevin_steps`` ULA moves
    on log N(ε) + log p(x | z(ε)) refine it, and the loss of §5.2 is taken at z = F⁻¹(Φ(ε_K)). The
    chains never leave the prior's support (no quadrature-domain drift), and unlike IS alone (ESS ~ 1:
    only the direction that picks the best proposal carries signal) every latent direction gets a
    gradient of the image. Mixture: the component-selection uniforms stay those of the start.

    With ``cfg.persistent`` a row whose ``ctx.chains`` entry is set continues that chain instead (its
    component-selection uniforms, then ε: the layout of ``LossOutput.chains``); only the other rows draw
    IS starts, and a batch without such rows decodes no proposals at all."""
    prior, dev = model.prior, x.device
    B, S = x.shape[0], cfg.n_samples
    its = prior.u_dim - prior.its_dim  # first ITS column of u
    cdf, log_z = _prior_tables(model, cfg)
    decode = model.frozen_decode()  # every decode before the loss's needs no parameter gradient
    stored = ctx.chains if cfg.persistent and ctx is not None and ctx.chains is not None else None
    fresh = slice(None) if stored is None else stored.isnan().any(1)
    x_is = x if stored is None else x[fresh]
    stats: dict[str, float] = {}
    carry: dict[str, Tensor] = {}
    if x_is.shape[0] and cfg.pool_refresh:
        u_is, z_prior, carry = _pool_starts(model, x_is, cfg, ctx, gen, cdf, decode, stats, cfg.cd_samples or B)
    elif x_is.shape[0]:
        u, z, z_prior = _proposals(model, S, cfg.cd_samples or B, gen, dev, cdf)
        with torch.no_grad():
            with record_function("kaem.decoder"):
                ell_is = model.log_likelihood(x_is, decode(z), None)  # [B, S]; weights w = softmax(ℓ)
            w = torch.softmax(ell_is, dim=1)
            start = inverse_cumsum(torch.cumsum(w, 1), torch.rand(x_is.shape[0], 1, generator=gen, device=dev)
                                   ).squeeze(1)
            u_is = u[start]
            stats.update(ess=float((1.0 / (w * w).sum(1)).mean()),
                         loglik_start=float(ell_is.gather(1, start.unsqueeze(1)).mean()))
    else:  # every row continues its chain: only the CD term's prior draws
        z_prior = _prior_draws(model, cfg.cd_samples or B, gen, dev, cdf)
    with torch.no_grad():
        if stored is None:
            select, eps0 = u_is[:, :its], normal_icdf(u_is[:, its:])
        else:
            select, eps0 = stored[:, :its].clone(), stored[:, its:].clone()
            if x_is.shape[0]:
                select[fresh], eps0[fresh] = u_is[:, :its], normal_icdf(u_is[:, its:])
            stats["fresh"] = x_is.shape[0] / B

    def z_of(eps: Tensor) -> Tensor:
        return prior.sample(torch.cat([select, normal_cdf(eps)], dim=1), cdf)

    def log_target(eps: Tensor) -> Tensor:  # log N(ε; 0, I) + ℓ(x_b | z(ε_b)), decoder noise off
        return -0.5 * (eps * eps).sum(1) + model.log_likelihood_paired(x, decode(z_of(eps)))

    with record_function("kaem.langevin"):
        eps = samplers.ula(log_target, eps0, cfg.step_size, cfg.langevin_steps, gen)
    with torch.no_grad():
        z_post = z_of(eps)
    with record_function("kaem.decoder"):
        ell = noisy_loglik(model, x, z_post, gen, cfg)
    loss, loss_stats = _posterior_loss(model, x, z_post, z_prior, ell, cfg, log_z)
    with torch.no_grad():
        stats = {**loss_stats, **stats, "eta": cfg.step_size, "move": float((eps - eps0).norm(dim=1).mean())}
        chains = torch.cat([select, eps], dim=1) if cfg.persistent else None
    return LossOutput(loss=loss, stats=stats, z=z_post, chains=chains, carry=carry)


def _pool_starts(model: KAEM, x: Tensor, cfg: PosteriorConfig, ctx: StepContext | None, gen: torch.Generator,
                 cdf: Tensor, decode: Callable[[Tensor], Tensor], stats: dict[str, float], n_cd: int
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """is_ula's chain starts from a proposal pool kept between steps (``cfg.pool_refresh`` > 0): returns each
    row's start uniforms u[B, u_dim], ``n_cd`` fresh prior draws for the CD term, and the pool for the next step's
    carry.

    The pool holds N_s prior proposals (their uniforms) with their decoded means. Each step draws and decodes
    ``pool_refresh`` fresh ones, which replace the oldest (an empty pool is filled at once). Stored means come
    from up to N_s / pool_refresh steps ago, so they only screen: each image's ``pool_finalists`` best by them
    are decoded again with the current prior and decoder, and its start is drawn among them by those exact
    weights. With one-hot weights (ESS ≈ 1) that is the start a fresh pool of the same N_s proposals gives
    whenever the screen keeps the best one among the finalists; the log's ``pool_gap`` is the screen's mean
    error on the finalists, in nats."""
    prior, dev = model.prior, x.device
    B, S = x.shape[0], cfg.n_samples
    pool = ctx.carry if ctx is not None else {}
    old_u, old_m = pool.get("pool_u"), pool.get("pool_means")
    have = 0 if old_u is None or old_u.shape[1] != prior.u_dim or old_u.shape[0] > S else old_u.shape[0]
    n_new = S - have if have < S else cfg.pool_refresh
    u_new, z_new, z_prior = _proposals(model, n_new, n_cd, gen, dev, cdf)
    with torch.no_grad():
        with record_function("kaem.decoder"):
            m_new = torch.sigmoid(decode(z_new)).flatten(1)
        keep = min(have, S - n_new)
        pool_u = torch.cat([u_new, old_u[:keep]]) if keep else u_new
        pool_m = torch.cat([m_new, old_m[:keep]]) if keep else m_new
        screen = model.log_likelihood_of_means(x, pool_m)  # [B, S] by the stored means
        top = screen.topk(min(cfg.pool_finalists, S), dim=1).indices  # [B, k]
        finalists, where = torch.unique(top, return_inverse=True)
        with record_function("kaem.decoder"):
            m_fin = torch.sigmoid(decode(prior.sample(pool_u[finalists], cdf))).flatten(1)
        pool_m[finalists] = m_fin  # the pool keeps the current means where they were just computed
        ell = model.log_likelihood_of_means(x, m_fin).gather(1, where)  # [B, k], exact
        w = torch.softmax(ell, dim=1)
        pick = inverse_cumsum(torch.cumsum(w, 1), torch.rand(B, 1, generator=gen, device=dev))
        start = top.gather(1, pick).squeeze(1)
        stats.update(ess=float((1.0 / (w * w).sum(1)).mean()),
                     loglik_start=float(ell.gather(1, pick).mean()),
                     pool_gap=float((screen.gather(1, top) - ell).abs().mean()))
    return pool_u[start], z_prior, {"pool_u": pool_u, "pool_means": pool_m}


def mala_initial_step(cfg: PosteriorConfig) -> float:
    return math.sqrt(2.0 * cfg.step_size)


def mala_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
              ctx: StepContext | None = None) -> LossOutput:
    """MALA posterior chains with per-chain autoMALA step sizes; η_init comes from the previous
    iteration (``ctx.carry["mala_eta"]``, the carry-over rule), on the first from the ULA step:
    a leapfrog step ε moves z by ε²/2·∇ + ε·p, i.e. ULA with η = ε²/2, so ε_init = √(2η)."""
    B, dev = x.shape[0], x.device
    carried = (ctx.carry if ctx is not None else {}).get("mala_eta")
    first = torch.full((B,), mala_initial_step(cfg))
    eta0 = carried.to(dev) if carried is not None and carried.shape == (B,) else first
    cdf, log_z = _prior_tables(model, cfg)
    z0, z_prior = _prior_draws(model, B, gen, dev, cdf), _prior_draws(model, B, gen, dev, cdf)
    decode = model.frozen_decode()
    log_prior, log_lik = _log_prior_fn(model, log_z), _log_lik_fn(model, x, decode)

    def restrict(rows: Tensor) -> samplers.LogTarget:  # the chains of images x[rows] alone
        lik = _log_lik_fn(model, x[rows], decode)
        return lambda z: log_prior(z) + lik(z)

    with record_function("kaem.langevin"):
        res = samplers.mala(lambda z: log_prior(z) + log_lik(z), z0, eta0.to(dev), gen, samplers.MALASettings.of(cfg),
                            restrict)
    with record_function("kaem.decoder"):
        ell = noisy_loglik(model, x, res.z, gen, cfg)
    loss, stats = _posterior_loss(model, x, res.z, z_prior, ell, cfg, log_z)
    stats.update(accept=float(res.accept_rate.mean()), eta=float(res.eta_mean.mean()),
                 reversible=res.reversible_rate, search_evals=res.search_evals)
    return LossOutput(loss=loss, stats=stats, z=res.z, carry={"mala_eta": res.eta_next.detach()})


def thermo_loss(model: KAEM, x: Tensor, gen: torch.Generator, cfg: PosteriorConfig,
                ctx: StepContext | None = None) -> LossOutput:
    """Population annealing with global swaps and the thermodynamic-integration loss (docs/design.md §5.5):
    L = −(TI + Ê_{t=1}[log π̃(z)] − Ê_prior[log π̃(z')]), TI over ℓ means at t_0 = 0 (prior
    samples) .. t_{N_t} = 1, each with fresh decoder noise."""
    ctx = ctx or StepContext()
    B, dev, K = x.shape[0], x.device, cfg.n_temps
    power = samplers.annealing_power(ctx.step, ctx.total_steps, cfg.power_start, cfg.power_end, cfg.power_cycles)
    temps = samplers.temperatures(K, power).to(dev)
    cdf, log_z = _prior_tables(model, cfg)
    z0 = _prior_draws(model, K * B, gen, dev, cdf)
    z_prior = _prior_draws(model, B, gen, dev, cdf)
    xk = x.repeat(K, *([1] * (x.dim() - 1)))  # chain k·B + b sees image b

    def swap_lik(z: Tensor) -> Tensor:  # likelihoods for the swap test carry decoder noise (docs/design.md §5.5)
        return noisy_loglik(model, xk, z, gen, cfg)

    with record_function("kaem.langevin"):
        res = samplers.anneal_populations(
            _log_prior_fn(model, log_z), _log_lik_fn(model, xk), z0.view(K, B, *z0.shape[1:]), temps[1:],
            cfg.step_size, cfg.langevin_steps, gen, swap_lik=swap_lik, swap_every=cfg.swap_every,
        )
    with record_function("kaem.decoder"):
        ell_prior = noisy_loglik(model, x, z_prior, gen, cfg)
        ell_temps = noisy_loglik(model, xk, res.z.reshape(K * B, *z0.shape[1:]), gen, cfg).view(K, B)
    means = torch.cat([ell_prior.mean().unsqueeze(0), ell_temps.mean(1)])
    ti = samplers.thermodynamic_integral(means, temps, cfg.ti_rule)
    z_post = res.z[-1]
    loss, stats = _posterior_loss(model, x, z_post, z_prior, ell_temps[-1], cfg, log_z, data_term=ti)
    stats.update(log_px=float(ti.detach()), loglik_prior=float(ell_prior.detach().mean()),
                 swap_rate=res.swap_rate, power=power, eta=cfg.step_size)
    return LossOutput(loss=loss, stats=stats, z=z_post)


# Estimators whose chains move z itself and can leave the quadrature domain: under training.domain_update
# the domain follows them. (is_ula moves the prior's noise ε, so its z never leaves the domain.)
CHAINS_IN_Z = ("ula", "mala", "thermo")

LossFn = Callable[[KAEM, Tensor, torch.Generator, PosteriorConfig, StepContext | None], LossOutput]
POSTERIORS: dict[str, LossFn] = {
    "is": importance_sampling_loss,
    "is_ula": is_ula_loss,
    "ula": ula_loss,
    "mala": mala_loss,
    "thermo": thermo_loss,
}
