"""The KAEM energy prior: reference measures pi0, Gauss-Legendre quadrature on [a, b], CDF tables
and exact inverse-transform sampling (docs/design.md §1, §3, §4, §9), univariate (KART) and mixture.

Sampling finds the CDF cell of u (a binary search eagerly, a baked bucket table + a short window of
compares in the served graph: the same index), gathers and interpolates linearly; ``u`` comes in as a
tensor and nothing random happens inside, so eager, onnxruntime and Triton agree.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from training.config import PriorConfig
from training.errors import KaemError
from training.model.kan import EnergyBank
from training.uniforms import U_EPS, u_layout

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class PriorTableError(KaemError):
    """A CDF table that cannot be inverted: not non-decreasing from 0 to 1 (non-finite energies in a checkpoint)."""


def log_pi0(z: Tensor, kind: str, eps: float) -> Tensor:
    """log(pi0(z) + eps) for the reference measures of docs/design.md §3 (``ebm``: pi0 ≡ 1, log = 0).

    The same ε-floor is used for quadrature masses and for log-prior evaluations, so ITS and the
    losses agree even where Langevin moves z outside pi0's support."""
    if kind == "ebm":
        return torch.zeros_like(z)
    log_eps = math.log(eps)
    if kind == "uniform":
        inside = (z >= 0) & (z <= 1)
        return torch.where(inside, math.log1p(eps), log_eps) + 0 * z
    if kind == "gaussian":
        logpdf = -0.5 * z * z - _LOG_SQRT_2PI
    elif kind == "lognormal":
        # Exact LogNormal(0,1) log-density on z > 0 (the reference's new snapshot drops the square).
        pos = z > 0
        zs = torch.where(pos, z, torch.ones_like(z))
        lz = torch.log(zs)
        logpdf = torch.where(pos, -0.5 * lz * lz - lz - _LOG_SQRT_2PI, torch.full_like(z, -torch.inf))
    else:
        raise ValueError(f"unknown reference measure {kind!r}")
    return torch.logaddexp(logpdf, torch.full_like(z, log_eps))


def gauss_legendre(n: int, a: float, b: float) -> tuple[Tensor, Tensor]:
    """Nodes (ascending) and weights of n-point Gauss-Legendre on [a, b].

    Correct affine map x = (a+b)/2 + (b-a)/2·ξ, w = (b-a)/2·ω. (The reference writes
    ((a+b)/2 + (b-a)/2)·ξ = b·ξ, right only for symmetric domains: docs/design.md §9 bug 1.)"""
    xi, omega = np.polynomial.legendre.leggauss(n)
    x = 0.5 * (a + b) + 0.5 * (b - a) * xi
    w = 0.5 * (b - a) * omega
    return torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)


def knot_positions(nodes: Tensor, a: float, b: float, convention: str) -> Tensor:
    """N+1 knots t_0..t_N for the piecewise-linear inverse CDF (docs/design.md §4.2)."""
    if convention == "cell":  # each node's mass spread over its own cell [t_{k-1}, t_k]
        mids = 0.5 * (nodes[1:] + nodes[:-1])
        return torch.cat([nodes.new_tensor([a]), mids, nodes.new_tensor([b])])
    # reference: knot j at node x_{j+1}, last knot repeats x_N
    return torch.cat([nodes, nodes[-1:]])


def sanitize_u(u: Tensor) -> Tensor:
    """Replace NaN by 0.5 (clamp alone passes NaN through), then clamp into [U_EPS, 1 - U_EPS]."""
    u = torch.where(torch.isnan(u), 0.5, u)  # a scalar fill: no Expand node in the graph
    return torch.clamp(u, U_EPS, 1.0 - U_EPS)


