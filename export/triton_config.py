"""Triton ``config.pbtxt`` for a served KAEM graph: render it from the contract, parse it with
Triton's own protobuf schema, read the contract back, and check it against an ONNX file.

One config serves both places: the NGC image's native onnxruntime backend (GPU) and the local
Python-based ``onnxruntime`` shim that ``serving/local/launcher.py`` installs (CPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import text_encoding, text_format
from tritonclient.grpc import model_config_pb2

from export.contract import (
    DEFAULT_MAX_BATCH_SIZE,
    INPUT_SEED,
    INPUT_SEED_DTYPE,
    INPUT_TRUNCATION,
    INPUT_TRUNCATION_DTYPE,
    INPUT_U,
    INPUT_U_DTYPE,
    METADATA_PREFIX,  # key prefix of ModelContract.to_metadata()
    OUTPUT_IMAGES,
    OUTPUT_IMAGES_DTYPE,
    OUTPUT_MEAN,
    OUTPUT_MEAN_DTYPE,
    ContractError,
    ModelContract,
)
from training.errors import KaemError
from training.io import atomic_write_text

# Dynamic-batching defaults, CPU-tuned: chosen by `python benchmarks/batching_sweep.py` on the default
# model with the local server and perf_analyzer sharing this 2-core machine (benchmarks/results/
# batching_sweep.csv): batch-1 requests at concurrency 1/16/64 for queue delays 0/100/500/2000 µs, with
# and without preferred sizes 64/128/256. A delay is paid in full at low load (concurrency-1 p50 0.72-0.80
# ms at 0 µs, 0.91-0.98 at 100, 1.45-1.77 at 500, 3.5-3.8 at 2,000) and bought nothing at 64 in flight
# (4,045-4,689 inferences/s, every setting within the noise), since the batcher already merges what
# queued during the previous execution (average batch 22-31 at 64 in flight). Preferred sizes made no
# measurable difference here; the sweep's rule (best concurrency-64 throughput within 5 % of the old
# defaults' concurrency-1 p50) picked none. Re-run the sweep for a GPU deployment.
DEFAULT_PREFERRED_BATCH_SIZES: tuple[int, ...] = ()
DEFAULT_MAX_QUEUE_DELAY_US = 0
# Overload control: a bounded queue (max_queue_size requests) whose overflow, and requests waiting longer than
# queue_timeout_us, are rejected at once (the client's --retries backs off and tries again). Off by default (0, 0:
# no default_queue_policy block): on the local Triton 2.51 any of max_queue_size, default_timeout_microseconds or
# allow_timeout_override in the policy made the dynamic batcher wait ~500 ms between executions in about half of
# the bursts of 8 batch-64 requests measured (none without the block), so requests in flight at a SIGTERM timed out
# instead of draining (tests/serving_tests/test_drain.py). The cause is in Triton's core (read at r24.10 = 2.51 and at
# core main of 2026-06): any of the three turns off payload prefetching (PriorityQueue: support_prefetching_), so
# the batcher forms a batch only while a model instance waits for one (DynamicBatchScheduler::
# WaitForPayloadSlotAvailable, a 500 ms wait on its condition variable). An instance that finishes and waits again
# (RateLimiter::DequeuePayload) does not signal that variable; only a new request or the 500 ms timer wakes the
# batcher. Under steady closed-loop load the next request comes soon; after a burst or during a drain, queued
# requests sit out the timer. The production image runs the same core. Set them with `kaem-export --max-queue-size
# N --queue-timeout-us T` once a deployment's Triton has been measured with them (benchmarks/overload.py).
DEFAULT_MAX_QUEUE_SIZE = 0
DEFAULT_QUEUE_TIMEOUT_US = 0
# What the export records about each version it keeps, as parameters "artifact.<name>.<version>": "sha256", the
# digest of its model.onnx (the local launcher refuses a file that no longer matches: serving/local/launcher.py);
# "canary", the digest of its images for the canary seeds (kaem-canary compares the served ones after a rollout).
ARTIFACT_KEY = "artifact.{name}.{version}"
ARTIFACTS = ("sha256", "canary")

# onnxruntime session settings: one source for both backends. The NGC image's native onnxruntime backend
# reads these `parameters` keys (its README, "Model Config Options"), and serving/local/ort_shim.py builds its
# session from the same keys (session_options()). CPU-tuned on this 2-core machine: intra-op threads 0 =
# onnxruntime's default, one per physical core; sequential execution (the graph is a chain, nothing runs
# in parallel across nodes). ALLOW_SPINNING is read by the local shim only (the native backend keeps
# onnxruntime's default): its idle threads must not busy-wait on cores shared with the clients.
ALLOW_SPINNING = "session.intra_op.allow_spinning"
DEFAULT_SESSION_PARAMETERS: dict[str, str] = {
    "intra_op_thread_count": "0",
    "inter_op_thread_count": "1",
    "execution_mode": "0",
    "enable_mem_arena": "1",
    "enable_mem_pattern": "1",
    ALLOW_SPINNING: "0",
}

BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"

def io_tensors(contract: ModelContract) -> tuple[tuple[str, str, str, tuple[int, ...]], ...]:
    """(section, name, Triton dtype, dims without the batch) of every tensor a model of ``contract`` has."""
    image = (contract.image_h, contract.image_w, contract.image_c)
    inputs = (("input", INPUT_U, INPUT_U_DTYPE, (contract.u_dim,)),) if contract.inputs == "u" else (
        ("input", INPUT_SEED, INPUT_SEED_DTYPE, (1,)), ("input", INPUT_TRUNCATION, INPUT_TRUNCATION_DTYPE, (1,)))
    return (*inputs, ("output", OUTPUT_IMAGES, OUTPUT_IMAGES_DTYPE, image),
            ("output", OUTPUT_MEAN, OUTPUT_MEAN_DTYPE, image))

# ONNX TensorProto element types -> Triton dtypes (only those a KAEM graph can carry).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64"}


class TritonConfigError(KaemError):
    """A ``config.pbtxt`` is malformed or disagrees with the contract or the ONNX graph."""


def _tensor_block(name: str, dtype: str, dims: Sequence[int]) -> str:
    return (
        "  {\n"
        f'    name: "{name}"\n'
        f"    data_type: {dtype}\n"
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
        "  }"
    )


def render_config(
    model_name: str,
    contract: ModelContract,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    session: Mapping[str, str] | None = None,
    tensorrt: bool = False,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    queue_timeout_us: int = DEFAULT_QUEUE_TIMEOUT_US,
    artifacts: Mapping[int, Mapping[str, str]] | None = None,
    warmup: bool = True,
) -> str:
    """The production ``config.pbtxt`` text for ``model_name`` (deterministic, trailing newline).

    ``max_batch_size``: largest batch (rows of ``u``) one request or one merged batch may hold;
    ``preferred_batch_sizes``: batch sizes the dynamic batcher aims for (values above
    ``max_batch_size`` are dropped); ``max_queue_delay_us``: longest a request waits (µs) for others;
    ``session``: onnxruntime session settings overriding DEFAULT_SESSION_PARAMETERS' values;
    ``tensorrt``: run the graph through onnxruntime's TensorRT execution provider on GPUs (FP32 engines, so
    images stay within a grey level of eager; engines cached next to the model). Off by default: the native
    backend then uses the CUDA provider on GPUs and the CPU one elsewhere. ``max_queue_size`` requests at most
    wait (0: unbounded) and one waiting ``queue_timeout_us`` (0: no limit) is rejected (both 0: no queue policy,
    see DEFAULT_MAX_QUEUE_SIZE); ``artifacts``:
    {version: {"sha256": of its model.onnx, "canary": of its canary images}} to record (64 hex digits each).
    ``warmup``: two warm-up requests (batch 1 and max_batch_size,
    u = 0) run at every load, so the first real request after a load or a version swap is not a cold one
    (benchmarks/model_updates.py measures both).
    """
    contract.check_compatible()
    if max_batch_size < 1:
        raise TritonConfigError(f"max_batch_size must be >= 1 (batch is dimension 0), got {max_batch_size}")
    if max_queue_delay_us < 0 or max_queue_size < 0 or queue_timeout_us < 0:
        raise TritonConfigError(f"max_queue_delay_us, max_queue_size and queue_timeout_us must be >= 0, got "
                                f"{max_queue_delay_us}, {max_queue_size}, {queue_timeout_us}")
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})
    blocks = {"input": [], "output": []}
    for section, name, dtype, dims in io_tensors(contract):
        blocks[section].append(_tensor_block(name, dtype, dims))
    unknown = sorted(set(session or {}) - set(DEFAULT_SESSION_PARAMETERS))
    if unknown:
        raise TritonConfigError(f"unknown onnxruntime session settings {unknown}; "
                          f"known: {sorted(DEFAULT_SESSION_PARAMETERS)}")
    settings = {**DEFAULT_SESSION_PARAMETERS, **(session or {})}
    params = ",\n".join(
        f'  {{\n    key: "{text_encoding.CEscape(k, as_utf8=True)}"\n'
        f'    value: {{ string_value: "{text_encoding.CEscape(v, as_utf8=True)}" }}\n  }}'
        for k, v in sorted({**settings, **contract.to_metadata(), **_artifact_parameters(artifacts)}.items())
    )
    inputs, outputs = ",\n".join(blocks["input"]), ",\n".join(blocks["output"])
    batching = f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
    if max_queue_size or queue_timeout_us:
        batching += ("  default_queue_policy {\n    timeout_action: REJECT\n"
                     f"    default_timeout_microseconds: {queue_timeout_us}\n    allow_timeout_override: true\n"
                     f"    max_queue_size: {max_queue_size}\n  }}\n")
    if preferred:
        batching = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" + batching
    # zeros: u = 0 (clamped in the graph), or seed 0 at T = 0 (every ITS uniform 0.5)
    zeros = "\n".join(f'    inputs {{\n      key: "{name}"\n      value: {{ data_type: {dtype} dims: [ '
                      f'{", ".join(map(str, dims))} ] zero_data: true }}\n    }}'
                      for section, name, dtype, dims in io_tensors(contract) if section == "input")
    warmups = "model_warmup [\n" + ",\n".join(
        f'  {{\n    name: "{contract.inputs}_zeros_batch_{b}"\n    batch_size: {b}\n{zeros}\n  }}'
        for b in sorted({1, max_batch_size})
    ) + "\n]\n" if warmup else ""
    # A seed model is a pure function of its request: Triton's response cache (the server needs --cache-config,
    # which kaem-serve passes) answers a repeated request without running the graph.
    cache = "response_cache {\n  enable: true\n}\n" if contract.inputs == "seed" else ""
    optimization = ""
    if tensorrt:
        optimization = (
            "optimization { execution_accelerators {\n  gpu_execution_accelerator : [ {\n"
            '    name : "tensorrt"\n    parameters { key: "precision_mode" value: "FP32" }\n'
            '    parameters { key: "trt_engine_cache_enable" value: "1" }\n  } ]\n}}\n'
        )
    return (
        "# Rendered by export/triton_config.py from the model contract: re-render, never edit by hand.\n"
        f'name: "{model_name}"\n'
        f'backend: "{BACKEND}"\n'
        f"max_batch_size: {max_batch_size}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        # KIND_AUTO: one instance per GPU where there are GPUs, a CPU instance otherwise.
        "instance_group [\n  {\n    kind: KIND_AUTO\n    count: 1\n  }\n]\n"
        f"dynamic_batching {{\n{batching}}}\n"
        f"{cache}"
        f"{warmups}"
        f"{optimization}"
        f"parameters [\n{params}\n]\n"
    )


def _artifact_parameters(artifacts: Mapping[int, Mapping[str, str]] | None) -> dict[str, str]:
    out = {}
    for version, record in (artifacts or {}).items():
        for name, digest in record.items():
            if not (isinstance(version, int) and version > 0 and name in ARTIFACTS and len(digest) == 64
                    and all(c in "0123456789abcdef" for c in digest)):
                raise TritonConfigError(f"artifacts need {{version >= 1: {{{'|'.join(ARTIFACTS)}: 64 hex digits}}}}, "
                                        f"got {version!r}: {name!r}: {digest!r}")
            out[ARTIFACT_KEY.format(name=name, version=version)] = digest
    return out


def recorded_artifacts(cfg: model_config_pb2.ModelConfig) -> dict[int, dict[str, str]]:
    """{version: {name: digest}} as the export recorded them in the config's parameters."""
    found: dict[int, dict[str, str]] = {}
    for key, p in cfg.parameters.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "artifact" and parts[1] in ARTIFACTS and parts[2].isdigit():
            found.setdefault(int(parts[2]), {})[parts[1]] = p.string_value
    return found


