"""A deliberately leaking served model, for the soak benchmark's test only: a Triton Python-backend model
(``backend: "python"``; the test copies this file to ``<repository>/<model>/1/model.py``) that speaks the served
contract's tensors (``u`` in; ``images`` and ``mean`` out, shaped as its config says) and keeps a 16 KB copy of
every request's input forever, as a cache that never evicts would. Its images are flat grey: only its memory matters.
"""

from __future__ import annotations

import json

import numpy as np

try:  # only importable inside the Triton Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by tests / linters
    pb_utils = None

KEPT_BYTES_PER_REQUEST = 16 * 1024


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        self.input = cfg["input"][0]["name"]
        self.outputs = {t["name"]: ({"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32}[t["data_type"]],
                                    [int(d) for d in t["dims"]]) for t in cfg["output"]}
        self.kept: list[np.ndarray] = []  # the leak

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            u = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            # a real copy that touches every page (calloc'ed zeros would not count in RSS until written)
            self.kept.append(np.resize(np.ascontiguousarray(u).view(np.uint8), KEPT_BYTES_PER_REQUEST))
            tensors = [pb_utils.Tensor(name, np.full((u.shape[0], *dims), 0.5 if dtype == np.float32 else 128,
                                                     dtype=dtype))
                       for name, (dtype, dims) in self.outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.kept.clear()