def normal_icdf(u: Tensor) -> Tensor:
    """Φ⁻¹(u) elementwise, u sanitised first (NaN → 0.5, clamped into (0, 1))."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * sanitize_u(u) - 1.0)


def normal_cdf(eps: Tensor) -> Tensor:
    """Φ(ε) elementwise."""
    return 0.5 * (1.0 + torch.erf(eps / math.sqrt(2.0)))


def fold_shifts(Q: int, P: int) -> Tensor:
    """Shifts c_{q,p} = frac(q·α_p) with α_p = frac((p + 1)·φ⁻¹) of the "folded" layout: every p turns
    at its own golden-ratio frequency over q (the theorem's shifted inner functions, ψ(u_p + q·a), with a
    per-p a). A shift additive in q and p would turn all p by the same phase and leave h two-dimensional."""
    alpha = torch.frac(torch.arange(1, P + 1, dtype=torch.float64) * ((math.sqrt(5.0) - 1.0) / 2.0))
    q = torch.arange(Q, dtype=torch.float64).unsqueeze(1)
    return torch.frac(q * alpha).to(torch.float32)


def tent_fold(v: Tensor) -> Tensor:
    """1 − |2·frac(v) − 1|: continuous, 1-periodic, and maps U(0, 1) onto U(0, 1), so z_{q,p} =
    F⁻¹_{q,p}(fold(u_p + c_{q,p})) is still an exact draw from π_{q,p} (a plain frac(u + c) would jump)."""
    return 1.0 - torch.abs(2.0 * (v - torch.floor(v)) - 1.0)


def count_below(table: Tensor, value: Tensor) -> Tensor:
    """#{j : table_j < value} over the last axis, as int64. Summed in float32 then cast: the int64
    sum runs ~5x slower in onnxruntime with identical output (docs/design.md §11.2)."""
    return (table < value.unsqueeze(-1)).to(torch.float32).sum(-1).to(torch.int64)


def _bucket(cdf: Tensor, u: Tensor) -> Tensor:
    """#{j : C_j < u} per value, by binary search: searchsorted's left side counts the entries strictly
    below u in the non-decreasing rows, the same index as compare-and-count over the row and as
    :class:`BucketLookup` (the served graph's; searchsorted has no ONNX export, docs/design.md §11.3)."""
    if cdf.dim() == u.dim() + 1 and cdf.shape[:-1] == u.shape:  # one row per value
        return torch.searchsorted(cdf.contiguous(), u.unsqueeze(-1).contiguous()).squeeze(-1)
    if cdf.dim() == u.dim() and cdf.shape[:-1] == u.shape[1:]:  # rows shared over the batch
        return torch.searchsorted(cdf.contiguous(), u.movedim(0, -1).contiguous()).movedim(-1, 0)
    return count_below(cdf, u)


def inverse_cdf(cdf: Tensor, knots: Tensor, u: Tensor) -> Tensor:
    """Invert normalised CDF rows ``cdf[..., N+1]`` (broadcastable to ``u[..., None]``) at ``u``.

    k = #{j : C_j < u} clamped to 1..N, gather (C, t) at k-1 and k, interpolate linearly;
    a zero-mass cell returns its left knot."""
    n = cdf.shape[-1] - 1
    k = torch.clamp(_bucket(cdf, u), 1, n)
    full = cdf.expand(*u.shape, n + 1)
    c_lo = torch.gather(full, -1, (k - 1).unsqueeze(-1)).squeeze(-1)
    c_hi = torch.gather(full, -1, k.unsqueeze(-1)).squeeze(-1)
    return _interpolate(c_lo, c_hi, knots[k - 1], knots[k], u)


def inverse_cdf_rows(table: Tensor, knots: Tensor, row: Tensor, u: Tensor) -> Tensor:
    """``inverse_cdf(table[row], knots, u)`` without materialising the gathered rows (eager only).

    One binary search over all rows at once: row r is shifted by 2r (its values lie in [0, 1]), so in
    float64, where float32 CDF values plus small integers are exact, #{entries < u + 2r} =
    r·(N+1) + #{j : C_rj < u}, the same index as compare-and-count on that row."""
    n = table.shape[-1] - 1
    offset = 2.0 * torch.arange(table.shape[0], device=table.device, dtype=torch.float64)
    flat = (table.double() + offset.unsqueeze(-1)).flatten()
    pos = torch.searchsorted(flat, (u.double() + 2.0 * row).flatten()).view(u.shape)
    k = torch.clamp(pos - row * (n + 1), 1, n)
    base = row * (n + 1)
    table_flat = table.flatten()
    return _interpolate(table_flat[base + k - 1], table_flat[base + k], knots[k - 1], knots[k], u)


class BucketLookup(nn.Module):
    """Inverse-transform lookup in O(1) per coordinate on a fixed CDF table (the served graph's prior).

    u ∈ [m/M, (m+1)/M) lies in bucket m (M a power of two, so ``floor(u·M)`` is exact in float32 in every
    runtime). With start = #{j : C_rj < m/M} (bucket 0 from U_EPS, the least sanitised u) and rows
    non-decreasing, #{j : C_rj < u} = start + #{i < W : C_r,start+i < u} whenever no bucket holds more
    than W table values: a fixed window of W compares gives exactly the index of the binary search (and of
    compare-and-count over the whole row). One record per (row, bucket) holds what the inversion reads,
    so the graph gathers one row per coordinate: [-(start + 1), C_start-1, C_start, ..., C_start+W] (W + 3
    floats, exact in float32). Counted against u, the record gives start's slot and C_start-1 (both always
    below u: negative, and below the bucket's lower edge or C_0 = 0), the window, and C_start+W (never below
    u: at or past the bucket's upper edge, or C_N = 1): count = #{record < u} − 2 with no slicing, and
    C_k-1, C_k sit at record slots count + 1 and count + 2. M is the least power of two ≥ 16 with W ≤
    ``max_window`` (capped at ``max_buckets``, where W is whatever that M needs: still exact)."""

    def __init__(self, cdf: Tensor, knots: Tensor, max_window: int = 12, max_buckets: int = 4096):
        super().__init__()
        # (t_k-1, t_k) at row k − 1: both knots of a cell in one gather
        self.register_buffer("knot_pairs", torch.stack([knots[:-1], knots[1:]], -1).detach().float().contiguous())
        rows = cdf.detach().reshape(-1, cdf.shape[-1]).float().contiguous()  # [R, N+1]
        if not (bool((rows[:, 0] < U_EPS).all()) and bool((rows[:, -1] >= 1.0 - U_EPS).all())
                and bool((rows[:, 1:] >= rows[:, :-1]).all())):
            # what makes C_k-1 < u <= C_k for every sanitised u, which the inversion relies on (_interpolate_inside)
            raise PriorTableError("the prior's CDF table is not a CDF (rows must rise from below U_EPS to at least "
                                  "1 - U_EPS): are the checkpoint's energies finite?")
        self.n_cols = rows.shape[1]
        m = 16
        while True:
            start = self._starts(rows, m)  # [R, M+1]
            window = max(1, int((start[:, 1:] - start[:, :-1]).max()))
            if window <= max_window or m >= max_buckets:
                break
            m *= 2
        self.n_buckets = m
        start = start[:, :-1]  # [R, M]
        # C at start-1 .. start+W, clamped into the row: C_{-1} is never read (k >= 1), past the end C_N = 1 > u
        cols = torch.clamp(start.unsqueeze(-1) + torch.arange(-1, window + 1, device=rows.device), 0, self.n_cols - 1)
        values = torch.gather(rows.unsqueeze(1).expand(-1, m, -1), -1, cols)
        self.register_buffer("records", torch.cat([-(start.unsqueeze(-1).float() + 1), values], -1).flatten(0, 1))

    @staticmethod
    def _starts(rows: Tensor, m: int) -> Tensor:
        edges = torch.arange(m + 1, dtype=torch.float32, device=rows.device) / m
        edges[0] = U_EPS
        return torch.searchsorted(rows, edges.expand(rows.shape[0], -1).contiguous())  # #{j : C_j < edge}

    @property
    def window(self) -> int:
        return self.records.shape[1] - 3

    def _locate(self, row: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(the records, which of their values lie below u) for sanitised ``u`` and table rows ``row`` (any dtype)
        broadcastable to it. row·M + bucket is formed in floating point, exact for integers below 2^24 (float64
        past that), and cast to int64 once for the gather: onnxruntime's int64 arithmetic is slow (§11.9)."""
        dtype = torch.float32 if self.records.shape[0] < (1 << 24) else torch.float64
        m = torch.clamp(torch.floor(u * self.n_buckets), 0, self.n_buckets - 1).to(dtype)
        flat = (row.to(dtype) * self.n_buckets + m).expand(u.shape).reshape(-1).to(torch.int64)
        rec = torch.index_select(self.records, 0, flat).view(*u.shape, self.records.shape[1])
        return rec, rec < u.unsqueeze(-1)

    @staticmethod
    def _k(rec: Tensor, count: Tensor, minus: int = 0) -> Tensor:
        """k − ``minus``, with k = start + #{record < u} − 2 = count − rec_0 − 3, in rec's dtype (exact). rec_0 =
        −(start + 1) is the record's least value: in the graph a min over the record reads it (onnxruntime gathers
        one column slowly, torch the other way round); the same number either way."""
        rec0 = rec.amin(-1) if torch.onnx.is_in_onnx_export() else rec[..., 0]
        return count - rec0 - (3 + minus)

    def count(self, row: Tensor, u: Tensor) -> Tensor:
        """#{j : C_row,j < u} for sanitised ``u`` and row indices ``row`` broadcastable to it, int64."""
        rec, below = self._locate(row, u)
        return self._k(rec, below.to(rec.dtype).sum(-1)).to(torch.int64)

    def invert(self, row: Tensor, u: Tensor) -> Tensor:
        """F⁻¹ of table row ``row`` at ``u``: the same k, table values and interpolation as :func:`inverse_cdf`
        (k = start + #{record < u} − 2 lies in 1..N for sanitised u): C_k-1 and C_k are record slots
        #{record < u} − 1 and #{record < u}, gathered as a pair, and t_k-1 and t_k come as a pair from the knot
        pairs, row k − 1. Indices are formed in float (exact) and cast once per gather."""
        rec, below = self._locate(row, u)
        count = below.to(rec.dtype).sum(-1)
        k_1 = torch.clamp(self._k(rec, count, minus=1), 0, self.n_cols - 2)
        # stacked, not count[..., None] + [-1, 0]: onnxruntime's broadcasting ops over a trailing axis of 1 are slow
        c = torch.gather(rec, -1, torch.stack([count - 1, count], -1).to(torch.int64))
        t = torch.index_select(self.knot_pairs, 0, k_1.reshape(-1).to(torch.int64)).view(*k_1.shape, 2)
        return _interpolate_inside(c[..., 0], c[..., 1], t[..., 0], t[..., 1], u)


def _interpolate(c_lo: Tensor, c_hi: Tensor, t_lo: Tensor, t_hi: Tensor, u: Tensor) -> Tensor:
    """Linear interpolation inside the CDF cell [c_lo, c_hi] → [t_lo, t_hi]; a zero-mass cell returns t_lo."""
    denom = c_hi - c_lo
    ok = denom > 0
    frac = torch.where(ok, (u - c_lo) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(u))
    return t_lo + (t_hi - t_lo) * torch.clamp(frac, 0.0, 1.0)


def _interpolate_inside(c_lo: Tensor, c_hi: Tensor, t_lo: Tensor, t_hi: Tensor, u: Tensor) -> Tensor:
    """:func:`_interpolate` where the index is exact and u sanitised, so c_lo < u ≤ c_hi: there its guards never act
    and are left out (seven fewer graph nodes, the same numbers). c_hi − c_lo is positive and a normal float (two
    distinct floats with c_hi ≥ u ≥ U_EPS differ by at least half an ulp of c_hi), and 0 < u − c_lo ≤ c_hi − c_lo
    survives rounding (it is monotone), so the fraction already lies in (0, 1]."""
    return t_lo + (t_hi - t_lo) * ((u - c_lo) / (c_hi - c_lo))


class EnergyPrior(nn.Module):
    """pi_{q,p}(z) = exp(f_{q,p}(z)) pi0(z) / Z_{q,p} with Q·P independent energies f (docs/design.md §1)."""

    def __init__(self, cfg: PriorConfig, gen: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.kind, self.P, self.Q = cfg.kind, cfg.P, cfg.Q
        a, b = cfg.domain
        # In the mixture case each latent q has P components: inputs Q, outputs P (docs/design.md §2).
        fan_in, fan_out = (cfg.Q, cfg.P) if cfg.kind == "mixture" else (cfg.P, cfg.Q)
        self.f = EnergyBank((cfg.Q, cfg.P), cfg.basis, cfg.grid_size, (a, b), cfg.base_act,
                            fan_in, fan_out, cfg.init_eps_scale, gen)
        self.register_buffer("nodes", torch.empty(cfg.n_quad))
        self.register_buffer("log_w", torch.empty(cfg.n_quad))
        self.register_buffer("knots", torch.empty(cfg.n_quad + 1))
        self.register_buffer("domain", torch.tensor([a, b], dtype=torch.float32))
        self.set_domain(a, b)
        if cfg.kind == "folded":  # per-(q, p) shifts of the inner inputs; a constant, rebuilt from the config
            self.register_buffer("fold_shift", fold_shifts(cfg.Q, cfg.P), persistent=False)
        # Mixture proportions α = 1/P, not trained in any shipped config (docs/design.md §1.2).
        log_alpha = torch.full((cfg.Q, cfg.P), -math.log(cfg.P))
        self.register_buffer("log_alpha", log_alpha)
        self.register_buffer("cum_alpha", torch.cumsum(log_alpha.exp(), dim=-1))

    @property
    def u_dim(self) -> int:
        return u_layout(self.kind, self.P, self.Q)[0]

    @property
    def its_dim(self) -> int:
        """Columns of ``u`` that are inverted (the last ones; before them, the mixture's selection uniforms)."""
        d, start = u_layout(self.kind, self.P, self.Q)
        return d - start

    @torch.no_grad()
    def set_domain(self, a: float, b: float) -> None:
        """(Re)build quadrature nodes, weights and knots on [a, b] (recomputed after any update)."""
        x, w = gauss_legendre(self.cfg.n_quad, a, b)
        dev = self.nodes.device
        self.nodes.copy_(x.to(dev))
        self.log_w.copy_(w.log().to(dev))
        self.knots.copy_(knot_positions(x, a, b, self.cfg.knots).to(dev))
        self.domain.copy_(torch.tensor([a, b], dtype=torch.float32, device=dev))

    def log_pi0(self, z: Tensor) -> Tensor:
        return log_pi0(z, self.cfg.pi0, self.cfg.eps)

    def _energy(self, z: Tensor) -> Tensor:
        """f_{q,p}(z_q) for every component p of a mixture latent z[..., Q] -> [..., Q, P]."""
        if self.f.shares_inputs():
            return self.f.forward_shared(z)
        return self.f(z.unsqueeze(-1).expand(*z.shape, self.P))

    def log_masses(self) -> Tensor:
        """log m_{q,p,k} = log w_k + f_{q,p}(x_k) + log pi0(x_k), shape [Q, P, N] (differentiable)."""
        if self.kind == "mixture":  # every component of latent q is evaluated at the same nodes
            x = self.nodes.view(-1, 1).expand(-1, self.Q)
            logm = self.log_w.view(-1, 1, 1) + self._energy(x) + self.log_pi0(self.nodes).view(-1, 1, 1)
        else:
            x = self.nodes.view(-1, 1, 1).expand(-1, self.Q, self.P)
            logm = self.log_w.view(-1, 1, 1) + self.f(x) + self.log_pi0(x)
        return logm.permute(1, 2, 0)

    def log_normalizer(self) -> Tensor:
        """Quadrature log Z_{q,p}, shape [Q, P], differentiable in f."""
        return torch.logsumexp(self.log_masses(), dim=-1)

    def tables(self, with_log_z: bool) -> tuple[Tensor, Tensor | None]:
        """One evaluation of the energies on the nodes per training step: (the CDF table, without gradient;
        the differentiable log Z [Q, P] when ``with_log_z``, else None)."""
        if not with_log_z:
            return self.cdf_table(), None
        logm = self.log_masses()
        with torch.no_grad():
            cdf = self._cdf_of(logm.detach())
        return cdf, torch.logsumexp(logm, dim=-1)

    @torch.no_grad()
    def cdf_table(self) -> Tensor:
        """Normalised CDF at the knots, [Q, P, N+1] with C_0 = 0 and C_N = 1 (log-space, docs/design.md §9)."""
        return self._cdf_of(self.log_masses())

    @staticmethod
    def _cdf_of(logm: Tensor) -> Tensor:
        logm = logm.float()
        m = torch.exp(logm - logm.amax(dim=-1, keepdim=True))
        c = torch.cumsum(m, dim=-1)
        c = c / c[..., -1:]
        return torch.cat([torch.zeros_like(c[..., :1]), c], dim=-1)

    def sample(self, u: Tensor, cdf: Tensor | None = None, lookup: BucketLookup | None = None) -> Tensor:
        """Exact ITS samples from uniforms ``u[B, D]``: univariate z[B, Q, P] (u_p shared over q),
        mixture z[B, Q]. ``cdf`` is a precomputed table; ``lookup`` a :class:`BucketLookup` of it (the
        served graph: O(1) per coordinate, the same index as the binary search used otherwise)."""
        if cdf is None and lookup is None:
            with torch.no_grad():
                cdf = self.cdf_table()
        u = sanitize_u(u)
        if self.kind == "mixture":
            v, w = u[:, : self.Q], u[:, self.Q :]
            # Component p* = #{p : cumsum(α_q)_p < v} (compare-and-count), then invert its CDF row. Counted over a
            # middle axis ([B, P, Q]: onnxruntime broadcasts v over a trailing axis of 1 ~3x slower) and kept in
            # float32, exact, as is the row index, which the lookup takes as it is (docs/design.md §11.9).
            p_star = torch.clamp((v.unsqueeze(-2) > self.cum_alpha.T).to(torch.float32).sum(-2), 0, self.P - 1)
            row = torch.arange(self.Q, device=u.device, dtype=torch.float32) * self.P + p_star
            if lookup is not None:
                return lookup.invert(row, w)
            return inverse_cdf_rows(cdf.reshape(self.Q * self.P, -1), self.knots, row.to(torch.int64), w)
        if self.kind == "univariate":
            u = u.unsqueeze(1).expand(-1, self.Q, -1)
        elif self.kind == "folded":
            u = sanitize_u(tent_fold(u.unsqueeze(1) + self.fold_shift))
        else:  # independent
            u = u.view(-1, self.Q, self.P)
        if lookup is not None:
            return lookup.invert(torch.arange(self.Q * self.P, device=u.device).view(self.Q, self.P), u)
        return inverse_cdf(cdf, self.knots, u)

    def latent(self, z: Tensor) -> Tensor:
        """Decoder input h[B, Q]: h_q = Σ_p z_{q,p} (KART layouts) or z_q itself (mixture)."""
        return z if self.kind == "mixture" else z.sum(-1)

    def log_prob(self, z: Tensor, normalized: bool = False, log_z: Tensor | None = None) -> Tensor:
        """log pi(z) per sample, [B]. Univariate: Σ_{q,p} f + log pi0 (− log Z when normalised).

        The mixture is always normalised with the differentiable quadrature log Z and logsumexp
        over components (docs/design.md §9: the reference's Z = 1 shortcut is only right for equal masses).
        ``log_z`` [Q, P] reuses a precomputed log Z (Langevin loops: it does not depend on z)."""
        if self.kind != "mixture":
            lp = self.f(z) + self.log_pi0(z)
            if normalized:
                lp = lp - (self.log_normalizer() if log_z is None else log_z)
            return lp.sum(dim=(-1, -2))
        comp = self.log_alpha + self._energy(z) - (self.log_normalizer() if log_z is None else log_z)
        return (torch.logsumexp(comp, dim=-1) + self.log_pi0(z)).sum(-1)

    def log_prob_sums(self, z: Tensor, a: Tensor, normalized: bool = False, log_z: Tensor | None = None) -> Tensor:
        """Σ_n a[n, c] log pi(z_n) for weights a[N, C] -> [C]: :meth:`log_prob` weighted and summed over the samples,
        with the same value and gradients. For the KART layouts and draws without gradient (a loss's prior terms) the
        energies are summed through EnergyBank.weighted_sum, which never keeps the [N, Q, P, K] basis values."""
        if self.kind == "mixture" or z.requires_grad:
            return a.T @ self.log_prob(z, normalized, log_z)
        lp = self.f.weighted_sum(z, a).sum((-1, -2)) + a.T @ self.log_pi0(z).sum((-1, -2))
        if normalized:
            lp = lp - a.sum(0) * (self.log_normalizer() if log_z is None else log_z).sum()
        return lp

    def density_on_nodes(self) -> tuple[Tensor, Tensor, Tensor]:
        """(nodes[N], pi[Q, P, N], pi0[N]) normalised with the quadrature weights (for plots)."""
        with torch.no_grad():
            logm = self.log_masses()
            log_z = torch.logsumexp(logm, dim=-1, keepdim=True)
            dens = torch.exp(logm - log_z - self.log_w)
            lp0 = self.log_pi0(self.nodes) + self.log_w
            pi0 = torch.exp(lp0 - torch.logsumexp(lp0, 0) - self.log_w)
        return self.nodes, dens, pi0

    @torch.no_grad()
    def refit_grid(self, z: Tensor) -> None:
        """Refit the RBF grids of the energies from prior/posterior samples z (docs/design.md §2.3)."""
        zz = z if self.kind != "mixture" else z.unsqueeze(-1).expand(*z.shape, self.P)
        self.f.refit_grid(zz.reshape(-1, self.Q, self.P))
