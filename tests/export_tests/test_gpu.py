"""GPU readiness (run by ``make test-all`` / benchmarks/gpu_check.sh on a CUDA machine; skipped elsewhere):
the served graph on onnxruntime's CUDA provider matches the CPU one within one grey level, and a config
with the TensorRT accelerator loads and serves on the production image's native Triton."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from testpaths import ROOT

from export.contract import INPUT_U, OUTPUT_IMAGES
from export.to_onnx import contract_for, export_graph
from export.triton_config import render_config, write_config
from training.checkpoint import load_model
from training.sample import sample_images, u_for_model

pytestmark = pytest.mark.gpu
CHECKPOINT = ROOT / "checkpoints" / "kaem_fmnist.pt"
NATIVE_BACKENDS = Path("/opt/tritonserver/backends")  # the NGC image's native backends (Dockerfile)


def _cuda_onnxruntime():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU: this onnxruntime has no CUDAExecutionProvider "
                    "(run bash benchmarks/gpu_check.sh on a CUDA machine)")
    return ort


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    model, _ = load_model(CHECKPOINT)
    path = tmp_path_factory.mktemp("gpu") / "model.onnx"
    export_graph(model, path)
    return model, path


def test_cuda_provider_matches_cpu_within_one_grey_level(exported) -> None:
    ort = _cuda_onnxruntime()
    model, path = exported
    u = u_for_model(model, range(4096))
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gpu = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    assert gpu.get_providers()[0] == "CUDAExecutionProvider"
    a = cpu.run([OUTPUT_IMAGES], {INPUT_U: u})[0].astype(np.int16)
    b = gpu.run([OUTPUT_IMAGES], {INPUT_U: u})[0].astype(np.int16)
    assert np.abs(a - b).max() <= 1


def test_tensorrt_config_loads_and_serves(exported, tmp_path: Path) -> None:
    _cuda_onnxruntime()
    binary = shutil.which("tritonserver")
    if binary is None or not (NATIVE_BACKENDS / "onnxruntime").is_dir():
        pytest.skip("needs the production image's tritonserver (on PATH) with its native onnxruntime backend in "
                    f"{NATIVE_BACKENDS}: run inside the NGC-based image built from the Dockerfile")
    from serving.client import generate_images
    from serving.local.launcher import LocalTriton, free_ports

    class NativeTriton(LocalTriton):
        def command(self) -> list[str]:
            local = super().command()
            return [binary, *[a for a in local[1:] if not a.startswith("--cache-directory")]]

    model, path = exported
    model_dir = tmp_path / "repo" / "kaem_trt"
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(path, model_dir / "1" / "model.onnx")
    write_config(model_dir, render_config("kaem_trt", contract_for(model), tensorrt=True))
    grpc, http, metrics = free_ports(3)
    # TensorRT builds its engines while the model loads: minutes on a cold cache
    with NativeTriton(tmp_path / "repo", grpc_port=grpc, http_port=http, metrics_port=metrics,
                      backend_dir=NATIVE_BACKENDS, startup_timeout_s=600) as server:
        served, _ = generate_images(server.grpc_url, "kaem_trt", list(range(256)), batch_size=64)
    eager = sample_images(model, range(256))
    assert np.abs(served.astype(np.int16) - eager.astype(np.int16)).max() <= 1
