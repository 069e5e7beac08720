"""No subnormal floats by construction (issue: served-graph speed, item 3): x86 handles them many times
slower, in torch and in onnxruntime. Latents far outside the RBF grids (±50, ±1e3) once produced them in
the decoder's Gaussian basis; the basis and the SiLU now floor their exponents (training/model/kan.py).

Every intermediate is checked, not just module outputs: eagerly with a dispatch mode that sees each op's
result (forward and backward), in onnxruntime by exposing every node output of the exported graph."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from testpaths import SHIPPED_CHECKPOINT
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from export.contract import INPUT_U
from export.module import ServedGenerator
from export.to_onnx import ort_session
from training.checkpoint import load_model
from training.config import get_preset
from training.losses import POSTERIORS
from training.model.kaem import KAEM
from training.sample import u_for_model

CHECKPOINT = SHIPPED_CHECKPOINT
TINY = float(np.finfo(np.float32).tiny)
FAR = (50.0, -50.0, 1e3, -1e3)


def _subnormal_count(a: np.ndarray | Tensor) -> int:
    a = np.abs(a.detach().numpy() if isinstance(a, Tensor) else a)
    return int(((a > 0) & (a < TINY)).sum())


class _FindSubnormals(TorchDispatchMode):
    """Records every float32 op result holding a subnormal value: {op name: count}."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if "empty" in str(func):  # uninitialised buffers (filled by the next op, which is checked)
            return out
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.dtype == torch.float32 and t.numel():
                n = _subnormal_count(t)
                if n:
                    self.found[str(func)] = self.found.get(str(func), 0) + n
        return out


def _far_latents(q: int) -> Tensor:
    """Rows at ±50 and ±1e3 (all coordinates), and rows mixing them with in-grid values."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.full((q,), v) for v in FAR]
    rows += [torch.tensor(FAR)[torch.randint(0, 4, (q,), generator=g)] * torch.rand(q, generator=g).round()
             + 0.5 * torch.randn(q, generator=g) for _ in range(4)]
    return torch.stack(rows)


@pytest.fixture(scope="module")
def shipped() -> KAEM:
    model, _ = load_model(CHECKPOINT)
    assert isinstance(model, KAEM)
    return model.eval()


def test_decoder_far_outside_its_grid_makes_no_subnormals(shipped: KAEM) -> None:
    # Forward: what serving runs. (A backward from such latents multiplies gradients that are already tiny
    # by floored basis values: no floor bounds that product; the training test below checks real steps.)
    h = _far_latents(shipped.cfg.prior.Q)
    with _FindSubnormals() as mode, torch.no_grad():
        logits = shipped.decoder(h)
        images = shipped.generate(torch.from_numpy(u_for_model(shipped, range(64))))
    assert torch.isfinite(logits).all() and torch.isfinite(images).all()
    assert mode.found == {}, f"ops that produced subnormal floats: {mode.found}"


def test_a_training_step_makes_no_subnormals(shipped: KAEM) -> None:
    # The preset's estimator (IS with Langevin moves) on a fresh model, proposals reduced for speed; the
    # "images" are the shipped model's samples, so the likelihood sees realistic pixels.
    cfg = get_preset("fmnist")
    cfg = replace(cfg, posterior=replace(cfg.posterior, n_samples=64, cd_samples=64))
    model = KAEM(cfg)
    with torch.no_grad():
        x = shipped.generate(torch.from_numpy(u_for_model(shipped, range(16))))
    with _FindSubnormals() as mode:
        out = POSTERIORS[cfg.posterior.kind](model, x, torch.Generator().manual_seed(0), cfg.posterior)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert mode.found == {}, f"ops that produced subnormal floats: {mode.found}"


def _with_every_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every node's float output made a graph output (shapes from inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    have = {o.name for o in inferred.graph.output}
    for vi in inferred.graph.value_info:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in have:
            inferred.graph.output.append(vi)
    return inferred


def _export(module: nn.Module, example: Tensor, path: Path) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (example,), dynamo=True, opset_version=18, dynamic_shapes=({0: batch},),
                                 optimize=True, verbose=False)
    proto = _with_every_output(prog.model_proto)
    onnx.save(proto, str(path))
    return proto


class _Decoder(nn.Module):
    def __init__(self, model: KAEM):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(h)


def _ort_subnormals(path: Path, proto: onnx.ModelProto, feed: np.ndarray) -> dict[str, int]:
    sess = ort_session(path, threads=1)
    names = [o.name for o in proto.graph.output]
    outs = sess.run(names, {sess.get_inputs()[0].name: feed})
    found = {}
    for name, value in zip(names, outs, strict=True):
        if value.dtype == np.float32 and (n := _subnormal_count(value)):
            found[name] = n
    assert len(outs) > 20  # the intermediates were really exposed
    return found


def test_onnxruntime_decoder_and_served_graph_make_no_subnormals(shipped: KAEM) -> None:
    h = _far_latents(shipped.cfg.prior.Q)
    with tempfile.TemporaryDirectory() as tmp:
        dec_path = Path(tmp) / "decoder.onnx"
        proto = _export(_Decoder(shipped), h, dec_path)
        assert _ort_subnormals(dec_path, proto, h.numpy()) == {}
        # the served graph on its own inputs: seeds, the ends of [0, 1] and NaN
        u = torch.from_numpy(u_for_model(shipped, range(64)))
        u[0], u[1], u[2] = 0.0, 1.0, float("nan")
        served_path = Path(tmp) / "served.onnx"
        proto = _export(ServedGenerator(shipped), u, served_path)
        assert proto.graph.input[0].name == INPUT_U or proto.graph.input[0].name == "u"
        assert _ort_subnormals(served_path, proto, u.numpy()) == {}
