"""Python-based ``onnxruntime`` backend for the local (CPU, no Docker) Triton server: the launcher
copies this file to ``<backend dir>/onnxruntime/model.py`` so configs saying
``backend: "onnxruntime"`` load unchanged; the NGC image uses its native backend instead.

Triton hands ``execute`` every request of one dynamic batch: they are validated, concatenated,
run through onnxruntime once, and split back, each request getting only the outputs it asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

try:  # only importable inside the Triton Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by tests / linters
    pb_utils = None

_NP_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
              "TYPE_UINT8": np.uint8, "TYPE_INT8": np.int8, "TYPE_INT32": np.int32,
              "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_}


def check_input(name: str, array: np.ndarray | None, dtype: np.dtype, dims: Sequence[int]) -> str | None:
    """Why ``array`` is not a valid batch for input ``name`` (``None`` when it is)."""
    if array is None:
        return f"input {name!r} is missing"
    if array.dtype != dtype:
        return f"input {name!r} must be {np.dtype(dtype).name}, got {array.dtype.name}"
    want = tuple(dims)
    if array.ndim == len(want) and len(want) > 0:
        # Triton 2.51 keeps a request's batch size modulo 2^32 and hands a batch of 0 to the model without its
        # batch dimension: a declared batch of 0 (or 2^32, 2^33, ...) whose bytes fit one row arrives here so.
        return (f"input {name!r} has no batch dimension: got shape {list(array.shape)}, expected [batch,"
                f" {', '.join(map(str, want))}] (the request declared a batch size of 0, or a multiple of 2^32"
                " that the server reads as 0; send 1 to max_batch_size rows)")
    if array.ndim != len(want) + 1 or any(w != -1 and w != g for w, g in zip(want, array.shape[1:], strict=True)):
        return f"input {name!r} must have shape [batch, {', '.join(map(str, want))}], got {list(array.shape)}"
    if array.shape[0] < 1:
        return f"input {name!r} has an empty batch"
    return None


def run_merged(
    session, inputs: list[dict[str, np.ndarray]], output_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Run several requests' inputs as one batch and split every output back per request."""
    sizes = [next(iter(x.values())).shape[0] for x in inputs]
    feed = {k: np.concatenate([x[k] for x in inputs]) if len(inputs) > 1 else inputs[0][k] for k in inputs[0]}
    outs = session.run(list(output_names), feed)
    bounds = np.cumsum(sizes)[:-1]
    parts = [np.split(o, bounds) for o in outs]
    return [{n: np.ascontiguousarray(p[i]) for n, p in zip(output_names, parts, strict=True)}
            for i in range(len(sizes))]


