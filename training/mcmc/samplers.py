"""Langevin-family posterior samplers (docs/design.md §5.4-5.5): ULA, MALA with an autoMALA-style step-size
search, temperature ladders with global population swaps, and the thermodynamic integral.

Every sampler is a pure function of (target, start, generator, settings): all noise is drawn from
the injected ``torch.Generator``, so the same seed gives the same chains bit for bit. A target is a
callable ``log_target(z) -> [C]`` giving one (unnormalised) log density per chain; chains are
independent, so the gradient of the sum is every chain's own gradient. Chains are the leading
axis of ``z``; the remaining axes are the latent shape ([Q, P] or [Q]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

LogTarget = Callable[[Tensor], Tensor]
# rows -> the target of those chains alone. Lets MALA's step-size search evaluate only the chains still
# searching; a target whose chains carry their own data (KAEM: one image per chain) must provide it.
Restrict = Callable[[Tensor], LogTarget]


def value_and_grad(log_target: LogTarget, z: Tensor) -> tuple[Tensor, Tensor]:
    """(log γ(z) [C], ∇_z log γ(z)) with autograd on a detached copy of z: parameters get no
    gradient, and it works inside ``torch.no_grad`` callers (docs/design.md §9)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        lp = log_target(zz)
        (g,) = torch.autograd.grad(lp.sum(), zz)
    return lp.detach(), g.detach()


