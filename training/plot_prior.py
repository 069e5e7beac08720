"""``kaem-plot-prior``: the learned univariate densities pi_{q,p} next to their reference pi0 —
the paper's interpretability figure (spec §8). One row per checkpoint, ranked by KL(pi || pi0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training.checkpoint import CheckpointError, load_model
from training.cli import HelpFormatter, UserError, user_errors
from training.model import KAEM


def kl_from_pi0(model: KAEM) -> torch.Tensor:
    """KL(pi_{q,p} || pi0) per component [Q, P], by quadrature on the prior's nodes."""
    _, dens, pi0 = model.prior.density_on_nodes()
    w = model.prior.log_w.exp()
    ratio = torch.log(torch.clamp(dens, min=1e-30)) - torch.log(torch.clamp(pi0, min=1e-30))
    return (w * dens * ratio).sum(-1)


def pick_components(model: KAEM, n: int, given: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Given (q, p) pairs (1-based, checked) or the n components that depart most from pi0."""
    Q, P = model.prior.Q, model.prior.P
    if given:
        for q, p in given:
            if not (1 <= q <= Q and 1 <= p <= P):
                raise UserError(f"component ({q},{p}) is outside 1..{Q} × 1..{P}")
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
    fig, axes = plt.subplots(len(models), cols, figsize=(3.0 * cols, 2.4 * len(models)), squeeze=False)
    for row, (model, ckpt) in enumerate(zip(models, checkpoints, strict=True)):
        cfg = model.cfg.prior
        x, dens, pi0 = (t.numpy() for t in model.prior.density_on_nodes())
        kl = kl_from_pi0(model)
        for col, (q, p) in enumerate(pick_components(model, n, components)):
            ax = axes[row][col]
            ax.fill_between(x, dens[q - 1, p - 1], alpha=0.45, color="tab:blue", label="learned π")
            ax.plot(x, dens[q - 1, p - 1], color="tab:blue", lw=1)
            ax.plot(x, pi0, "k--", lw=1, label="π₀ (normalised)")
            ax.set_title(f"(q,p)=({q},{p})  KL={float(kl[q - 1, p - 1]):.2f}", fontsize=9)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"{model.cfg.preset}\nπ₀={cfg.pi0}, {cfg.basis}", fontsize=8)
        axes[row][0].legend(fontsize=6, loc="upper right")
        del ckpt
    fig.suptitle("Learned univariate priors π_{q,p} ∝ exp(f) π₀, most departed from π₀ first", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pair(text: str) -> tuple[int, int]:
    try:
        q, p = (int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"component {text!r}: use q,p with 1-based integers, e.g. 1,2") from err
    return q, p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-plot-prior",
        description="Plot learned univariate prior densities (normalised by quadrature) against the reference "
        "measure π₀, one row per checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint file or run directory; repeat for several rows")
    p.add_argument("--out", default="priors.png", help="PNG to write")
    p.add_argument("--n", type=int, default=4, help="components per row (those with the largest KL to π₀)")
    p.add_argument("--component", type=_pair, action="append", default=None,
                   help="explicit 1-based component q,p (repeatable); overrides --n")
    return p


@user_errors(CheckpointError, ValueError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be >= 1")
    path = plot_priors(args.checkpoint, args.out, args.n, args.component)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