def _flag(key: str, value: str) -> bool:
    if value.lower() in ("1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise ValueError(f"parameter {key!r} must be 0/1 or true/false, got {value!r}")


def session_options(model_config: dict):  # -> onnxruntime.SessionOptions
    """onnxruntime session options from a model config (Triton's JSON form), read from the same
    ``parameters`` keys and ``optimization.graph.level`` as the native onnxruntime backend, so that one
    ``config.pbtxt`` tunes both (export/triton_config.py: DEFAULT_SESSION_PARAMETERS)."""
    import onnxruntime as ort

    params = {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}
    opts = ort.SessionOptions()
    try:
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count", "0"))
        mode = int(params.get("execution_mode", "0"))
    except ValueError as err:
        raise ValueError(f"thread counts and execution_mode must be integers: {err}") from err
    if mode not in (0, 1):
        raise ValueError(f"execution_mode must be 0 (sequential) or 1 (parallel), got {mode}")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if mode == 0 else ort.ExecutionMode.ORT_PARALLEL
    if "enable_mem_arena" in params:
        opts.enable_cpu_mem_arena = _flag("enable_mem_arena", params["enable_mem_arena"])
    if "enable_mem_pattern" in params:
        opts.enable_mem_pattern = _flag("enable_mem_pattern", params["enable_mem_pattern"])
    spin = params.get("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if _flag("allow_spinning", spin) else "0")
    level = int(((model_config.get("optimization") or {}).get("graph") or {}).get("level", 0))
    opts.graph_optimization_level = {-1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL}.get(
                                         level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return opts


# export.triton_config.ARTIFACT_KEY for the sha256 kaem-export records of each version's model.onnx
SHA256_KEY = "artifact.sha256.{version}"


def check_recorded_sha256(model_config: dict, version: str, path: str) -> str | None:
    """Why the graph at ``path`` must not be served (``None`` when it may): its sha256 differs from the one the
    export recorded for ``version`` in the config's parameters. A version without a record is not checked."""
    want = (model_config.get("parameters") or {}).get(SHA256_KEY.format(version=version), {}).get("string_value")
    if not want:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got == want:
        return None
    return (f"{path} has sha256 {got[:16]}..., not the {want[:16]}... its export recorded: the file changed after "
            "the export (a partial copy or a damaged disk); this version is not served, export it again")


def _invalid_argument(message: str):
    """A request error with Triton's INVALID_ARG code (a plain ``TritonError`` is INTERNAL: gRPC INTERNAL,
    HTTP 500, which tells the client the server failed rather than its request)."""
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


class TritonPythonModel:
    """onnxruntime (CPU) behind Triton's Python backend; one session per model instance."""

    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        filename = cfg.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"no ONNX file at {path}: export the model first")
        problem = check_recorded_sha256(cfg, args["model_version"], path)
        if problem:  # a version that appears on a running server (poll/explicit mode) is checked like at startup
            raise pb_utils.TritonModelException(problem)
        try:
            opts = session_options(cfg)
        except ValueError as err:
            raise pb_utils.TritonModelException(f"{cfg.get('name')}: {err}") from err
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {t["name"]: (_NP_DTYPES[t["data_type"]], [int(d) for d in t["dims"]]) for t in cfg["input"]}
        self.outputs = [t["name"] for t in cfg["output"]]
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        if set(self.inputs) != graph_in or not set(self.outputs) <= graph_out:
            raise pb_utils.TritonModelException(
                f"config tensors (inputs {sorted(self.inputs)}, outputs {self.outputs}) do not match"
                f" {path} (inputs {sorted(graph_in)}, outputs {sorted(graph_out)})"
            )
        self._warm_up(max(1, int(cfg.get("max_batch_size", 1))))

    def _warm_up(self, max_batch: int) -> None:
        # onnxruntime's first run at a new batch size allocates and plans (tens of ms): pay for the
        # smallest and the largest batch at load time instead of on the first requests.
        if all(d > 0 for _, dims in self.inputs.values() for d in dims):
            for batch in sorted({1, max_batch}):
                feed = {n: np.full((batch, *dims), 0.5, dtype=dt) for n, (dt, dims) in self.inputs.items()}
                self.session.run(self.outputs, feed)

    def _read(self, request) -> tuple[dict[str, np.ndarray] | None, str | None]:
        feed = {}
        for name, (dtype, dims) in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            array = None if tensor is None else tensor.as_numpy()
            err = check_input(name, array, dtype, dims)
            if err:
                return None, err
            feed[name] = array
        sizes = {a.shape[0] for a in feed.values()}
        if len(sizes) != 1:
            return None, f"inputs disagree on the batch size: {sorted(sizes)}"
        return feed, None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good, feeds, wanted = [], [], []
        for i, request in enumerate(requests):
            feed, err = self._read(request)
            if err:  # a malformed request: INVALID_ARGUMENT (gRPC) / 400 (HTTP), as Triton's own checks answer
                responses[i] = pb_utils.InferenceResponse(error=_invalid_argument(err))
                continue
            names = [n for n in request.requested_output_names() if n in self.outputs] or self.outputs
            good.append(i)
            feeds.append(feed)
            wanted.append(names)
        if good:
            union = [n for n in self.outputs if any(n in w for w in wanted)]
            try:
                results = run_merged(self.session, feeds, union)
            except Exception as err:  # noqa: BLE001 - any onnxruntime failure becomes a request error
                results = None
                message = f"onnxruntime failed on a batch of {len(good)} requests: {err}"
            for k, i in enumerate(good):
                if results is None:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                else:
                    tensors = [pb_utils.Tensor(n, results[k][n]) for n in wanted[k]]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.session = None
