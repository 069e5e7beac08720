"""The served-graph contract, defined once: tensor names, dtypes, shapes and the metadata that
travels with every exported model (ONNX ``metadata_props`` and ``config.pbtxt`` parameters).

Export, config rendering, the client, the load-test data and the tests all import from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from training.errors import KaemError
from training.uniforms import GENERATOR_VERSION, PRIOR_KINDS, seeds_to_u, u_layout

# v2: the prior kinds "folded" and "independent" (u layouts a v1 client cannot build) and the latent-health
# metadata; the default Fashion-MNIST model moved from the univariate [P] to the mixture [2Q] layout.
# v3: the input kind (``inputs``): "u" models take the uniforms, "seed" models the seeds and compute the
# uniforms in the graph (export/seed_graph.py).
CONTRACT_VERSION = "kaem-serve-contract-v3"

# Input of a "u" model: FP32 uniforms [batch, D]; D = P (univariate, folded), Q·P (independent) or 2Q (mixture:
# selection, then ITS).
INPUT_U = "u"
INPUT_U_DTYPE = "TYPE_FP32"
# Inputs of a "seed" model, one row per image: the seed (INT64 [batch, 1]) and the truncation T (FP32
# [batch, 1], 1 = none), the same seed -> image as the "u" model given seeds_to_u(seed, ..., T).
INPUT_SEED = "seed"
INPUT_SEED_DTYPE = "TYPE_INT64"
INPUT_TRUNCATION = "truncation"
INPUT_TRUNCATION_DTYPE = "TYPE_FP32"
INPUT_KINDS = ("u", "seed")
SEED_MODEL_SUFFIX = "_seed"  # kaem-export --seed-model publishes <name>_seed beside <name>
# Outputs: UINT8 images [batch, H, W, C] and the FP32 decoder mean [batch, H, W, C] in [0, 1].
OUTPUT_IMAGES = "images"
OUTPUT_IMAGES_DTYPE = "TYPE_UINT8"
OUTPUT_MEAN = "mean"
OUTPUT_MEAN_DTYPE = "TYPE_FP32"

DEFAULT_MODEL_NAME = "kaem_fmnist"
# "fp32": the seed -> same image guarantee (eager, onnxruntime, Triton). "fp16": the decoder's matmuls in
# half precision (for GPUs), within one grey level of fp32 but not identical, so never the default model
# and always published under its own name. Models exported before this field existed are fp32.
PRECISIONS = ("fp32", "fp16")
DEFAULT_MAX_BATCH_SIZE = 256

METADATA_PREFIX = "kaem."
_PREFIX = METADATA_PREFIX


class ContractError(KaemError):
    """A model's metadata does not match what this client/exporter speaks."""


