"""Frozen dataclass configs and the per-dataset presets (spec kaem-model.md §6).

The resolved ``KAEMConfig`` is saved as JSON with every checkpoint and is the only way a model
is rebuilt; config files are never executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

# Quadrature / ITS domain per reference measure (spec §3).
PI0_DOMAINS: dict[str, tuple[float, float]] = {
    "uniform": (-0.1, 1.1),
    "gaussian": (-1.2, 1.2),
    "lognormal": (0.0, 4.0),
}
PI0_KINDS = ("uniform", "gaussian", "lognormal", "ebm")
BASES = ("rbf", "fft", "cheby")
ACTIVATIONS = ("silu", "leaky_relu", "gelu", "none")


@dataclass(frozen=True)
class PriorConfig:
    """The energy prior pi_{q,p}(z) ∝ exp(f_{q,p}(z)) pi0(z) and its quadrature."""

    kind: str = "univariate"  # "univariate" (KART: h_q = Σ_p z_qp) | "mixture" (spec §1.2)
    P: int = 20  # inner inputs (uniforms per sample in the univariate prior)
    Q: int = 41  # outer functions = latent width fed to the decoder
    basis: str = "rbf"  # rbf | fft | cheby
    grid_size: int = 20  # G: RBF has G+1 centres, FFT frequencies 0..G, Chebyshev degree G
    pi0: str = "gaussian"  # uniform | gaussian | lognormal | ebm (pi0 ≡ 1)
    ebm_domain: tuple[float, float] = (-1.2, 1.2)  # domain used when pi0 = "ebm"
    n_quad: int = 100  # Gauss-Legendre nodes
    base_act: str = "silu"
    eps: float = 1e-4  # floor inside log(pi0 + eps)
    init_eps_scale: float = 0.1  # RBF init noise scale (ε_scale, spec §2.2)
    knots: str = "cell"  # ITS knot convention: "cell" (recommended) | "reference"

    @property
    def domain(self) -> tuple[float, float]:
        return tuple(self.ebm_domain) if self.pi0 == "ebm" else PI0_DOMAINS[self.pi0]  # type: ignore[return-value]


@dataclass(frozen=True)
class DecoderConfig:
    """g_Φ: a KAN (MNIST/FMNIST) or a transposed-conv stack (colour images), sigmoid output."""

    kind: str = "kan"  # kan | conv
    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W
    # KAN decoder: hidden widths between Q and C·H·W.
    hidden: tuple[int, ...] = (82,)
    basis: str = "rbf"
    grid_size: int = 20
    grid_range: tuple[float, float] = (-1.2, 1.2)
    base_act: str = "silu"
    # Conv decoder: hidden channels and (kernel, stride, padding) per layer; the last layer maps
    # to C channels, so there are len(channels) + 1 entries in ``layers``.
    channels: tuple[int, ...] = ()
    layers: tuple[tuple[int, int, int], ...] = ()
    hidden_act: str = "leaky_relu"  # between transposed convs (LeakyReLU(0.2))
    reference_linear: bool = False  # True: no nonlinearity, as in the reference code (spec §6)


@dataclass(frozen=True)
class LikelihoodConfig:
    """Gaussian likelihood log p(x|z) = -||x - sigmoid(g(h) + σ_n ε)||² / (2σ²) (spec §1.3)."""

    sigma: float = 0.1
    sigma_n: float = 0.1


@dataclass(frozen=True)
class PosteriorConfig:
    """Posterior estimator settings (spec §5.2-5.3). Only "is" exists in this issue."""

    kind: str = "is"
    n_samples: int = 100  # N_s prior proposals shared by the batch
    resampler: str = "residual"  # residual | systematic | stratified
    ess_threshold: float = 0.5  # resample row b when ESS_b < threshold · N_s
    decoder_noise: bool = True  # per-(b, s) pre-activation noise σ_n ε in the IS likelihood
    contrastive: bool = True  # CD prior term (True) or normalised prior with quadrature log Z


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fmnist"
    batch_size: int = 100
    steps: int = 5000
    lr: float = 1e-3
    optimizer: str = "adam"
    grad_clip: float = 0.0  # 0 = off
    grid_update_every: int = 100  # RBF grid refit interval in steps (spec §2.3); 0 = off
    grid_update_growth: float = 1.0  # factor (2 - decay) by which the interval grows per update
    grid_update_until: int = 2000  # stop refitting after this step (grids settle early)
    grid_samples: int = 1000  # prior samples used per refit
    checkpoint_every: int = 1000
    log_every: int = 50
    sample_every: int = 0  # write a sample grid every N steps (0 = only at the end)
    seed: int = 0


@dataclass(frozen=True)
class KAEMConfig:
    preset: str = "fmnist"
    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def identity(self) -> str:
        """Short hash of the model-defining parts (prior, decoder, likelihood): the config's identity."""
        model = {k: v for k, v in self.to_dict().items() if k in ("prior", "decoder", "likelihood")}
        return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KAEMConfig:
        return _from_dict(cls, d)

    def validate(self) -> None:
        p, dc = self.prior, self.decoder
        _check(p.kind in ("univariate", "mixture"), f"prior.kind {p.kind!r} not in univariate|mixture")
        _check(p.basis in BASES, f"prior.basis {p.basis!r} not in {BASES}")
        _check(p.pi0 in PI0_KINDS, f"prior.pi0 {p.pi0!r} not in {PI0_KINDS}")
        _check(p.base_act in ACTIVATIONS, f"prior.base_act {p.base_act!r} not in {ACTIVATIONS}")
        _check(p.knots in ("cell", "reference"), "prior.knots must be 'cell' or 'reference'")
        _check(min(p.P, p.Q, p.grid_size, p.n_quad) >= 1, "prior sizes must be >= 1")
        _check(dc.kind in ("kan", "conv"), f"decoder.kind {dc.kind!r} not in kan|conv")
        if dc.kind == "conv":
            _check(len(dc.layers) == len(dc.channels) + 1, "decoder.layers needs len(channels) + 1 entries")
        _check(self.posterior.kind == "is", f"posterior.kind {self.posterior.kind!r}: only 'is' is available")
        _check(
            self.posterior.resampler in ("residual", "systematic", "stratified"),
            f"posterior.resampler {self.posterior.resampler!r} not in residual|systematic|stratified",
        )
        _check(self.train.batch_size >= 1 and self.train.steps >= 0, "train.batch_size >= 1, steps >= 0")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {msg}")


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild nested frozen dataclasses from JSON, turning lists back into tuples; unknown keys fail."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kw = {}
    for k, v in d.items():
        sub = _NESTED.get((cls.__name__, k))
        kw[k] = _from_dict(sub, v) if sub is not None else _tupleize(v)
    return cls(**kw)


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, list) else v


