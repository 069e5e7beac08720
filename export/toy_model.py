"""A toy served model: a tiny ONNX graph that follows the served-graph contract exactly (u in, images and mean
out), and Triton repositories holding it. For the serving tests and for ``benchmarks/serving.py`` without a real
model: both exercise the server, the client and the contract checks without an export.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from export.contract import INPUT_U, OUTPUT_IMAGES, OUTPUT_MEAN, ModelContract
from export.triton_config import render_config, write_config
from training.model.kaem import nhwc, to_uint8_nhwc
from training.uniforms import U_EPS

TOY_MODEL = "kaem_toy"
# Mixture layout so that the ITS-only truncation path (its_start > 0) is exercised.
TOY_CONTRACT = ModelContract(
    prior_kind="mixture", P=3, Q=4, image_h=12, image_w=12, image_c=1, config_id="toy00000", preset="toy"
)
TOY_MAX_BATCH = 64


class ToyGenerator(torch.nn.Module):
    """u ``[B, D]`` -> (images uint8 ``[B, H, W, C]``, mean fp32 ``[B, H, W, C]``): a fixed random
    two-layer map of logit(u), standing in for inverse-transform prior + decoder."""

    def __init__(self, contract: ModelContract, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n_pix = contract.image_h * contract.image_w * contract.image_c
        self.shape = (contract.image_c, contract.image_h, contract.image_w)
        self.register_buffer("w1", torch.randn(contract.u_dim, hidden, generator=g) * 0.8)
        # smooth low-frequency patterns (one per hidden unit), so that images look like blobs
        y, x = torch.meshgrid(torch.linspace(0, 1, contract.image_h), torch.linspace(0, 1, contract.image_w),
                              indexing="ij")
        freq = torch.randint(0, 3, (hidden, 2), generator=g).float()
        phase = torch.rand(hidden, 1, 1, generator=g) * 6.2832
        waves = torch.cos(6.2832 * (freq[:, :1, None] * x + freq[:, 1:, None] * y) / 2 + phase)
        self.register_buffer("w2", (waves[:, None] * 1.2).expand(-1, contract.image_c, -1, -1).reshape(hidden, n_pix))

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.where(torch.isnan(u), torch.full_like(u, 0.5), u)  # Clip passes NaN through
        u = torch.clamp(u, U_EPS, 1.0 - U_EPS)
        h = torch.tanh(torch.logit(u) @ self.w1)
        mean = torch.sigmoid(h @ self.w2).reshape(u.shape[0], *self.shape)  # [B, C, H, W]
        return to_uint8_nhwc(mean), nhwc(mean)


@functools.cache
def _toy_onnx_bytes(contract: ModelContract) -> bytes:
    """Export once per process (the dynamo exporter takes seconds); repositories copy the bytes."""
    module = ToyGenerator(contract).eval()
    example = torch.rand(2, contract.u_dim)
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, opset_version=18,
            input_names=[INPUT_U], output_names=[OUTPUT_IMAGES, OUTPUT_MEAN],
            dynamic_shapes={"u": {0: batch}}, external_data=False, verbose=False,
        )
        model = onnx.load(str(path))
    model.ir_version = 10  # the production image's onnxruntime loads IR <= 10
    del model.metadata_props[:]
    for k, v in sorted(contract.to_metadata().items()):
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_toy_model(model_dir: Path, contract: ModelContract = TOY_CONTRACT, max_batch_size: int = TOY_MAX_BATCH,
                    version: int = 1, config_text: str | None = None) -> Path:
    """One model folder: ``config.pbtxt`` (rendered unless given) + ``<version>/model.onnx``."""
    onnx_path = model_dir / str(version) / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path.write_bytes(_toy_onnx_bytes(contract))
    write_config(model_dir, config_text or render_config(model_dir.name, contract, max_batch_size=max_batch_size))
    return onnx_path


def build_toy_repository(tmp_path: Path, model_name: str = TOY_MODEL, contract: ModelContract = TOY_CONTRACT,
                         max_batch_size: int = TOY_MAX_BATCH) -> Path:
    """A Triton model repository ``<tmp_path>/model_repository`` holding one toy model."""
    repo = Path(tmp_path) / "model_repository"
    write_toy_model(repo / model_name, contract, max_batch_size)
    return repo


def wrong_contract_config(model_name: str, contract: ModelContract = TOY_CONTRACT,
                          max_batch_size: int = TOY_MAX_BATCH) -> str:
    """A config that loads fine but declares another contract version (the client must refuse it)."""
    text = render_config(model_name, contract, max_batch_size=max_batch_size)
    return text.replace(f'"{contract.contract_version}"', '"kaem-serve-contract-v0"')


def mismatched_contract(contract: ModelContract = TOY_CONTRACT) -> ModelContract:
    """Same layout, different image size: its ONNX graph disagrees with ``contract``'s config."""
    return dataclasses.replace(contract, image_h=contract.image_h + 2)


def reference_images(onnx_path: Path, u: np.ndarray) -> dict[str, np.ndarray]:
    """Run the graph in-process with onnxruntime (CPU): the reference Triton must match bit for bit."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {INPUT_U: u.astype(np.float32)}), strict=True))
