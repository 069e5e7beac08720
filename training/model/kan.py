"""KAN univariate functions (docs/design.md §2): RBF / Fourier / Chebyshev bases, the prior's bank of
independent energies f_{q,p}, the summed KAN layer of the decoder, and RBF grid refitting.

Every op is elementwise or an einsum, so the same modules export to ONNX unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# No subnormal floats by construction (x86 takes a many times slower path on subnormal inputs and results:
# docs/design.md §11.1), forward or backward, in torch and in every runtime. e^t is subnormal in float32 below
# t = -87.3; the floors leave room for the products with weights and gradients (e^-50 ≈ 2e-22 times
# anything above 1e-16 is still normal). What they change is below float32's resolution of any output.
EXP_FLOOR = -50.0
SILU_FLOOR = -40.0  # |silu(x)| < 2e-16 below it


class SiLU(nn.Module):
    """x·sigmoid(x), exactly 0 below SILU_FLOOR (where its value is < 2e-16 and heads for subnormals)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > SILU_FLOOR, x * torch.sigmoid(torch.clamp(x, min=SILU_FLOOR)), 0.0)


def base_activation(name: str) -> nn.Module:
    return {
        "silu": SiLU(),
        "leaky_relu": nn.LeakyReLU(0.2),
        "gelu": nn.GELU(),
        "none": _Zero(),
    }[name]


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _glorot_normal(*shape: int, fan_in: int, fan_out: int, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out))