_NESTED = {
    ("KAEMConfig", "prior"): PriorConfig,
    ("KAEMConfig", "decoder"): DecoderConfig,
    ("KAEMConfig", "likelihood"): LikelihoodConfig,
    ("KAEMConfig", "posterior"): PosteriorConfig,
    ("KAEMConfig", "train"): TrainConfig,
}


# ----------------------------------------------------------------------------------------------
# Presets (spec §6). Colour presets use the mixture prior, FFT basis, pi0 = ebm, conv decoders with
# the new snapshot's channel widths; their Langevin posteriors arrive with the samplers issue, so
# until then they train with IS (a deliberate, temporary deviation).

def _conv(channels: tuple[int, ...], layers: tuple[tuple[int, int, int], ...], hw: int) -> DecoderConfig:
    return DecoderConfig(kind="conv", image_shape=(3, hw, hw), channels=channels, layers=layers)


_COLOUR_PRIOR = PriorConfig(
    kind="mixture", P=40, Q=81, basis="fft", grid_size=50, pi0="ebm", ebm_domain=(-1.0, 1.0),
    n_quad=200, base_act="leaky_relu", init_eps_scale=1.0,
)
_COLOUR_LIK = LikelihoodConfig(sigma=0.3, sigma_n=0.01)

PRESETS: dict[str, KAEMConfig] = {
    # Fashion-MNIST, the default: new-snapshot MNIST config P=20, Q=41, KAN 41→82→784, IS N_s=100.
    "fmnist": KAEMConfig(preset="fmnist"),
    "mnist": KAEMConfig(preset="mnist", train=TrainConfig(dataset="mnist")),
    # Tiny config for tests: 8×8 sklearn digits, small prior and decoder.
    "digits": KAEMConfig(
        preset="digits",
        prior=PriorConfig(P=4, Q=9, grid_size=8, n_quad=40),
        decoder=DecoderConfig(image_shape=(1, 8, 8), hidden=(18,), grid_size=8),
        posterior=PosteriorConfig(n_samples=32),
        train=TrainConfig(
            dataset="digits", batch_size=32, steps=200, grid_update_every=50, grid_update_until=150,
            grid_samples=256, checkpoint_every=100, log_every=20,
        ),
    ),
    "svhn": KAEMConfig(
        preset="svhn", prior=_COLOUR_PRIOR, likelihood=_COLOUR_LIK,
        decoder=_conv((256, 128, 64), ((4, 1, 0), (4, 2, 1), (4, 2, 1), (4, 2, 1)), 32),
        train=TrainConfig(dataset="svhn", batch_size=50, steps=8000, lr=4e-4, grid_update_every=0),
    ),
    "cifar10": KAEMConfig(
        preset="cifar10", prior=_COLOUR_PRIOR, likelihood=_COLOUR_LIK,
        decoder=_conv((512, 256, 128), ((8, 1, 0), (4, 2, 1), (4, 2, 1), (3, 1, 1)), 32),
        train=TrainConfig(dataset="cifar10", batch_size=50, steps=8000, lr=1e-3, grid_update_every=0),
    ),
    "celeba": KAEMConfig(
        preset="celeba", prior=_COLOUR_PRIOR, likelihood=_COLOUR_LIK,
        decoder=_conv((512, 256, 128, 64), ((4, 1, 0),) + ((4, 2, 1),) * 4, 64),
        train=TrainConfig(dataset="celeba", batch_size=50, steps=8000, lr=1e-3, grid_update_every=0),
    ),
}


def get_preset(name: str) -> KAEMConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_overrides(cfg: KAEMConfig, **train_overrides: Any) -> KAEMConfig:
    """Copy of ``cfg`` with non-None training overrides applied (e.g. steps=..., seed=...)."""
    kw = {k: v for k, v in train_overrides.items() if v is not None}
    return replace(cfg, train=replace(cfg.train, **kw)) if kw else cfg