def recorded_sha256(cfg: model_config_pb2.ModelConfig) -> dict[int, str]:
    """{version: sha256 of its model.onnx} as the export recorded them."""
    return {v: a["sha256"] for v, a in recorded_artifacts(cfg).items() if "sha256" in a}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse config text with Triton's protobuf schema; misspelled fields raise :class:`TritonConfigError`."""
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise TritonConfigError(f"config.pbtxt does not parse with Triton's schema: {err}") from err


def contract_from_config(cfg: model_config_pb2.ModelConfig) -> ModelContract:
    """The :class:`ModelContract` carried in a config's ``parameters`` (raises ``ContractError``),
    checked against the config's own tensors."""
    meta = {k: p.string_value for k, p in cfg.parameters.items()}
    contract = ModelContract.from_metadata(meta)
    check_config_against_contract(cfg, contract)
    return contract


def check_config_against_contract(cfg: model_config_pb2.ModelConfig, contract: ModelContract) -> None:
    """Raise ``ContractError`` unless the config's tensors have the contract's names, dtypes and dims."""
    problems: list[str] = []
    if cfg.max_batch_size < 1:
        problems.append(f"max_batch_size is {cfg.max_batch_size}; the contract needs batch as dimension 0")
    have = {("input", t.name): t for t in cfg.input} | {("output", t.name): t for t in cfg.output}
    for section, name, dtype, dims in io_tensors(contract):
        t = have.get((section, name))
        if t is None:
            problems.append(f"{section} {name!r} is missing")
            continue
        got_dtype = model_config_pb2.DataType.Name(t.data_type)
        if got_dtype != dtype:
            problems.append(f"{section} {name!r} has data_type {got_dtype}, the contract says {dtype}")
        if tuple(t.dims) != dims:
            problems.append(f"{section} {name!r} has dims {list(t.dims)}, the contract says {list(dims)}")
    if problems:
        raise ContractError(f"model config {cfg.name!r} disagrees with its contract: " + "; ".join(problems))