class Basis(nn.Module):
    """Basis functions B_g(x) for a bank of univariate functions indexed by ``grid_shape``.

    ``forward(x)`` takes ``x[..., *grid_shape]`` and returns ``[..., *grid_shape, K]``. RBF keeps a
    grid (G+1 centres) per index, refitted from samples (docs/design.md §2.3); FFT and Chebyshev have none.
    """

    def __init__(self, kind: str, size: int, grid_shape: tuple[int, ...], domain: tuple[float, float]):
        super().__init__()
        self.kind, self.size = kind, size
        a, b = domain
        if kind == "rbf":
            self.n_basis = size + 1
            grid = torch.linspace(a, b, size + 1).expand(*grid_shape, size + 1).clone()
            self.register_buffer("grid", grid)
        elif kind == "fft":
            self.n_basis = 2 * (size + 1)
            self.register_buffer("freq", 2 * math.pi * torch.arange(size + 1, dtype=torch.float32))
        elif kind == "cheby":
            self.n_basis = size + 1
            self.register_buffer("degree", torch.arange(size + 1, dtype=torch.float32))
        else:
            raise ValueError(f"unknown basis {kind!r}")
        self.tau = nn.Parameter(torch.ones(()))  # trainable bandwidth / frequency scale

    def forward(self, x: Tensor, grid: Tensor | None = None) -> Tensor:
        """``grid`` (RBF only) replaces ``self.grid``: its first column when inputs are shared (forward_shared)."""
        x = x.unsqueeze(-1)
        if self.kind == "rbf":
            grid = self.grid if grid is None else grid
            scale = self._rbf_scale(grid)
            training = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
            if training and not torch.compiler.is_compiling():
                return _RBF.apply(x, grid, scale)
            # scale at the grid's shape: onnxruntime multiplies by a trailing axis of 1 ~3x slower (docs/design.md
            # §11.9); in torch the expand is a view, the product the same
            return _rbf_values(x, grid, scale.expand_as(grid))
        if self.kind == "fft":
            arg = x * (self.tau * self.freq)
            return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
        # Chebyshev: cos(k·arccos(tanh(x)/τ)); clamp keeps arccos defined when τ < 1.
        c = torch.clamp(torch.tanh(x) / self.tau, -1.0 + 1e-6, 1.0 - 1e-6)
        return torch.cos(self.degree * torch.acos(c))

    def forward_kmajor(self, x: Tensor) -> Tensor:
        """``self(x)`` for inputs x[..., I] with one grid per input, laid out [..., K, I] (basis k of input i at
        [..., k, i]): for the served graph (KANLayer.forward_kmajor). There h broadcasts over a middle axis of the
        grid instead of a trailing axis of 1, which onnxruntime's elementwise kernels run 10-25 % faster (docs/design.md
        §11.9); the RBF values are the same numbers, transposed."""
        if self.kind != "rbf":
            return self(x).transpose(-1, -2)
        return _rbf_values(x.unsqueeze(-2), self.grid.T, self._rbf_scale(self.grid).expand_as(self.grid).T)

    def values_(self, x: Tensor) -> Tensor:
        """``self(x)`` for a caller that records no autograd graph (no gradient, no torch.func transform): the RBF
        values are computed in place in the one buffer x − c (the expression allocates four of that size), the same
        numbers bit for bit. Other bases: ``self(x)``."""
        if self.kind != "rbf":
            return self(x)
        t = x.unsqueeze(-1) - self.grid
        return t.mul_(t).mul_(self._rbf_scale(self.grid)).clamp_(min=EXP_FLOOR).exp_()

    def _rbf_scale(self, grid: Tensor) -> Tensor:
        """exp(-½ ((x - c) / (h τ))²) = exp(scale · (x - c)²), with h the centre spacing per index."""
        h = (grid[..., -1:] - grid[..., :1]) / self.size
        return -0.5 / (h * self.tau).square()

    def weighted_sum(self, x: Tensor, a: Tensor) -> Tensor:
        """S[c, ..., k] = Σ_n a[n, c] B_k(x[n, ...]) for inputs x[N, *grid_shape] without gradient and weights a[N, C]:
        ``torch.einsum("nc,n...k->c...k", a, self(x))``, the RBF training path without keeping the basis values."""
        if self.kind == "rbf" and not torch.compiler.is_compiling():
            scale = self._rbf_scale(self.grid)
            if torch.is_grad_enabled() and scale.requires_grad:
                return _WeightedRBF.apply(x, self.grid, scale, a)
        b = self(x)
        return (a.T @ b.flatten(1)).view(a.shape[1], *b.shape[1:])

    @torch.no_grad()
    def adapted_grid(self, samples: Tensor, uniform_share: float = 0.05) -> Tensor:
        """New RBF grid from samples ``[N, *grid_shape]``: 0.05·uniform + 0.95·order statistics."""
        s, _ = torch.sort(samples, dim=0)
        n = s.shape[0]
        pos = torch.linspace(0, n - 1, self.size + 1, device=s.device).round().long()
        adaptive = s[pos].movedim(0, -1)  # [*grid_shape, G+1]
        lo, hi = s[0], s[-1]
        # Degenerate spread would make h = 0: widen to a minimum width around the centre.
        width = torch.clamp(hi - lo, min=1e-2)
        mid = 0.5 * (hi + lo)
        lo, hi = mid - 0.5 * width, mid + 0.5 * width
        steps = torch.linspace(0, 1, self.size + 1, device=s.device)
        uniform = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * steps
        # Strictly increasing (the uniform share is), so the least-squares refit stays well posed.
        return uniform_share * uniform + (1 - uniform_share) * adaptive


def _rbf_values(x: Tensor, grid: Tensor, scale: Tensor) -> Tensor:
    """exp(max(scale·(x − c)², EXP_FLOOR)) by broadcasting, the expression the graph exports. Exponents floored at
    EXP_FLOOR: far from a centre a basis value is e^-50 ≈ 2e-22 (normal, and so are its products with weights and
    gradients) instead of heading into subnormals."""
    diff = x - grid
    return torch.exp(torch.clamp(diff * diff * scale, min=EXP_FLOOR))


