"""Latent health: how many directions the generator really uses. One function serves the training
log, ``kaem-eval``, the export summary and the ONNX metadata, so the numbers mean the same everywhere.

* ``latent_pr``: participation ratio (Σλ)²/Σλ² of the covariance eigenvalues λ of the decoder input
  ``h`` over the prior draws of seeds 0..4095, and the top-3 variance shares. Q equal, independent
  coordinates give Q; a latent that moves along one curve gives 1.
* ``gen_dim``: the generator dimension, the mean over seeds 0..63 of the participation ratio of the
  squared singular values of ∂x/∂u (x the decoder mean, u the served uniforms): how many directions
  in image space a small change of the noise can move a sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

N_LATENT = 4096  # seeds 0..4095 for the covariance of h
N_JACOBIAN = 64  # seeds 0..63 for the generator dimension
MIN_GEN_DIM = 3.0  # below this the service returns variations along (almost) one curve
METADATA_KEYS = {"latent_pr": "kaem.latent_pr", "gen_dim": "kaem.gen_dim", "latent_top3": "kaem.latent_top3"}


@dataclass(frozen=True)
class LatentHealth:
    latent_pr: float  # participation ratio of cov(h), in [1, Q]
    latent_top3: tuple[float, ...]  # variance shares of the three largest principal directions of h
    gen_dim: float | None  # mean participation ratio of the squared singular values of ∂x/∂u
    Q: int  # decoder input width (the largest possible latent_pr)

    def warnings(self) -> list[str]:
        """What a user must hear: a generator of dimension < 3, or an h ratio below Q/4."""
        out = []
        if self.gen_dim is not None and self.gen_dim < MIN_GEN_DIM:
            out.append(f"generator dimension {self.gen_dim:.2f} < {MIN_GEN_DIM:g}: samples vary along almost "
                       "one curve in image space (collapsed latent)")
        if self.latent_pr < self.Q / 4:
            out.append(f"latent participation ratio {self.latent_pr:.2f} < Q/4 = {self.Q / 4:g}: the decoder "
                       f"input uses few of its {self.Q} directions")
        return out

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["latent_top3"] = [round(v, 6) for v in self.latent_top3]
        d["flagged"] = bool(self.warnings())
        return d

    def to_metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props`` entries (strings)."""
        out = {METADATA_KEYS["latent_pr"]: f"{self.latent_pr:.4f}",
               METADATA_KEYS["latent_top3"]: ",".join(f"{v:.4f}" for v in self.latent_top3)}
        if self.gen_dim is not None:
            out[METADATA_KEYS["gen_dim"]] = f"{self.gen_dim:.4f}"
        return out

    def summary(self) -> str:
        gd = "n/a" if self.gen_dim is None else f"{self.gen_dim:.2f}"
        top = "/".join(f"{100 * v:.1f}" for v in self.latent_top3)
        return f"latent PR {self.latent_pr:.2f} of Q={self.Q} (top-3 variance {top} %), generator dimension {gd}"


def participation_ratio(values: Tensor) -> Tensor:
    """(Σv)²/Σv² over the last axis, for non-negative v (eigenvalues, squared singular values)."""
    v = values.clamp(min=0).double()
    return v.sum(-1) ** 2 / (v * v).sum(-1).clamp(min=1e-300)


def covariance_spectrum(h: Tensor) -> Tensor:
    """Eigenvalues (descending) of the sample covariance of the rows of ``h[N, Q]``, float64."""
    hc = h.double() - h.double().mean(0)
    cov = hc.T @ hc / max(1, h.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)


def generator_jacobian(model, u: Tensor) -> Tensor | None:
    """∂x/∂u per row, ``[B, C·H·W, D]``, for models whose decoder input is a differentiable function
    of ``u`` (``model.latent_of_u``); None when it is not (the latent EBM's Langevin chain)."""
    latent_of_u = getattr(model, "latent_of_u", None)
    if latent_of_u is None:
        return None
    with torch.enable_grad():
        u = u.detach().clone().requires_grad_(True)
        h = latent_of_u(u)  # [B, Q]; row b depends on u_b only
        rows = [torch.autograd.grad(h[:, q].sum(), u, retain_graph=q + 1 < h.shape[1])[0]
                for q in range(h.shape[1])]
    j_h = torch.stack(rows, dim=1)  # [B, Q, D]

    def mean_image(hb: Tensor) -> Tensor:
        return torch.sigmoid(model.decoder(hb.unsqueeze(0))).flatten()

    with torch.no_grad():  # 16 rows at a time: a conv decoder's Q tangents per row are large (CIFAR-10's: 59 → 41 s)
        j_dec = torch.func.vmap(torch.func.jacfwd(mean_image), chunk_size=16)(h.detach())  # [B, C·H·W, Q]
    return j_dec @ j_h


@torch.no_grad()
def latent_health(model, n_latent: int = N_LATENT, n_jacobian: int = N_JACOBIAN) -> LatentHealth:
    """Latent health of a model from seeds 0..n_latent-1 (h covariance) and 0..n_jacobian-1 (∂x/∂u).

    ``model`` needs ``latent_of_u(u) -> h[B, Q]`` and ``decoder(h)``; the seeds become ``u`` exactly as in
    eager sampling and serving (no truncation)."""
    from training.sample import u_for_model  # deferred: sample imports the checkpoint module

    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        u = torch.from_numpy(u_for_model(model, range(max(n_latent, n_jacobian)))).to(dev)
        h = torch.cat([model.latent_of_u(u[i : i + 1024]) for i in range(0, n_latent, 1024)])
        lam = covariance_spectrum(h)
        total = float(lam.sum())
        top3 = tuple(float(v) / total if total > 0 else 0.0 for v in lam[:3])
        pr = float(participation_ratio(lam)) if total > 0 else 1.0
        jac = generator_jacobian(model, u[:n_jacobian])
        gen_dim = None
        if jac is not None:
            s2 = torch.linalg.svdvals(jac.double()) ** 2
            ok = s2.sum(-1) > 0  # a flat spot (all-zero Jacobian) has no direction at all: dimension 0
            gen_dim = float(torch.where(ok, participation_ratio(s2), torch.zeros_like(s2[:, 0])).mean())
    finally:
        model.train(was_training)
    if not math.isfinite(pr):
        pr = 1.0
    return LatentHealth(latent_pr=pr, latent_top3=top3, gen_dim=gen_dim, Q=int(h.shape[1]))
