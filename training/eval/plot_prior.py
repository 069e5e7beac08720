"""``kaem-plot-prior``: the learned univariate densities pi_{q,p} next to their reference pi0 —
the paper's interpretability figure (docs/design.md §8). One row per checkpoint, ranked by KL(pi || pi0), plus a row
of mixture marginals pi_q for mixture priors; prints the learned structure as numbers (KL quantiles,
total variation across q)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import load_model
from training.errors import EvalError
from training.model.kaem import KAEM


def kl_from_pi0(model: KAEM) -> torch.Tensor:
    """KL(pi_{q,p} || pi0) per component [Q, P], by quadrature on the prior's nodes."""
    _, dens, pi0 = model.prior.density_on_nodes()
    return _kl(dens, pi0, model.prior.log_w.exp())


def mixture_marginals(model: KAEM) -> torch.Tensor:
    """π_q(x_k) = Σ_p α_{q,p} π_{q,p}(x_k) on the nodes, [Q, N] (docs/design.md §8: the mixture's latent densities)."""
    _, dens, _ = model.prior.density_on_nodes()
    return (model.prior.log_alpha.exp().unsqueeze(-1) * dens).sum(1)


def _kl(dens: torch.Tensor, pi0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    ratio = torch.log(torch.clamp(dens, min=1e-30)) - torch.log(torch.clamp(pi0, min=1e-30))
    return (w * dens * ratio).sum(-1)


def mean_tv_across_q(dens: torch.Tensor, w: torch.Tensor) -> float:
    """Mean total variation ½∫|π_q − π_q'| over pairs q < q' of densities ``dens[Q, ..., N]`` (same trailing
    index, e.g. the same p): ≈ 0 when every q learned the same density, 1 for disjoint supports."""
    Q = dens.shape[0]
    if Q < 2:
        return 0.0
    tv = 0.5 * (w * (dens.unsqueeze(0) - dens.unsqueeze(1)).abs()).sum(-1)  # [Q, Q, ...]
    upper = torch.triu(torch.ones(Q, Q, dtype=torch.bool), diagonal=1)
    return float(tv[upper].mean())


def prior_structure(model: KAEM) -> dict[str, object]:
    """Learned structure as numbers: quantiles of KL(π_{q,p} ‖ π₀) over all (q, p), the mean total variation
    between π_{q,p} and π_{q',p} (q ≠ q'), and for the mixture the same for its marginals π_q."""
    _, dens, pi0 = model.prior.density_on_nodes()
    w = model.prior.log_w.exp()
    qs = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    out: dict[str, object] = {
        "kl_quantiles": [float(v) for v in torch.quantile(kl_from_pi0(model).flatten().double(), qs)],
        "tv_across_q": mean_tv_across_q(dens, w),
    }
    if model.prior.kind == "mixture":
        marg = mixture_marginals(model)
        out["marginal_kl_quantiles"] = [float(v) for v in torch.quantile(_kl(marg, pi0, w).double(), qs)]
        out["marginal_tv_across_q"] = mean_tv_across_q(marg, w)
    return out


def describe_structure(s: dict[str, object]) -> list[str]:
    def q5(v: object) -> str:
        return " / ".join(f"{x:.3f}" for x in v)  # type: ignore[attr-defined]

    lines = [f"KL(π_qp ‖ π₀) min / 25% / median / 75% / max: {q5(s['kl_quantiles'])}",
             f"mean total variation between π_qp and π_q'p (q ≠ q'): {s['tv_across_q']:.3f}"]
    if "marginal_kl_quantiles" in s:
        lines += [f"mixture marginals π_q: KL(π_q ‖ π₀) min / 25% / median / 75% / max: "
                  f"{q5(s['marginal_kl_quantiles'])}",
                  f"mean total variation between π_q and π_q' (q ≠ q'): {s['marginal_tv_across_q']:.3f}"]
    return lines


def pick_components(model: KAEM, n: int, given: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Given (q, p) pairs (1-based, checked) or the n components that depart most from pi0."""
    Q, P = model.prior.Q, model.prior.P
    if given:
        for q, p in given:
            if not (1 <= q <= Q and 1 <= p <= P):
                raise EvalError(f"component ({q},{p}) is outside 1..{Q} × 1..{P}")
        return given
    order = torch.argsort(kl_from_pi0(model).flatten(), descending=True)[:n]
    return [(int(i) // P + 1, int(i) % P + 1) for i in order]


def plot_priors(checkpoints: list[str], out: str | Path, n: int = 4,
                components: list[tuple[int, int]] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [load_model(c, kaem_only=True)[0] for c in checkpoints]
    cols = len(components) if components else n
    rows = sum(2 if m.prior.kind == "mixture" else 1 for m in models)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    row = 0
    for model in models:
        cfg = model.cfg.prior
        x, dens, pi0 = (t.numpy() for t in model.prior.density_on_nodes())
        kl = kl_from_pi0(model)
        panels = [(f"(q,p)=({q},{p})  KL={float(kl[q - 1, p - 1]):.2f}", dens[q - 1, p - 1], "learned π_qp")
                  for q, p in pick_components(model, n, components)]
        label = f"{model.cfg.preset}\nπ₀={cfg.pi0}, {cfg.basis}"
        _draw_row(axes[row], x, pi0, panels, label)
        row += 1
        if cfg.kind == "mixture":  # docs/design.md §8: each latent's density, the α-weighted sum of its components
            marg = mixture_marginals(model)
            mkl = _kl(marg, model.prior.density_on_nodes()[2], model.prior.log_w.exp())
            top = torch.argsort(mkl, descending=True)[:cols].tolist()
            _draw_row(axes[row], x, pi0, [(f"π_q, q={q + 1}  KL={float(mkl[q]):.2f}", marg[q].numpy(), "mixture π_q")
                                          for q in top], f"{model.cfg.preset}\nmixture marginals")
            row += 1
    fig.suptitle("Learned univariate priors π_{q,p} ∝ exp(f) π₀, most departed from π₀ first", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_row(axes, x, pi0, panels: list[tuple[str, object, str]], ylabel: str) -> None:
    for col, ax in enumerate(axes):
        if col >= len(panels):
            ax.axis("off")
            continue
        title, dens, label = panels[col]
        ax.fill_between(x, dens, alpha=0.45, color="tab:blue", label=label)
        ax.plot(x, dens, color="tab:blue", lw=1)
        ax.plot(x, pi0, "k--", lw=1, label="π₀ (normalised)")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(ylabel, fontsize=8)
    axes[0].legend(fontsize=6, loc="upper right")
