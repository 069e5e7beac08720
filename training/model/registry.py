"""The model registry: every model kind the harness trains (``KAEMConfig.model``), its display name, its
constructor and its loss. Checkpoints, the training loop and the comparison look models up here."""

from __future__ import annotations

from training.config import KAEMConfig
from training.losses import POSTERIORS, LossFn
from training.model.baselines import VAE, LatentEBM, lebm_loss, vae_loss
from training.model.kaem import KAEM, LatentImageModel

MODEL_CLASSES: dict[str, type[LatentImageModel]] = {"kaem": KAEM, "vae": VAE, "lebm": LatentEBM}
MODEL_NAMES = {"kaem": "KAEM", "vae": "VAE", "lebm": "latent EBM"}


def build_model(cfg: KAEMConfig, init_seed: int | None = None) -> LatentImageModel:
    return MODEL_CLASSES[cfg.model](cfg, init_seed)  # type: ignore[call-arg]


def loss_fn_for(cfg: KAEMConfig) -> LossFn:
    """KAEM: the posterior estimator chosen by name; baselines: their own objectives."""
    if cfg.model == "vae":
        return vae_loss  # type: ignore[return-value]
    if cfg.model == "lebm":
        return lebm_loss  # type: ignore[return-value]
    return POSTERIORS[cfg.posterior.kind]