@dataclass(frozen=True)
class ModelContract:
    """What a client must know about a served model to build valid requests and read images."""

    prior_kind: str  # one of training.uniforms.PRIOR_KINDS
    P: int
    Q: int
    image_h: int
    image_w: int
    image_c: int
    config_id: str  # short hash of the training config JSON
    preset: str
    contract_version: str = CONTRACT_VERSION
    generator_version: str = GENERATOR_VERSION
    precision: str = "fp32"
    inputs: str = "u"  # one of INPUT_KINDS

    @property
    def u_dim(self) -> int:
        return u_layout(self.prior_kind, self.P, self.Q)[0]

    @property
    def its_start(self) -> int:
        """Index of the first ITS uniform in ``u`` (columns before it select mixture components)."""
        return u_layout(self.prior_kind, self.P, self.Q)[1]

    @property
    def u_layout_text(self) -> str:
        return {"univariate": f"its[{self.P}] shared over q",
                "folded": f"its[{self.P}] folded per (q,p)",
                "independent": f"its[{self.Q}x{self.P}] q-major",
                "mixture": f"select[{self.Q}],its[{self.Q}]"}[self.prior_kind]

    def to_metadata(self) -> dict[str, str]:
        out = {f"{_PREFIX}{f.name}": str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out[f"{_PREFIX}u_dim"] = str(self.u_dim)
        out[f"{_PREFIX}u_layout"] = self.u_layout_text
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelContract:
        """Parse and validate metadata; raise :class:`ContractError` naming what is missing or wrong."""
        meta = {f"{_PREFIX}precision": "fp32", **meta}  # exported before precisions existed: fp32
        missing = [f.name for f in dataclasses.fields(cls) if f"{_PREFIX}{f.name}" not in meta]
        if missing:
            raise ContractError(
                "model metadata lacks " + ", ".join(f"{_PREFIX}{m}" for m in missing)
                + ": it was not exported by this project's export/to_onnx.py (re-export it)"
            )
        kw: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = meta[f"{_PREFIX}{f.name}"]
            try:
                kw[f.name] = int(raw) if f.type in ("int", int) else raw
            except ValueError as err:
                raise ContractError(f"metadata {_PREFIX}{f.name}={raw!r} is not an integer") from err
        contract = cls(**kw)  # type: ignore[arg-type]
        contract.check_compatible()
        if f"{_PREFIX}u_dim" in meta and meta[f"{_PREFIX}u_dim"] != str(contract.u_dim):
            raise ContractError(
                f"metadata says u_dim={meta[_PREFIX + 'u_dim']} but the layout implies {contract.u_dim}"
            )
        return contract

    def check_compatible(self) -> None:
        if self.contract_version != CONTRACT_VERSION:
            raise ContractError(
                f"model speaks contract {self.contract_version!r}, this software speaks {CONTRACT_VERSION!r}:"
                " re-export the model with this version, or use the matching client"
            )
        if self.generator_version != GENERATOR_VERSION:
            raise ContractError(
                f"model was exported for seed generator {self.generator_version!r}, this software uses"
                f" {GENERATOR_VERSION!r}: the same seed would give a different image"
            )
        if self.inputs not in INPUT_KINDS:
            raise ContractError(f"unknown input kind {self.inputs!r} (this software knows {', '.join(INPUT_KINDS)})")
        if self.precision not in PRECISIONS:
            raise ContractError(f"unknown precision {self.precision!r} (this software knows {', '.join(PRECISIONS)})")
        if self.prior_kind not in PRIOR_KINDS:
            raise ContractError(f"unknown prior kind {self.prior_kind!r} (this software knows "
                                f"{', '.join(PRIOR_KINDS)})")
        if min(self.P, self.Q, self.image_h, self.image_w) < 1 or self.image_c not in (1, 3):
            raise ContractError(f"implausible shapes in model metadata: {self}")


# Post-deploy canary: the export records the digest of a version's images for these seeds (config parameter
# "artifact.canary.<version>"), and kaem-canary asks the server for the same seeds and compares.
CANARY_SEEDS = tuple(range(8))


def canary_u(contract: ModelContract) -> np.ndarray:
    """The canary request's uniforms ``[8, D]``: the served u of :data:`CANARY_SEEDS`, no truncation."""
    return seeds_to_u(CANARY_SEEDS, contract.u_dim, contract.its_start)


def seed_feed(seeds, truncation: float | np.ndarray = 1.0) -> dict[str, np.ndarray]:
    """A seed model's inputs for ``seeds`` (one row each) at ``truncation`` (a number, or one per row)."""
    s = np.asarray(list(seeds), dtype=np.int64).reshape(-1, 1)
    t = np.broadcast_to(np.asarray(truncation, dtype=np.float32).reshape(-1, 1), s.shape)
    return {INPUT_SEED: s, INPUT_TRUNCATION: np.ascontiguousarray(t)}


def request_rows(seeds, contract: ModelContract, truncation: float = 1.0) -> dict[str, np.ndarray]:
    """The input tensors (one row per seed) that ask a model of ``contract`` for these seeds' images: the
    uniforms for a "u" model, the seeds and truncation for a "seed" model. Same seeds, same images."""
    if contract.inputs == "seed":
        return seed_feed(seeds, truncation)
    return {INPUT_U: seeds_to_u(list(seeds), contract.u_dim, contract.its_start, truncation)}


def canary_rows(contract: ModelContract) -> dict[str, np.ndarray]:
    """The canary request (:data:`CANARY_SEEDS`, no truncation) for a model of either input kind."""
    return request_rows(CANARY_SEEDS, contract)


def canary_sha256(images: np.ndarray) -> str:
    """Digest of the canary seeds' uint8 images ``[8, H, W, C]`` as the served graph returns them."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.shape[0] != len(CANARY_SEEDS):
        raise ContractError(f"canary images must be uint8 [{len(CANARY_SEEDS)}, H, W, C], got {images.dtype} "
                            f"{list(images.shape)}")
    return hashlib.sha256(images.tobytes()).hexdigest()