class _RBF(torch.autograd.Function):
    """e = exp(max(scale·(x − c)², EXP_FLOOR)) with hand-written derivatives, the training path of the RBF basis.

    Autograd's generic graph of the same expression keeps four [..., K] intermediates and makes about a dozen
    passes over them in the backward (the basis chain was ~20 % of an IS training step); this keeps e alone,
    recomputes x − c, and makes five. A floored exponent has zero derivative, as under ``torch.clamp``: e at
    the floor (within 1e-5) is masked. ``jvp`` and the generated vmap rule serve torch.func (health.py)."""

    generate_vmap_rule = True
    _FLOOR_VALUE = math.exp(EXP_FLOOR) * (1 + 1e-5)

    @staticmethod
    def forward(x: Tensor, grid: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        t = x - grid
        return t.mul_(t).mul_(scale).clamp_(min=EXP_FLOOR).exp_()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, grid, scale = inputs
        ctx.save_for_backward(x, grid, scale, output)
        ctx.save_for_forward(x, grid, scale, output)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, grid, scale, e = ctx.saved_tensors
        t = x - grid
        h = torch.mul(grad, e).masked_fill_(e <= _RBF._FLOOR_VALUE, 0.0).mul_(t)  # ∂e/∂(x−c) = 2·scale·h
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = h.sum(-1, keepdim=True).mul_(2 * scale).sum_to_size(x.shape)
        if ctx.needs_input_grad[2]:
            grad_scale = h.mul_(t).sum_to_size(scale.shape)
        if ctx.needs_input_grad[1]:
            raise RuntimeError("RBF centres are buffers; no gradient is defined for them")
        return grad_x, None, grad_scale

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dgrid: Tensor | None, dscale: Tensor | None) -> Tensor:  # type: ignore[override]
        x, grid, scale, e = ctx.saved_tensors
        t = x - grid
        d = torch.zeros_like(e)
        if dx is not None or dgrid is not None:
            dt = (dx if dx is not None else 0) - (dgrid if dgrid is not None else 0)
            d = d + 2 * scale * t * dt
        if dscale is not None:
            d = d + dscale * t * t
        return torch.where(e <= _RBF._FLOOR_VALUE, 0.0, e * d)


class _WeightedRBF(torch.autograd.Function):
    """S = Σ_n a[n, c]·e[n, ..., k] with e the RBF values of :class:`_RBF` (inputs x without gradient), and its
    derivative in ``scale`` (the trainable τ): de/dscale = (x − c)²·e, 0 where the exponent is floored. The
    weighted sums of e and of (x − c)²·e are taken in the forward as two [C, N]·[N, E·K] matmuls, so the backward
    is one product over [C, E, K] instead of re-walking the [N, E, K] values (Basis.weighted_sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, grid: Tensor, scale: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        t2 = x.unsqueeze(-1) - grid
        t2.mul_(t2)  # (x − c)², [N, *grid_shape, K]
        e = torch.mul(t2, scale).clamp_(min=EXP_FLOOR).exp_()
        at = a.T
        out_shape = (a.shape[1], *e.shape[1:])
        ctx.save_for_backward(at @ t2.mul_(e).masked_fill_(e <= _RBF._FLOOR_VALUE, 0.0).flatten(1))
        ctx.out_shape, ctx.scale_shape = out_shape, scale.shape
        return (at @ e.flatten(1)).view(out_shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (dscale,) = ctx.saved_tensors
        return None, None, (grad * dscale.view(ctx.out_shape)).sum(0).sum_to_size(ctx.scale_shape), None


class _SplineMatmul(torch.autograd.Function):
    """y = b @ W for basis values b[..., I·K] and W[i·K + k, o] = coef[i, o, k]·w_sp[i, o] (KANLayer.weight), the
    training path of a KAN layer. Autograd of the expression that builds W walks the [I, O, K] coefficients four
    times in the backward (a transposing copy, two products, a sum); here dW = bᵀ·grad is laid out once in coef's
    layout and read for both coef and w_sp. Interleaved A/B on the schema-1 IS step: 61.3 vs 62.1 and 66.1 vs
    67.4 ms; the fmnist preset's step, whose gradient decode is small, is unchanged (140.1 vs 139.8 ms)."""

    @staticmethod
    def forward(ctx, b: Tensor, coef: Tensor, w_sp: Tensor) -> Tensor:  # type: ignore[override]
        n_in, n_out, k = coef.shape
        w = (coef * w_sp.unsqueeze(-1)).transpose(1, 2).reshape(n_in * k, n_out)
        ctx.save_for_backward(b, coef, w_sp, w)
        return b @ w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        b, coef, w_sp, w = ctx.saved_tensors
        grad_b = grad_coef = grad_w_sp = None
        if ctx.needs_input_grad[0]:
            grad_b = grad @ w.T
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            n_in, n_out, k = coef.shape
            dw = b.reshape(-1, b.shape[-1]).T @ grad.reshape(-1, n_out)  # [I·K, O]
            dw = dw.view(n_in, k, n_out).transpose(1, 2).contiguous()  # [I, O, K], coef's layout
            if ctx.needs_input_grad[2]:
                grad_w_sp = torch.linalg.vecdot(dw, coef)
            if ctx.needs_input_grad[1]:
                grad_coef = dw.mul_(w_sp.unsqueeze(-1))
        return grad_b, grad_coef, grad_w_sp


