"""KAN univariate functions (docs/design.md §2): basis shapes and formulas, the per-edge definition of a KAN
layer, and RBF grid refits that move the grid to the samples while keeping the function values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.model.kan import _RBF, EXP_FLOOR, Basis, EnergyBank, KANLayer

BASES = ("rbf", "fft", "cheby")


def _n_basis(kind: str, G: int) -> int:
    return 2 * (G + 1) if kind == "fft" else G + 1


def _basis_by_hand(kind: str, x: float, G: int, tau: float, grid: list[float] | None) -> list[float]:
    """B_g(x) from the spec's formulas (§2.1), one scalar at a time."""
    if kind == "rbf":
        h = (grid[-1] - grid[0]) / G
        return [math.exp(-0.5 * ((x - c) / (h * tau)) ** 2) for c in grid]
    if kind == "fft":
        return [math.cos(2 * math.pi * tau * k * x) for k in range(G + 1)] + \
               [math.sin(2 * math.pi * tau * k * x) for k in range(G + 1)]
    y = min(max(math.tanh(x) / tau, -1 + 1e-6), 1 - 1e-6)
    return [math.cos(k * math.acos(y)) for k in range(G + 1)]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim == 0 else 1.0) + (1.0 if p.ndim == 0 else 0.0))


def _rbf_by_autograd(x: torch.Tensor, grid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = x - grid
    return torch.exp(torch.clamp(d * d * scale, min=EXP_FLOOR))


def test_rbf_training_path_has_the_derivatives_of_the_plain_expression() -> None:
    """The RBF basis's hand-written backward and forward-mode rule equal autograd's on the same expression,
    near the centres (gradcheck in float64) and far outside the grid, where the floored exponent has zero
    derivative; the module takes that path exactly when gradients are being recorded."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-2, 2, 6, dtype=torch.float64).expand(5, 6).clone()
    x = (3 * torch.randn(7, 5, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    scale = (-0.5 - 3 * torch.rand(5, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    f = lambda a, b: _RBF.apply(a, grid, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, scale))
    assert torch.autograd.gradcheck(f, (x, scale), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)
    far = torch.tensor([[[50.0], [0.1], [-1e3], [0.0], [2.0]]], dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(_RBF.apply(far, grid, scale).sum(), (far, scale))
    plain = torch.autograd.grad(_rbf_by_autograd(far, grid, scale).sum(), (far, scale))
    assert ours[0][0, 0, 0] == 0 and ours[0][0, 2, 0] == 0  # every centre floored: no gradient at all
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b)
    basis = Basis("rbf", 5, (5,), (-2.0, 2.0))
    xs = torch.randn(4, 5, generator=gen)
    assert basis(xs.requires_grad_()).grad_fn.name() == "_RBFBackward"
    with torch.no_grad():
        assert basis(xs).grad_fn is None
    h = (basis.grid[:, -1:] - basis.grid[:, :1]) / 5
    torch.testing.assert_close(basis(xs), _rbf_by_autograd(xs.unsqueeze(-1), basis.grid, -0.5 / h.square()))


@pytest.mark.parametrize("kind", BASES)
def test_basis_shapes(kind: str) -> None:
    G = 5
    basis = Basis(kind, G, (2, 3), (-1.2, 1.2))
    assert basis.n_basis == _n_basis(kind, G)
    out = basis(torch.randn(4, 2, 3))
    assert out.shape == (4, 2, 3, basis.n_basis)
    assert basis(torch.randn(7, 6, 2, 3)).shape == (7, 6, 2, 3, basis.n_basis)
    assert torch.isfinite(out).all()
    if kind == "rbf":
        assert basis.grid.shape == (2, 3, G + 1)
        torch.testing.assert_close(basis.grid[1, 2], torch.linspace(-1.2, 1.2, G + 1))


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_basis_values_match_formula(kind: str, tau: float) -> None:
    G = 4
    basis = Basis(kind, G, (3,), (-1.0, 2.0))
    with torch.no_grad():
        basis.tau.fill_(tau)
    x = torch.tensor([[-0.9, 0.1, 1.7], [0.0, 3.0, -2.5]])
    with torch.no_grad():
        out = basis(x).double()
    for r in range(2):
        for i in range(3):
            grid = basis.grid[i].tolist() if kind == "rbf" else None
            want = _basis_by_hand(kind, float(x[r, i]), G, tau, grid)
            np.testing.assert_allclose(out[r, i].numpy(), want, atol=2e-5)


def test_chebyshev_is_t_k_of_tanh() -> None:
    basis = Basis("cheby", 6, (1,), (-1.0, 1.0))
    x = torch.linspace(-3, 3, 61).view(-1, 1)
    t = np.tanh(x.double().numpy()[:, 0])
    want = np.stack([np.polynomial.chebyshev.chebval(t, np.eye(7)[k]) for k in range(7)], -1)
    np.testing.assert_allclose(basis(x)[:, 0].detach().double().numpy(), want, atol=5e-5)


@pytest.mark.parametrize("tau", [0.9, 0.5, 0.1])
def test_chebyshev_finite_for_tau_below_one(tau: float) -> None:
    # tanh(x)/τ leaves [-1, 1] when τ < 1: arccos would give NaN without the clamp.
    basis = Basis("cheby", 8, (2,), (-1.0, 1.0))
    with torch.no_grad():
        basis.tau.fill_(tau)
    x = torch.linspace(-20, 20, 401).view(-1, 1).expand(-1, 2).clone().requires_grad_(True)
    out = basis(x)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-6
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(basis.tau.grad)


@pytest.mark.parametrize("kind", BASES)
def test_kan_layer_equals_explicit_per_edge_sum(kind: str) -> None:
    n_in, n_out, G = 3, 2, 4
    layer = KANLayer(n_in, n_out, kind, G, (-1.5, 1.0), "silu", torch.Generator().manual_seed(0))
    _randomise(layer, 1)
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x).double()
    tau = float(layer.basis.tau.detach())
    for b in range(5):
        for o in range(n_out):
            total = 0.0
            for i in range(n_in):
                xi = float(x[b, i])
                grid = layer.basis.grid[i].tolist() if kind == "rbf" else None
                basis = _basis_by_hand(kind, xi, G, tau, grid)
                spline = sum(c * B for c, B in zip(layer.coef[i, o].tolist(), basis, strict=True))
                phi = layer.w_sp[i, o].item() * spline
                if kind != "cheby":  # Chebyshev has no base term (docs/design.md §2.1)
                    phi += layer.w_base[i, o].item() * xi / (1 + math.exp(-xi))
                total += phi
            assert float(y[b, o]) == pytest.approx(total, rel=1e-4, abs=1e-4), (b, o)


@pytest.mark.parametrize("kind", BASES)
def test_energy_bank_is_elementwise(kind: str) -> None:
    # f_{q,p} is evaluated at its own z_{q,p}: perturbing one input changes exactly one output.
    bank = EnergyBank((2, 3), kind, 5, (-1.2, 1.2), "leaky_relu", 3, 2, 1.0, torch.Generator().manual_seed(0))
    _randomise(bank, 3)
    z = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = bank(z)
        z2 = z.clone()
        z2[1, 0, 2] += 0.3
        changed = (bank(z2) != f)
    assert f.shape == (4, 2, 3)
    assert changed.sum() == 1 and changed[1, 0, 2]
    # And it equals the scalar formula with LeakyReLU(0.2) as base.
    tau = float(bank.basis.tau.detach())
    for q in range(2):
        for p in range(3):
            zz = float(z[0, q, p])
            grid = bank.basis.grid[q, p].tolist() if kind == "rbf" else None
            basis = _basis_by_hand(kind, zz, 5, tau, grid)
            spline = sum(c * B for c, B in zip(bank.coef[q, p].tolist(), basis, strict=True))
            want = bank.w_sp[q, p].item() * spline
            if kind != "cheby":
                want += bank.w_base[q, p].item() * (zz if zz > 0 else 0.2 * zz)
            assert float(f[0, q, p]) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_rbf_init_spline_is_tiny() -> None:
    # Spec §2.2: the RBF coefficients fit U(-½,½)·ε/G noise, so the spline term starts near zero.
    G, eps_scale = 8, 0.1
    bank = EnergyBank((3, 4), "rbf", G, (-1.2, 1.2), "silu", 4, 3, eps_scale, torch.Generator().manual_seed(0))
    x = torch.linspace(-1.2, 1.2, 101).view(-1, 1, 1).expand(-1, 3, 4)
    with torch.no_grad():
        spline = bank.spline(x)
    assert spline.abs().max() < eps_scale / G
    assert spline.abs().max() > 0


# ----------------------------------------------------------------------------------------------
# Grid refit (docs/design.md §2.3)


def _bank(seed: int = 0) -> EnergyBank:
    bank = EnergyBank((2, 3), "rbf", 8, (-1.2, 1.2), "silu", 3, 2, 1.0, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        bank.coef.copy_(torch.randn(bank.coef.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return bank


def _ridge_optimum(design: np.ndarray, target: np.ndarray, ridge: float) -> np.ndarray:
    k = design.shape[-1]
    return np.linalg.solve(design.T @ design + ridge * np.eye(k), design.T @ target)


def test_energy_bank_refit_preserves_values_on_covered_samples() -> None:
    bank = _bank()
    samples = torch.rand(500, 2, 3, generator=torch.Generator().manual_seed(4)) * 2.6 - 1.3
    with torch.no_grad():
        before = bank(samples)
        old_grid = bank.basis.grid.clone()
        bank.refit_grid(samples)
        after = bank(samples)
    assert not torch.equal(bank.basis.grid, old_grid)
    scale = float(before.abs().max())
    assert scale > 1.0
    assert float((after - before).abs().max()) < 0.05 * scale
    assert float((after - before).square().mean().sqrt()) < 0.02 * float(before.square().mean().sqrt())


def test_energy_bank_refit_moves_grid_to_wide_samples() -> None:
    # Samples spanning [-6, 6], initial grid on [-1.2, 1.2]. The old function (a bump of width
    # ~0.3) is not representable on the wider grid, so the refit must be the best ridge fit of it.
    bank = _bank()
    gen = torch.Generator().manual_seed(5)
    samples = torch.rand(400, 2, 3, generator=gen) * 12 - 6
    with torch.no_grad():
        old_spline = bank.spline(samples)
        bank.refit_grid(samples)
    grid = bank.basis.grid
    lo, hi = samples.min(0).values, samples.max(0).values
    torch.testing.assert_close(grid[..., 0], lo)
    torch.testing.assert_close(grid[..., -1], hi)
    assert (torch.diff(grid, dim=-1) > 0).all()
    # Interior centres follow the order statistics (95%) and the uniform grid (5%).
    srt = torch.sort(samples, 0).values
    pos = torch.linspace(0, 399, 9).round().long()
    uniform = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * torch.linspace(0, 1, 9)
    torch.testing.assert_close(grid, 0.05 * uniform + 0.95 * srt[pos].movedim(0, -1))
    # Coefficients = the ridge optimum (float64, independent solve) for each (q, p).
    with torch.no_grad():
        design = bank.basis(samples).double().numpy()  # [N, 2, 3, K]
    for q in range(2):
        for p in range(3):
            want = _ridge_optimum(design[:, q, p], old_spline[:, q, p].double().numpy(), 1e-4)
            np.testing.assert_allclose(bank.coef[q, p].detach().double().numpy(), want, atol=2e-3, rtol=1e-3)


def test_energy_bank_second_refit_on_wide_grid_preserves_values() -> None:
    # Once the grid lives on [-6, 6], a function of that grid survives a refit to fresh samples.
    bank = _bank()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        bank.refit_grid(torch.randn(400, 2, 3, generator=gen) * 2.5)
        bank.coef.copy_(torch.randn(bank.coef.shape, generator=gen))
        samples = torch.randn(400, 2, 3, generator=gen) * 2.5
        before = bank(samples)
        bank.refit_grid(samples)
        after = bank(samples)
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())


@pytest.mark.parametrize("kind", ["fft", "cheby"])
def test_refit_is_a_no_op_without_grid(kind: str) -> None:
    bank = EnergyBank((2, 2), kind, 4, (-1.0, 1.0), "silu", 2, 2, 1.0, torch.Generator().manual_seed(0))
    layer = KANLayer(2, 3, kind, 4, (-1.0, 1.0), "silu", torch.Generator().manual_seed(0))
    state_b = {k: v.clone() for k, v in bank.state_dict().items()}
    state_l = {k: v.clone() for k, v in layer.state_dict().items()}
    bank.refit_grid(torch.randn(50, 2, 2) * 5)
    layer.refit_grid(torch.randn(50, 2) * 5)
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in state_b.items())
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state_l.items())


def test_kan_layer_refit_preserves_outputs_and_moves_grid() -> None:
    layer = KANLayer(3, 4, "rbf", 8, (-1.2, 1.2), "silu", torch.Generator().manual_seed(0))
    _randomise(layer, 2)
    with torch.no_grad():
        layer.basis.tau.fill_(1.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(500, 3, generator=gen) * 2.4 - 1.2 + torch.tensor([0.0, 0.1, -0.1])
    with torch.no_grad():
        before = layer(x)
        layer.refit_grid(x)
        after = layer(x)
    torch.testing.assert_close(layer.basis.grid[:, 0], x.min(0).values)
    torch.testing.assert_close(layer.basis.grid[:, -1], x.max(0).values)
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())
    # Wide inputs: the grid covers them, coefficients are the per-edge ridge optimum of the old spline.
    wide = torch.rand(400, 3, generator=gen) * 12 - 6
    with torch.no_grad():
        old = torch.einsum("nik,iok->ion", layer.basis(wide), layer.coef).double().numpy()
        layer.refit_grid(wide)
        design = layer.basis(wide).double().numpy()  # [N, I, K]
    torch.testing.assert_close(layer.basis.grid[:, 0], wide.min(0).values)
    torch.testing.assert_close(layer.basis.grid[:, -1], wide.max(0).values)
    for i in range(3):
        for o in range(4):
            want = _ridge_optimum(design[:, i], old[i, o], 1e-4)
            np.testing.assert_allclose(layer.coef[i, o].detach().double().numpy(), want, atol=2e-3, rtol=1e-3)


def test_refit_degenerate_samples_keep_grid_finite() -> None:
    bank = _bank()
    samples = torch.full((100, 2, 3), 0.3)
    with torch.no_grad():
        bank.refit_grid(samples)
        out = bank(samples)
    assert torch.isfinite(bank.basis.grid).all() and torch.isfinite(bank.coef).all() and torch.isfinite(out).all()
    assert (torch.diff(bank.basis.grid, dim=-1) > 0).all()



@pytest.mark.parametrize("kind", BASES)
def test_kan_layer_training_path_has_the_gradients_of_the_plain_expression(kind: str) -> None:
    """With gradients recorded the layer multiplies through _SplineMatmul (a hand-written backward); its output and
    the gradients of the input and of every parameter equal autograd's of the plain expression, in float64."""
    layer = KANLayer(4, 3, kind, 5, (-1.5, 1.0), "silu", torch.Generator().manual_seed(0)).double()
    _randomise(layer, 4)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cot = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def plain(v: torch.Tensor) -> torch.Tensor:
        y = layer.basis(v).flatten(-2) @ layer.weight()
        return y + layer.act(v) @ layer.w_base if layer.use_base else y

    results = []
    for fn in (layer, plain):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        results.append((y.detach(), torch.autograd.grad((y * cot).sum(), [xi, *layer.parameters()], allow_unused=True)))
    (y_fast, g_fast), (y_plain, g_plain) = results
    spline = layer(x.clone().requires_grad_()).grad_fn
    spline = spline.next_functions[0][0] if layer.use_base else spline
    assert spline.name() == "_SplineMatmulBackward"
    torch.testing.assert_close(y_fast, y_plain)
    for a, b in zip(g_fast, g_plain, strict=True):
        assert (a is None) == (b is None)  # Chebyshev has no base weight term
        if a is not None:
            torch.testing.assert_close(a, b)


def _weighted_by_autograd(bank: EnergyBank, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nc,n...->c...", a, bank(x))


@pytest.mark.parametrize("kind", BASES)
def test_energy_bank_weighted_sum_has_the_values_and_gradients_of_the_per_sample_sum(kind: str) -> None:
    """Σ_n a_nc f(x_n) summed over the basis first (EnergyBank.weighted_sum) equals the per-sample form in value and
    in every parameter's gradient, in float64, with samples near the centres and far outside the grid (floored RBF
    exponents: zero derivative in τ there, as under torch.clamp)."""
    bank = EnergyBank((3, 2), kind, 5, (-1.2, 1.2), "silu", 2, 3, 1.0, torch.Generator().manual_seed(0)).double()
    _randomise(bank, 7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(9, 3, 2, generator=gen, dtype=torch.float64)
    x[0, 0, 0], x[1, 2, 1] = 60.0, -1e3
    a = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    cot = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
    results = []
    for fn in (bank.weighted_sum, lambda v, w: _weighted_by_autograd(bank, v, w)):
        out = fn(x, a)
        results.append((out.detach(), torch.autograd.grad((out * cot).sum(), list(bank.parameters()),
                                                          allow_unused=True)))
    (v_fast, g_fast), (v_plain, g_plain) = results
    torch.testing.assert_close(v_fast, v_plain)
    for a_, b_ in zip(g_fast, g_plain, strict=True):
        assert (a_ is None) == (b_ is None)  # Chebyshev has no base weight term
        if a_ is not None:
            torch.testing.assert_close(a_, b_)
    if kind == "rbf":  # the path that keeps no [N, E, K] values for the backward
        assert bank.weighted_sum(x, a).grad_fn is not None
        assert "_WeightedRBFBackward" in str(bank.basis.weighted_sum(x, a).grad_fn.name())


@pytest.mark.parametrize("kind", BASES)
def test_frozen_decode_gives_the_decoders_numbers_bit_for_bit(kind: str) -> None:
    """KANDecoder.frozen: the graph-free decode (the RBF basis in place, KANLayer.forward_) equals the decoder's
    forward exactly, under no_grad and with grad mode on; an input that needs a gradient still gets one."""
    from training.config import DecoderConfig
    from training.model.decoder import KANDecoder

    decoder = KANDecoder(DecoderConfig(image_shape=(1, 4, 5), hidden=(7,), basis=kind, grid_size=6), 3,
                         torch.Generator().manual_seed(0))
    _randomise(decoder, 3)
    h = 2.0 * torch.randn(300, 3, generator=torch.Generator().manual_seed(4))  # past the grid: floored exponents too
    with torch.no_grad():
        want = decoder(h)
    decode = decoder.frozen()
    with torch.no_grad():
        assert torch.equal(decode(h), want)
    got = decode(h)  # grad mode on, h needs none: no graph either
    assert torch.equal(got, want) and got.grad_fn is None
    hg = h.clone().requires_grad_()
    out = decode(hg)
    assert torch.equal(out.detach(), want)
    (grad,) = torch.autograd.grad(out.square().sum(), hg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", BASES)
def test_kmajor_layer_is_the_layer_with_its_sums_reordered(kind: str) -> None:
    """The served graph's layout (KANLayer.forward_kmajor with weight(kmajor=True)): the basis values are the
    layer's own, transposed (the same numbers for RBF), and the outputs agree to float rounding."""
    layer = KANLayer(4, 3, kind, 5, (-1.5, 1.0), "silu", torch.Generator().manual_seed(0))
    _randomise(layer, 5)
    x = 2.0 * torch.randn(64, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        b, bk = layer.basis(x), layer.basis.forward_kmajor(x)
        assert bk.shape == (64, layer.basis.n_basis, 4)
        if kind == "rbf":
            assert torch.equal(bk, b.transpose(-1, -2))
        torch.testing.assert_close(bk, b.transpose(-1, -2), rtol=1e-6, atol=1e-7)
        w, wk = layer.weight(), layer.weight(kmajor=True)
        assert not torch.equal(w, wk)  # a real reordering of the rows, not the same matrix
        torch.testing.assert_close(layer.forward_kmajor(x, wk), layer(x, w), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.forward_kmajor(x), layer.forward_kmajor(x, wk))  # the matrix built when not given
