"""Test-only Triton Python-backend models that break the served contract on the way out: their ``config.pbtxt``
is the production one for the toy contract (``render_config``, so the client reads and accepts the contract from
it) with ``backend: "python"``, and their ``model.py`` answers every request with a malformed ``images`` output.
The client must refuse each answer with a clear error (tests/serving_tests/test_client_output_checks.py).

Triton 2.51 does not check a Python model's outputs against its config (dtype, dims, row count): it serves
what the model returns, so these faults reach the client as they are.
"""

from __future__ import annotations

from pathlib import Path

from export.contract import ModelContract
from export.toy_model import TOY_CONTRACT, TOY_MAX_BATCH
from export.triton_config import BACKEND, render_config, write_config

# fault -> what the model's ``images`` output is, for a request of n rows and the contract's H x W x C
FAULTS = {
    "good": "uint8 [n, H, W, C] (the control: a contract-abiding answer)",
    "shape": "uint8 [n, H, W - 2, C]: wrong-shaped images",
    "rows": "uint8 [n + 1, H, W, C]: one row more than requested",
    "empty": "uint8 [0, H, W, C]: an empty output",
    "missing": "no images tensor at all (only mean)",
    "dtype": "float32 [n, H, W, C] in [0, 1]: the decoder mean instead of the uint8 image",
}

MODEL_SOURCE = '''\
"""Test-only model (tests/serving_tests/python_models.py): answers with a malformed 'images' output ({fault})."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

FAULT = {fault!r}


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        dims = {{t["name"]: [int(d) for d in t["dims"]] for t in cfg["output"]}}
        self.h, self.w, self.c = dims["images"]
        self.input = cfg["input"][0]["name"]

    def _outputs(self, n):
        h, w, c = self.h, self.w, self.c
        mean = np.full((n, h, w, c), 0.5, np.float32)
        images = {{
            "good": lambda: np.full((n, h, w, c), 128, np.uint8),
            "shape": lambda: np.full((n, h, w - 2, c), 128, np.uint8),
            "rows": lambda: np.full((n + 1, h, w, c), 128, np.uint8),
            "empty": lambda: np.zeros((0, h, w, c), np.uint8),
            "missing": lambda: None,
            "dtype": lambda: mean.copy(),
        }}[FAULT]()
        out = [pb_utils.Tensor("mean", mean)]
        if images is not None:
            out.insert(0, pb_utils.Tensor("images", images))
        return out

    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy().shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(n)))
        return responses
'''


def model_name(fault: str) -> str:
    return f"kaem_faulty_{fault}"


def write_python_model(model_dir: Path, fault: str, contract: ModelContract = TOY_CONTRACT,
                       max_batch_size: int = TOY_MAX_BATCH) -> Path:
    """One Python-backend model folder: the production config of ``contract`` with ``backend: "python"``, and
    ``1/model.py`` answering with ``fault`` (a key of :data:`FAULTS`)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
    config = render_config(model_dir.name, contract, max_batch_size=max_batch_size)
    backend_line = f'backend: "{BACKEND}"\n'
    assert config.count(backend_line) == 1, "render_config's backend line moved"
    write_config(model_dir, config.replace(backend_line, 'backend: "python"\n'))
    source = model_dir / "1" / "model.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(MODEL_SOURCE.format(fault=fault))
    return source


def build_faulty_repository(root: Path, faults=tuple(FAULTS)) -> Path:
    """A Triton model repository ``<root>/faulty_repository`` with one Python model per fault."""
    repo = Path(root) / "faulty_repository"
    for fault in faults:
        write_python_model(repo / model_name(fault), fault)
    return repo