def _ridge_solve(design: Tensor, target: Tensor, ridge: float) -> Tensor:
    """Batched least squares: min ||design·c - target||² + ridge·||c||², design [..., N, K]."""
    gram = design.transpose(-1, -2) @ design
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, design.transpose(-1, -2) @ target)


class _SplineFunctions(nn.Module):
    """What the prior's bank and the decoder's layer share: univariate functions φ(x) = w_base·b(x) +
    w_sp·Σ_g c_g B_g(x) indexed by ``shape``, a basis with one grid per index of ``grid_shape`` (the bank: a grid
    per function; a layer: a grid per input, shared by its outputs), and their initialisation (docs/design.md
    §2.2; the random draws in this order, so a seed gives the same weights as before the two shared it)."""

    def __init__(self, shape: tuple[int, ...], grid_shape: tuple[int, ...], basis: str, size: int,
                 domain: tuple[float, float], base_act: str, fan_in: int, fan_out: int, eps_scale: float,
                 gen: torch.Generator):
        super().__init__()
        self.basis = Basis(basis, size, grid_shape, domain)
        self.act = base_activation(base_act)
        self.use_base = basis != "cheby" and base_act != "none"
        glorot = _glorot_normal(*shape, fan_in=fan_in, fan_out=fan_out, gen=gen)
        scale = 1.0 / math.sqrt(fan_in) + (2 * torch.randn(*shape, generator=gen) - 1) / math.sqrt(fan_in)
        self.w_base = nn.Parameter(glorot * scale)
        self.w_sp = nn.Parameter(_glorot_normal(*shape, fan_in=fan_in, fan_out=fan_out, gen=gen))
        self.coef = nn.Parameter(_init_coef(self.basis, shape, fan_in, fan_out, eps_scale, gen))

    @torch.no_grad()
    def refit_grid(self, samples: Tensor, ridge: float = 1e-4) -> None:
        """RBF only: move the grids to the samples (docs/design.md §2.3) and refit the coefficients by ridge
        least squares so that every function keeps its spline values there. The layout-specific steps are
        :meth:`_spline_values` and :meth:`_solve_coef` (each in its own op order: refits set training's path)."""
        if self.basis.kind != "rbf":
            return
        old = self._spline_values(samples)
        self.basis.grid.copy_(self.basis.adapted_grid(samples))
        self.coef.copy_(self._solve_coef(self.basis(samples), old, ridge))

    def _spline_values(self, samples: Tensor) -> Tensor:
        raise NotImplementedError

    def _solve_coef(self, design: Tensor, old: Tensor, ridge: float) -> Tensor:
        raise NotImplementedError