def _onnx_tensors(values) -> dict[str, tuple[str, list[int | str]]]:
    out = {}
    for v in values:
        tt = v.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in tt.shape.dim]
        out[v.name] = (_ONNX_TO_TRITON.get(tt.elem_type, f"onnx-type-{tt.elem_type}"), dims)
    return out


def check_config_against_onnx(config_text: str, onnx_path: str | Path) -> ModelContract:
    """Check that a config and an ONNX file agree on tensor names, dtypes, shapes (dimension 0
    dynamic) and contract metadata; return the contract or raise :class:`TritonConfigError` listing every
    disagreement."""
    import onnx  # deferred: clients that only read configs need not import onnx

    cfg = parse_config(config_text)
    problems: list[str] = []
    try:
        contract = contract_from_config(cfg)
    except ContractError as err:
        problems.append(str(err))
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph_in = _onnx_tensors(i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer})
    graph_out = _onnx_tensors(model.graph.output)
    for section, tensors, graph in (("input", cfg.input, graph_in), ("output", cfg.output, graph_out)):
        extra = sorted(set(graph) - {t.name for t in tensors})
        if extra:
            problems.append(f"graph {section}s {extra} are not in the config")
        for t in tensors:
            if t.name not in graph:
                problems.append(f"config {section} {t.name!r} is not a graph {section} (graph has {sorted(graph)})")
                continue
            dtype, dims = graph[t.name]
            want = model_config_pb2.DataType.Name(t.data_type)
            if dtype != want:
                problems.append(f"{section} {t.name!r}: graph dtype {dtype}, config {want}")
            if not dims or isinstance(dims[0], int) and dims[0] > 0:
                problems.append(f"{section} {t.name!r}: graph dimension 0 is {dims[:1]}, not a dynamic batch")
            if dims[1:] != list(t.dims):
                problems.append(f"{section} {t.name!r}: graph shape {dims}, config dims [batch, {list(t.dims)}]")
    onnx_meta = {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    cfg_meta = {k: p.string_value for k, p in cfg.parameters.items() if k.startswith(METADATA_PREFIX)}
    for key in sorted(onnx_meta.keys() | cfg_meta.keys()):
        if onnx_meta.get(key) != cfg_meta.get(key):
            problems.append(f"metadata {key}: ONNX has {onnx_meta.get(key)!r}, config has {cfg_meta.get(key)!r}")
    if problems:
        raise TritonConfigError(f"{onnx_path} does not match its config {cfg.name!r}: " + "; ".join(problems))
    return contract


def version_dirs(model_dir: str | Path, model_file: str | None = "model.onnx") -> list[Path]:
    """The numbered version folders of a model in a Triton repository, oldest first; with ``model_file``, only
    those holding it (the placeholder folders a rollback or a fresh checkout leaves are skipped)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    return sorted((p for p in found if model_file is None or (p / model_file).is_file()), key=lambda p: int(p.name))


def write_config(model_dir: str | Path, text: str) -> Path:
    """Write ``<model_dir>/config.pbtxt`` atomically (a running server never reads half a file), and only when
    its bytes change: a server polling the repository reloads the model on every rewrite."""
    parse_config(text)
    path = Path(model_dir) / "config.pbtxt"
    if path.is_file() and path.read_bytes() == text.encode():
        return path
    return atomic_write_text(path, text)