def _per_chain(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-chain vector [C] against a chain-major tensor [C, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _chain_sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def importance_log_evidence(ell: Tensor) -> Tensor:
    """IS estimate of log p(x) from likelihoods ell[..., S] of S prior draws: log (1/S) Σ_s e^ℓ_s."""
    return torch.logsumexp(ell, dim=-1) - math.log(ell.shape[-1])


# ---- ULA (docs/design.md §5.4) -------------------------------------------------------------------------


def ula_step(log_target: LogTarget, z: Tensor, step_size: float, gen: torch.Generator | None,
             xi: Tensor | None = None) -> Tensor:
    """One unadjusted Langevin move z ← z + η ∇ log γ(z) + √(2η) ξ (no clamping, no MH test);
    ξ ~ N(0, I) from ``gen`` unless given."""
    _, g = value_and_grad(log_target, z)
    if xi is None:
        xi = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
    return z + step_size * g + math.sqrt(2.0 * step_size) * xi


def ula(log_target: LogTarget, z0: Tensor, step_size: float, n_steps: int, gen: torch.Generator | None,
        noise: Tensor | None = None) -> Tensor:
    """``n_steps`` ULA moves from ``z0``; the normals come from ``gen`` or from ``noise[n_steps, *z0.shape]``."""
    z = z0.detach()
    for i in range(n_steps):
        z = ula_step(log_target, z, step_size, gen, None if noise is None else noise[i])
    return z


# ---- MALA with autoMALA-style step-size search (docs/design.md §5.4) -------------------------------------


@dataclass(frozen=True)
class MALASettings:
    """The MALA fields of a posterior config, under the config's own names (:meth:`of` copies them by name:
    one set of defaults, in training.config.PosteriorConfig), plus the search's step factor."""

    langevin_steps: int  # iterations
    eta_min: float
    eta_max: float
    mala_unadjusted: int  # first iterations: plain leapfrog moves, no search and no MH test
    mala_target_accept: float  # carry-over: η_init ×Δη above this acceptance rate, ÷Δη below
    reversibility_tol: float  # relative tolerance of the η and position reversibility check
    mala_precondition: bool  # diagonal preconditioner from the chains' spread
    factor: float = 2.0  # Δη: the search multiplies or divides η by this

    @classmethod
    def of(cls, posterior: object) -> MALASettings:
        """The settings of a ``PosteriorConfig`` (any object with these attributes)."""
        return cls(**{f.name: getattr(posterior, f.name) for f in fields(cls) if f.name != "factor"})

    @property
    def max_search(self) -> int:
        """Doubling/halving steps after which η must have left [η_min, η_max]: the search is bounded."""
        return math.ceil(math.log(self.eta_max / self.eta_min) / math.log(self.factor)) + 2


@dataclass
class MALAResult:
    z: Tensor  # final chain states
    eta_next: Tensor  # [C] η_init for the next training iteration (the carry-over rule)
    eta_mean: Tensor  # [C] mean accepted η (η_init where nothing was accepted)
    accept_rate: Tensor  # [C] fraction of adjusted moves accepted
    reversible_rate: float  # fraction of adjusted proposals that passed the reversibility check
    search_evals: float  # mean leapfrog evaluations per adjusted move (forward + reverse search)


@dataclass
class _Proposal:
    z: Tensor
    p: Tensor
    lp: Tensor
    g: Tensor
    log_r: Tensor

    def select(self, mask: Tensor, other: _Proposal) -> _Proposal:
        """Rows of self where mask, of other elsewhere."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(_per_chain(mask, a), a, b)

        return _Proposal(*(pick(a, b) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[Tensor, ...]:
        return self.z, self.p, self.lp, self.g, self.log_r


def leapfrog(log_target: LogTarget, z: Tensor, p: Tensor, lp: Tensor, g: Tensor, eta: Tensor,
             inv_sqrt_m: Tensor) -> _Proposal:
    """One leapfrog step with diagonal mass M (inv_sqrt_m = M^{-1/2}) and the log acceptance ratio

        p* = p + η/2 ∇ log γ(z) M^{-1/2};  z' = z + η p* M^{-1/2};  p' = p* + η/2 ∇ log γ(z') M^{-1/2}
        log r = log γ(z') − log γ(z) − (|p'|² − |p|²)/2."""
    e = _per_chain(eta, z)
    p_half = p + 0.5 * e * g * inv_sqrt_m
    z_new = z + e * p_half * inv_sqrt_m
    lp_new, g_new = value_and_grad(log_target, z_new)
    p_new = p_half + 0.5 * e * g_new * inv_sqrt_m
    log_r = lp_new - lp - 0.5 * (_chain_sum(p_new * p_new) - _chain_sum(p * p))
    return _Proposal(z_new, p_new, lp_new, g_new, log_r)


def _leapfrog_rows(log_target: LogTarget, restrict: Restrict | None, z: Tensor, p: Tensor, lp: Tensor, g: Tensor,
                   eta: Tensor, inv_sqrt_m: Tensor, rows: Tensor, fill: _Proposal) -> _Proposal:
    """Leapfrog for the chains in the mask ``rows`` only (other rows copied from ``fill``), when the
    target can be restricted; otherwise for all chains."""
    if restrict is None or bool(rows.all()):
        return leapfrog(log_target, z, p, lp, g, eta, inv_sqrt_m)
    idx = rows.nonzero().squeeze(1)
    part = leapfrog(restrict(idx), z[idx], p[idx], lp[idx], g[idx], eta[idx], inv_sqrt_m)
    out = []
    for full, sub in zip(fill.astuple(), part.astuple(), strict=True):
        merged = full.clone()
        merged[idx] = sub
        out.append(merged)
    return _Proposal(*out)


def step_size_search(log_target: LogTarget, z: Tensor, p: Tensor, lp: Tensor, g: Tensor, eta0: Tensor,
                     log_a: Tensor, log_b: Tensor, inv_sqrt_m: Tensor, s: MALASettings,
                     restrict: Restrict | None = None) -> tuple[Tensor, _Proposal, Tensor]:
    """Per-chain search (docs/design.md §5.4): double η while the move is too easy, halve it while too hard,
    stop inside the band, at the bounds or on NaN. Returns (η, proposal at η, evaluations [C]).

    The band test uses −|log r| instead of log r: the reversed move has ratio 1/r, so a raw-r test
    would select a different η from (z', −p') for every r < 1 and the reversibility check would
    reject almost everything. −|log r| is the same from both ends (as in autoMALA/AutoStep)."""
    eta = eta0.clone()
    cur = leapfrog(log_target, z, p, lp, g, eta, inv_sqrt_m)
    crit = -cur.log_r.abs()
    direction = (crit >= log_b).long() - (crit <= log_a).long()  # NaN: both false, stop at once
    active = direction != 0
    best = cur
    evals = torch.ones_like(eta)
    for _ in range(s.max_search):
        if not bool(active.any()):
            break
        trial = torch.where(active, eta * s.factor ** direction.to(eta.dtype), eta)
        leaving = active & ((trial < s.eta_min) | (trial > s.eta_max))
        active = active & ~leaving  # stop at the last in-bound η (its proposal is `best`)
        eta = torch.where(active, trial, eta)
        if not bool(active.any()):
            break
        cur = _leapfrog_rows(log_target, restrict, z, p, lp, g, eta, inv_sqrt_m, active, best)
        evals = evals + active.to(evals.dtype)
        crit = -cur.log_r.abs()
        nan = torch.isnan(crit)
        growing, shrinking = active & (direction > 0), active & (direction < 0)
        # Growing chains stop once the move is no longer too easy (or NaN) and take one extra
        # halving back to the last η that was still too easy, whose proposal `best` holds.
        grow_done = growing & (nan | (crit < log_b))
        eta = torch.where(grow_done, eta / s.factor, eta)
        shrink_done = shrinking & (nan | (crit > log_a))
        best = cur.select((growing & ~grow_done) | shrinking, best)
        active = active & ~grow_done & ~shrink_done
    return eta, best, evals


def preconditioner(z: Tensor, gen: torch.Generator, first: bool, enabled: bool) -> Tensor:
    """M^{-1/2} (diagonal, over the latent axes) from the spread of the chains (docs/design.md §5.4).

    With Σ the per-coordinate variance across chains: the first iteration uses
    M^{1/2} = sqrt(β/Σ + 1 − β), β ~ U(0.5, 2/3); later ones M^{1/2} = ε Σ^{-1/2} + (1 − ε) with ε
    = 1, 0 or U(0,1), each with probability 1/3 (the reference's draw of the zero-one-inflated
    Beta). Both draws are taken every call so the noise stream does not depend on the branch."""
    draws = torch.rand(3, generator=gen, device=z.device, dtype=z.dtype)
    if not enabled or z.shape[0] < 2:
        return torch.ones_like(z[0])
    var = z.var(0).clamp_min(1e-12)
    if first:
        beta = 0.5 + draws[0] / 6.0
        return torch.rsqrt(beta / var + 1.0 - beta)
    choice = int(draws[1] * 3)
    eps = 1.0 if choice == 0 else 0.0 if choice == 1 else float(draws[2])
    return 1.0 / (eps * torch.rsqrt(var) + (1.0 - eps))


@dataclass
class MoveResult:
    proposal: _Proposal  # the proposal at the selected η (before the MH decision)
    eta: Tensor  # [C] η selected by the forward search
    reversible: Tensor  # [C] the search from (z', −p') picked the same η and led back to z
    accept: Tensor  # [C] reversible, finite and passed the MH test
    evals: Tensor  # [C] leapfrog evaluations (forward + reverse search)


def mala_move(log_target: LogTarget, z: Tensor, lp: Tensor, g: Tensor, p: Tensor, log_a: Tensor, log_b: Tensor,
              log_u: Tensor, eta_init: Tensor, inv_sqrt_m: Tensor, s: MALASettings,
              restrict: Restrict | None = None) -> MoveResult:
    """One adjusted autoMALA move from z with momentum p, thresholds (a, b) and MH uniform log_u."""
    eta, prop, ev_f = step_size_search(log_target, z, p, lp, g, eta_init, log_a, log_b, inv_sqrt_m, s, restrict)
    eta_r, back, ev_r = step_size_search(log_target, prop.z, -prop.p, prop.lp, prop.g, eta_init,
                                         log_a, log_b, inv_sqrt_m, s, restrict)
    scale = 1.0 + z.flatten(1).abs().amax(1)
    same_eta = (eta_r - eta).abs() <= s.reversibility_tol * eta
    same_z = (back.z - z).flatten(1).abs().amax(1) <= s.reversibility_tol * scale
    reversible = same_eta & same_z
    accept = reversible & (log_u < prop.log_r) & torch.isfinite(prop.log_r)
    return MoveResult(prop, eta, reversible, accept, ev_f + ev_r)


def mala(log_target: LogTarget, z0: Tensor, eta_init: Tensor, gen: torch.Generator, s: MALASettings,
         restrict: Restrict | None = None) -> MALAResult:
    """MALA (one leapfrog step per move) with the per-chain step-size search, reversibility check,
    MH correction, diagonal preconditioner and the η carry-over rule of docs/design.md §5.4. With ``restrict``
    the search's later rounds evaluate only the chains still searching (same chains, less work)."""
    z = z0.detach()
    C = z.shape[0]
    eta_init = eta_init.to(z).clamp(s.eta_min, s.eta_max)
    lp, g = value_and_grad(log_target, z)
    eta_sum = torch.zeros(C, device=z.device, dtype=z.dtype)
    n_acc = torch.zeros_like(eta_sum)
    n_adj, n_rev, n_evals = 0, 0.0, 0.0
    for i in range(s.langevin_steps):
        inv_sqrt_m = preconditioner(z, gen, first=i == 0, enabled=s.mala_precondition)
        p = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
        ab = torch.rand(2, C, generator=gen, device=z.device, dtype=z.dtype)
        log_u = torch.rand(C, generator=gen, device=z.device, dtype=z.dtype).log()
        if i < s.mala_unadjusted:  # plain leapfrog move at η_init, no test (non-finite moves undone)
            prop = leapfrog(log_target, z, p, lp, g, eta_init, inv_sqrt_m)
            accept = torch.isfinite(prop.lp) & torch.isfinite(_chain_sum(prop.z))
        else:
            mv = mala_move(log_target, z, lp, g, p, ab.min(0).values.log(), ab.max(0).values.log(), log_u,
                           eta_init, inv_sqrt_m, s, restrict)
            prop, accept = mv.proposal, mv.accept
            eta_sum += torch.where(accept, mv.eta, torch.zeros_like(mv.eta))
            n_acc += accept.to(n_acc.dtype)
            n_adj += 1
            n_rev += float(mv.reversible.float().mean())
            n_evals += float(mv.evals.mean())
        z = torch.where(_per_chain(accept, z), prop.z, z)
        lp = torch.where(accept, prop.lp, lp)
        g = torch.where(_per_chain(accept, g), prop.g, g)
    eta_mean = torch.where(n_acc > 0, eta_sum / n_acc.clamp_min(1), eta_init).clamp(s.eta_min, s.eta_max)
    rate = n_acc / max(n_adj, 1)
    eta_next = torch.where(rate > s.mala_target_accept, eta_mean * s.factor, eta_mean / s.factor)
    return MALAResult(
        z=z, eta_next=eta_next.clamp(s.eta_min, s.eta_max), eta_mean=eta_mean, accept_rate=rate,
        reversible_rate=n_rev / max(n_adj, 1), search_evals=n_evals / max(n_adj, 1),
    )


# ---- Population annealing / thermodynamic integration (docs/design.md §5.5) -----------------------------


def annealing_power(step: int, total: int, p_start: float, p_end: float, cycles: int = 0) -> float:
    """p(i) = p_start + (p_end − p_start)·½(1 − cos(π(2·cycles + 1)·i/I))."""
    frac = step / max(total, 1)
    return p_start + (p_end - p_start) * 0.5 * (1.0 - math.cos(math.pi * (2 * cycles + 1) * frac))


def temperatures(n_temps: int, power: float) -> Tensor:
    """The ladder t_k = (k/N_t)^p, k = 0..N_t (t_0 = 0: the prior, t_{N_t} = 1: the posterior)."""
    return (torch.arange(n_temps + 1, dtype=torch.float64) / n_temps).pow(power).float()


def swap_log_acceptance(ell_sums: Tensor, temps: Tensor, k: Tensor) -> Tensor:
    """log acceptance of exchanging the populations at t_k and t_{k+1} (indices into ``temps``):
    (t_{k+1} − t_k)·(Σ_b ℓ(z_k) − Σ_b ℓ(z_{k+1})). The prior terms cancel."""
    return (temps[k + 1] - temps[k]) * (ell_sums[k] - ell_sums[k + 1])


def global_swap(z: Tensor, ell_sums: Tensor, temps: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One global swap proposal between adjacent populations (docs/design.md §5.5).

    z[K, C, ...] holds one population per temperature temps[K]; ell_sums[K] = Σ_b ℓ per population.
    A pair (k, k+1) is drawn uniformly and whole populations exchange with probability
    min(1, exp(log acceptance)). Returns (z, pair index k, accepted) without data-dependent control
    flow: the exchange is a gather with a permutation."""
    K = z.shape[0]
    k = torch.randint(0, K - 1, (), generator=gen, device=z.device)
    log_u = torch.rand((), generator=gen, device=z.device).log()
    accepted = log_u < swap_log_acceptance(ell_sums, temps.to(ell_sums), k)
    perm = torch.arange(K, device=z.device)
    swapped = perm.clone()
    swapped[k], swapped[k + 1] = perm[k + 1], perm[k]
    perm = torch.where(accepted, swapped, perm)
    return z[perm], k, accepted


@dataclass
class AnnealResult:
    z: Tensor  # [K, C, ...] one population per temperature t_1..t_K
    swap_rate: float  # accepted / proposed global swaps


def anneal_populations(log_prior: LogTarget, log_lik: LogTarget, z0: Tensor, temps: Tensor, step_size: float,
                       n_steps: int, gen: torch.Generator, swap_lik: LogTarget | None = None,
                       swap_every: int = 1) -> AnnealResult:
    """ULA on one population per temperature (z0[K, C, ...], temps[K] = t_1..t_K) with a global swap
    proposal after every ``swap_every`` steps (0: never). ``log_prior``/``log_lik`` take the flattened chains
    [K·C, ...]; ``swap_lik`` (default ``log_lik``) scores populations for swaps (KAEM passes the
    likelihood with decoder noise, docs/design.md §5.5)."""
    K, C = z0.shape[:2]
    shape = z0.shape[2:]
    t_chain = temps.to(z0).repeat_interleave(C)

    def target(zf: Tensor) -> Tensor:
        return log_prior(zf) + t_chain * log_lik(zf)

    score = swap_lik or log_lik
    z = z0.detach().reshape(K * C, *shape)
    proposed, accepted = 0, 0
    for i in range(n_steps):
        z = ula_step(target, z, step_size, gen)
        if K > 1 and swap_every > 0 and (i + 1) % swap_every == 0:
            with torch.no_grad():
                ell = score(z).view(K, C).sum(1)
            zk, _, acc = global_swap(z.view(K, C, *shape), ell, temps, gen)
            z = zk.reshape(K * C, *shape)
            proposed += 1
            accepted += int(acc)
    return AnnealResult(z=z.view(K, C, *shape), swap_rate=accepted / max(proposed, 1))


def thermodynamic_integral(ell_means: Tensor, temps: Tensor, rule: str = "trapezoid") -> Tensor:
    """log p(x) ≈ ∫_0^1 E_{p_t(z|x)}[ℓ] dt from per-temperature means ell_means[k] at temps[k],
    k = 0..N_t (index 0: prior samples). Differentiable in ``ell_means``.

    "trapezoid" (default): Σ_k Δt_k ½(E_{k−1} + E_k). "reference": the reference code's
    Δt_1 E_0 + Σ_k Δt_k E_k, a right Riemann sum plus an extra Δt_1 E_0 (total weight 1 + Δt_1)."""
    t = temps.to(ell_means)
    dt = t[1:] - t[:-1]
    if rule == "trapezoid":
        return (dt * 0.5 * (ell_means[:-1] + ell_means[1:])).sum()
    if rule == "reference":
        return dt[0] * ell_means[0] + (dt * ell_means[1:]).sum()
    raise ValueError(f"unknown thermodynamic-integration rule {rule!r} (trapezoid | reference)")