class EnergyBank(_SplineFunctions):
    """Independent univariate functions φ_e(x) = w_base·b(x) + w_sp·Σ_g c_g B_g(x), e ∈ ``shape``.

    The prior uses shape ``(Q, P)``: ``forward(z[..., Q, P]) -> f[..., Q, P]`` with f_{q,p}
    evaluated at its own z_{q,p} (explicit [Q, P] tensors; never a reshape-as-transpose).
    """

    def __init__(self, shape: tuple[int, ...], basis: str, size: int, domain: tuple[float, float],
                 base_act: str, fan_in: int, fan_out: int, eps_scale: float, gen: torch.Generator):
        super().__init__(shape, shape, basis, size, domain, base_act, fan_in, fan_out, eps_scale, gen)

    def spline(self, x: Tensor) -> Tensor:
        return (self.basis(x) * self.coef).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.w_sp * self.spline(x)
        return out + self.w_base * self.act(x) if self.use_base else out

    def weighted_sum(self, x: Tensor, a: Tensor) -> Tensor:
        """Σ_n a[n, c] φ_e(x[n, e]) for inputs x[N, *shape] without gradient and weights a[N, C] -> [C, *shape].
        In value and parameter gradients ``torch.einsum("nc,n...->c...", a, self(x))``, but φ is linear in its
        coefficients, so the basis is summed over the samples first (Basis.weighted_sum) and nothing of size N·E·K
        is kept for the backward (the prior's terms of a loss)."""
        if x.requires_grad:
            return torch.einsum("nc,n...->c...", a, self(x))
        out = self.w_sp * (self.basis.weighted_sum(x, a) * self.coef).sum(-1)
        if self.use_base:
            out = out + self.w_base * (a.T @ self.act(x).flatten(1)).view_as(out)
        return out

    def shares_inputs(self) -> bool:
        """Whether every function of a row (the last axis of ``shape``) has the same basis: true for FFT and
        Chebyshev, and for RBF when the row's grids are equal (the mixture prior fits them to the same z_q)."""
        grid = getattr(self.basis, "grid", None)
        return grid is None or torch.equal(grid, grid[..., :1, :].expand_as(grid))

    def forward_shared(self, x: Tensor) -> Tensor:
        """``forward(x.unsqueeze(-1).expand(..., P))`` for a row-shared input x[..., Q] -> [..., Q, P], with one
        basis evaluation per row instead of per function (P times less elementwise work) and the sum over the
        basis as a batched matmul. Only valid when :meth:`shares_inputs`."""
        grid = getattr(self.basis, "grid", None)
        b = self.basis(x, None if grid is None else grid[..., 0, :])  # [..., Q, K]
        out = self.w_sp * torch.einsum("...qk,qpk->...qp", b, self.coef)
        return out + self.w_base * self.act(x).unsqueeze(-1) if self.use_base else out

    def _spline_values(self, samples: Tensor) -> Tensor:  # samples [N, *shape] -> [N, *shape]
        return self.spline(samples)

    def _solve_coef(self, design: Tensor, old: Tensor, ridge: float) -> Tensor:
        # one least-squares problem per function: design [*shape, N, K], targets [*shape, N, 1]
        return _ridge_solve(design.movedim(0, -2), old.movedim(0, -1).unsqueeze(-1), ridge).squeeze(-1)


def _init_coef(basis: Basis, coef_shape: tuple[int, ...], fan_in: int, fan_out: int, eps_scale: float,
               gen: torch.Generator) -> Tensor:
    """Spec §2.2: FFT ~ Glorot/(√I·m²); RBF = ridge fit of tiny noise U(-½,½)·ε/G at the grid points.

    ``coef_shape`` starts with the basis' grid shape (the bank: equal; a KAN layer: (I,) + (O,))."""
    if basis.kind == "fft":
        m = torch.arange(1, basis.size + 2, dtype=torch.float32)
        c = _glorot_normal(2, *coef_shape, basis.size + 1, fan_in=fan_in, fan_out=fan_out, gen=gen)
        c = c / (math.sqrt(fan_in) * m**2)
        return torch.cat([c[0], c[1]], dim=-1)
    if basis.kind == "cheby":
        return torch.randn(*coef_shape, basis.n_basis, generator=gen) / (fan_in * basis.n_basis)
    G = basis.size
    grid_shape = tuple(basis.grid.shape[:-1])
    extra = coef_shape[len(grid_shape):]
    n_rhs = math.prod(extra)
    noise = (torch.rand(*grid_shape, n_rhs, G + 1, generator=gen) - 0.5) * eps_scale / G
    design = basis(basis.grid.movedim(-1, 0)).movedim(0, -2)  # [*grid_shape, G+1 points, K]
    coef = _ridge_solve(design, noise.transpose(-1, -2), 1e-4)  # [*grid_shape, K, n_rhs]
    return coef.transpose(-1, -2).reshape(*coef_shape, basis.n_basis)


class KANLayer(_SplineFunctions):
    """A KAN layer y_o = Σ_i φ_{i,o}(x_i) with a grid per input i (decoder; docs/design.md §2)."""

    def __init__(self, n_in: int, n_out: int, basis: str, size: int, domain: tuple[float, float],
                 base_act: str, gen: torch.Generator, eps_scale: float = 1.0):
        super().__init__((n_in, n_out), (n_in,), basis, size, domain, base_act, n_in, n_out, eps_scale, gen)

    def weight(self, kmajor: bool = False) -> Tensor:
        """The spline part as one matrix [I·K, O]: (coef · w_sp) with row i·K + k, so that the layer is a
        single matmul of the flattened basis values; ``kmajor``: row k·I + i, the matrix of :meth:`forward_kmajor`."""
        n_in, n_out, k = self.coef.shape
        w = self.coef * self.w_sp.unsqueeze(-1)
        return (w.permute(2, 0, 1) if kmajor else w.transpose(1, 2)).reshape(n_in * k, n_out)

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """y_o = Σ_i φ_{i,o}(x_i); ``weight`` is a precomputed :meth:`weight` (a frozen decoder's, or the fp16
        served graph's: then the spline matmul alone runs in half precision, its result back in x's dtype)."""
        b = self.basis(x).flatten(-2)
        if (weight is None and torch.is_grad_enabled() and self.coef.requires_grad
                and self.w_sp.requires_grad and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            y = _SplineMatmul.apply(b, self.coef, self.w_sp)
        else:
            w = self.weight() if weight is None else weight
            y = (b.to(w.dtype) @ w).to(x.dtype)
        return y + self.act(x) @ self.w_base if self.use_base else y

    def forward_kmajor(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """``forward(x)`` with the basis laid out [..., K, I] (Basis.forward_kmajor) and ``weight`` =
        ``weight(kmajor=True)`` (built here when None), in its dtype like :meth:`forward` (the served graph's
        layers): the same sums, added in another order."""
        w = self.weight(kmajor=True) if weight is None else weight
        b = self.basis.forward_kmajor(x).flatten(-2)
        y = (b.to(w.dtype) @ w).to(x.dtype)
        return y + self.act(x) @ self.w_base if self.use_base else y

    def forward_(self, x: Tensor, weight: Tensor) -> Tensor:
        """``forward(x, weight)`` for a caller that records no autograd graph and passes a precomputed fp32
        :meth:`weight` (a frozen decoder's rows, KANDecoder.frozen): the basis in place (Basis.values_), the same
        numbers bit for bit."""
        y = self.basis.values_(x).flatten(-2) @ weight
        return y.add_(self.act(x) @ self.w_base) if self.use_base else y

    def _spline_values(self, samples: Tensor) -> Tensor:  # layer inputs [N, I] -> spline values [I, O, N]
        return torch.einsum("nik,iok->ion", self.basis(samples), self.coef)

    def _solve_coef(self, design: Tensor, old: Tensor, ridge: float) -> Tensor:
        # one problem per input i, its O functions as right-hand sides: design [I, N, K], targets [I, N, O]
        return _ridge_solve(design.permute(1, 0, 2), old.transpose(1, 2), ridge).transpose(1, 2)
