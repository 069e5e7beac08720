"""config.pbtxt rendering: Triton's own protobuf schema accepts it, it agrees with the contract and
with the ONNX graph, it is deterministic, and a mismatching ONNX is rejected with a clear error."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2

from export import contract as C
from export.toy_model import TOY_CONTRACT, TOY_MODEL, build_toy_repository, mismatched_contract, wrong_contract_config
from export.triton_config import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_QUEUE_TIMEOUT_US,
    DEFAULT_SESSION_PARAMETERS,
    TritonConfigError,
    check_config_against_contract,
    check_config_against_onnx,
    contract_from_config,
    file_sha256,
    parse_config,
    recorded_sha256,
    render_config,
    write_config,
)

UNIVARIATE = C.ModelContract(prior_kind="univariate", P=20, Q=41, image_h=28, image_w=28, image_c=1,
                             config_id="abc123", preset="fmnist")
ONNX_DTYPE = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_UINT8": onnx.TensorProto.UINT8}


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    repo = build_toy_repository(tmp_path_factory.mktemp("cfg"))
    return repo / TOY_MODEL


@pytest.mark.parametrize("contract", [UNIVARIATE, TOY_CONTRACT], ids=["univariate", "mixture"])
def test_config_parses_with_triton_schema_and_follows_the_contract(contract):
    cfg = parse_config(render_config("kaem_x", contract, max_batch_size=128))
    assert cfg.name == "kaem_x" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 128
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        (C.INPUT_U, C.INPUT_U_DTYPE, [contract.u_dim])]
    hwc = [contract.image_h, contract.image_w, contract.image_c]
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output] == [
        (C.OUTPUT_IMAGES, C.OUTPUT_IMAGES_DTYPE, hwc), (C.OUTPUT_MEAN, C.OUTPUT_MEAN_DTYPE, hwc)]
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_AUTO, 1)]
    assert list(cfg.dynamic_batching.preferred_batch_size) == []  # the sweep's choice (batching_sweep.csv)
    sized = parse_config(render_config("kaem_x", contract, max_batch_size=128, preferred_batch_sizes=(64, 128, 256)))
    assert list(sized.dynamic_batching.preferred_batch_size) == [64, 128]  # 256 > max_batch_size is dropped
    assert cfg.dynamic_batching.max_queue_delay_microseconds == DEFAULT_MAX_QUEUE_DELAY_US
    assert cfg.version_policy.latest.num_versions == 1
    assert {k: p.string_value for k, p in cfg.parameters.items()} == {**DEFAULT_SESSION_PARAMETERS,
                                                                      **contract.to_metadata()}
    assert not cfg.HasField("optimization")  # no TensorRT accelerator by default: loads on CPU too
    assert contract_from_config(cfg) == contract


def test_a_seed_model_config_takes_seeds_caches_responses_and_warms_up_on_seeds():
    seed = dataclasses.replace(TOY_CONTRACT, inputs="seed")
    cfg = parse_config(render_config("kaem_x_seed", seed, max_batch_size=16))
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        (C.INPUT_SEED, "TYPE_INT64", [1]), (C.INPUT_TRUNCATION, "TYPE_FP32", [1])]
    assert cfg.response_cache.enable and contract_from_config(cfg) == seed
    assert [sorted(w.inputs) for w in cfg.model_warmup] == [[C.INPUT_SEED, C.INPUT_TRUNCATION]] * 2
    plain = parse_config(render_config("kaem_x", TOY_CONTRACT, max_batch_size=16))
    assert not plain.response_cache.enable  # a u model's requests are floats: no cache
    with pytest.raises(C.ContractError, match="input 'seed' is missing"):
        check_config_against_contract(plain, seed)
    with pytest.raises(C.ContractError, match="unknown input kind 'noise'"):
        dataclasses.replace(TOY_CONTRACT, inputs="noise").check_compatible()
    rows = C.request_rows([3, 4], seed, 0.7)
    assert rows[C.INPUT_SEED].dtype == np.int64 and rows[C.INPUT_SEED].shape == (2, 1)
    assert rows[C.INPUT_TRUNCATION].tolist() == [[np.float32(0.7)]] * 2
    assert C.request_rows([3, 4], TOY_CONTRACT, 0.7)[C.INPUT_U].shape == (2, TOY_CONTRACT.u_dim)


def test_bounded_queue_rejects_and_warm_up_runs_at_load():
    cfg = parse_config(render_config("kaem_x", TOY_CONTRACT, max_batch_size=64))
    # no queue policy by default (it stalls Triton 2.51's batcher: export/triton_config.py)
    assert (DEFAULT_MAX_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT_US) == (0, 0)
    assert not cfg.dynamic_batching.HasField("default_queue_policy")
    custom = parse_config(render_config("kaem_x", TOY_CONTRACT, max_queue_size=3, queue_timeout_us=500))
    policy = custom.dynamic_batching.default_queue_policy
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (3, 500)
    # warm-up: u = 0 (sanitised like any u) at batch 1 and at the largest batch, so both shapes are planned
    assert [(w.batch_size, list(w.inputs)) for w in cfg.model_warmup] == [(1, [C.INPUT_U]), (64, [C.INPUT_U])]
    for w in cfg.model_warmup:
        u = w.inputs[C.INPUT_U]
        assert u.zero_data and list(u.dims) == [TOY_CONTRACT.u_dim]
        assert model_config_pb2.DataType.Name(u.data_type) == C.INPUT_U_DTYPE
    with pytest.raises(TritonConfigError, match="must be >= 0"):
        render_config("kaem_x", TOY_CONTRACT, max_queue_size=-1)


def test_model_digests_are_recorded_per_version_and_configs_rewritten_only_on_change(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph bytes")
    digest = file_sha256(onnx_file)
    assert digest == hashlib.sha256(b"graph bytes").hexdigest()
    text = render_config("kaem_x", TOY_CONTRACT, artifacts={3: {"sha256": digest}, 2: {"sha256": "0" * 64}})
    assert recorded_sha256(parse_config(text)) == {2: "0" * 64, 3: digest}
    assert recorded_sha256(parse_config(render_config("kaem_x", TOY_CONTRACT))) == {}
    with pytest.raises(TritonConfigError, match="64 hex digits"):
        render_config("kaem_x", TOY_CONTRACT, artifacts={1: {"sha256": "not-a-digest"}})
    path = write_config(tmp_path, text)
    before = path.stat().st_mtime_ns, path.stat().st_ino
    write_config(tmp_path, text)  # same bytes: untouched, so a polling server does not reload
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    write_config(tmp_path, render_config("kaem_x", TOY_CONTRACT))
    assert path.stat().st_ino != before[1] and recorded_sha256(parse_config(path.read_text())) == {}


def test_rendering_is_deterministic():
    a = render_config("kaem_x", UNIVARIATE)
    assert a == render_config("kaem_x", UNIVARIATE) and a.endswith("\n") and not a.endswith("\n\n")
    keys = [ln.split('"')[1] for ln in a.splitlines() if ln.startswith("    key:")]  # the parameters' keys
    assert keys == sorted(keys) and len(keys) == len(UNIVARIATE.to_metadata()) + len(DEFAULT_SESSION_PARAMETERS)
    assert render_config("kaem_x", dataclasses.replace(UNIVARIATE, config_id="other")) != a
    custom = parse_config(render_config("kaem_x", UNIVARIATE, 8, preferred_batch_sizes=(8, 2, 4, 2),
                                        max_queue_delay_us=0))
    assert list(custom.dynamic_batching.preferred_batch_size) == [2, 4, 8]


def test_bad_arguments_and_misspelled_fields_are_rejected():
    with pytest.raises(TritonConfigError, match="max_batch_size must be >= 1"):
        render_config("kaem_x", UNIVARIATE, max_batch_size=0)
    with pytest.raises(TritonConfigError, match="does not parse"):
        parse_config(render_config("kaem_x", UNIVARIATE).replace("max_batch_size", "max_batch_sise"))


def test_config_contract_disagreements_are_named():
    wrong_version = parse_config(wrong_contract_config("kaem_x"))
    with pytest.raises(C.ContractError, match="contract 'kaem-serve-contract-v0'"):
        contract_from_config(wrong_version)
    cfg = parse_config(render_config("kaem_x", TOY_CONTRACT))
    cfg.input[0].dims[0] = TOY_CONTRACT.u_dim + 1
    cfg.output[0].data_type = model_config_pb2.TYPE_FP32
    with pytest.raises(C.ContractError, match=r"input 'u' has dims \[9\].*output 'images' has data_type TYPE_FP32"):
        check_config_against_contract(cfg, TOY_CONTRACT)


def test_config_agrees_with_the_onnx_graph(toy_model):
    onnx_path = toy_model / "1" / "model.onnx"
    text = (toy_model / "config.pbtxt").read_text()
    assert check_config_against_onnx(text, onnx_path) == TOY_CONTRACT
    model = onnx.load(str(onnx_path))
    cfg = parse_config(text)
    graph = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.output]}
    for t in [*cfg.input, *cfg.output]:
        assert graph[t.name].elem_type == ONNX_DTYPE[model_config_pb2.DataType.Name(t.data_type)]
        dims = graph[t.name].shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(t.dims)
    assert model.ir_version <= 10
    assert {p.key: p.value for p in model.metadata_props} | TOY_CONTRACT.to_metadata() == {
        p.key: p.value for p in model.metadata_props}


def test_mismatching_onnx_is_rejected_with_a_clear_error(toy_model):
    onnx_path = toy_model / "1" / "model.onnx"
    bigger = render_config(TOY_MODEL, mismatched_contract())
    with pytest.raises(TritonConfigError, match=r"output 'images': graph shape \['batch', 12, 12, 1\].*kaem\.image_h"):
        check_config_against_onnx(bigger, onnx_path)
    renamed = render_config(TOY_MODEL, TOY_CONTRACT).replace('name: "mean"', 'name: "decoder_mean"')
    with pytest.raises(TritonConfigError,
                       match=r"graph outputs \[.mean.\] are not in the config.*.decoder_mean. is not"):
        check_config_against_onnx(renamed, onnx_path)
    other_id = render_config(TOY_MODEL, dataclasses.replace(TOY_CONTRACT, config_id="retrained"))
    with pytest.raises(TritonConfigError, match="metadata kaem.config_id: ONNX has 'toy00000', config has 'retrained'"):
        check_config_against_onnx(other_id, onnx_path)


def test_shim_checks_the_sha256_the_export_recorded(tmp_path) -> None:
    # A version that appears on a running server (poll/explicit mode) is checked against the export's record
    # as the launcher checks every version at startup: the shim reads the record from the config as Triton hands
    # it over (JSON), under the key the export writes.
    from google.protobuf import json_format

    from serving.local.ort_shim import check_recorded_sha256

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"the exported graph")
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    text = render_config("kaem_x", UNIVARIATE, artifacts={2: {"sha256": digest}})
    cfg = json_format.MessageToDict(parse_config(text), preserving_proto_field_name=True)
    assert check_recorded_sha256(cfg, "2", str(graph)) is None
    assert check_recorded_sha256(cfg, "3", str(graph)) is None  # no record: not checked (a hand-placed version)
    graph.write_bytes(b"the exported graph, damaged")
    problem = check_recorded_sha256(cfg, "2", str(graph))
    assert problem is not None and problem.startswith(f"{graph} has sha256 ") and f"not the {digest[:16]}" in problem


def test_shim_session_options_equal_the_config_parameters() -> None:
    # One source of serving settings: the local shim builds its onnxruntime session from the config's
    # parameters, the same keys the NGC image's native onnxruntime backend reads.
    import onnxruntime as ort
    from google.protobuf import json_format

    from serving.local.ort_shim import session_options

    def as_triton_json(text: str) -> dict:
        return json_format.MessageToDict(parse_config(text), preserving_proto_field_name=True)

    default = as_triton_json(render_config("kaem_x", UNIVARIATE))
    assert {k: v["string_value"] for k, v in default["parameters"].items() if not k.startswith("kaem.")} == \
        DEFAULT_SESSION_PARAMETERS
    for settings in ({}, {"intra_op_thread_count": "3", "inter_op_thread_count": "2", "execution_mode": "1",
                          "enable_mem_arena": "0", "enable_mem_pattern": "false",
                          "session.intra_op.allow_spinning": "1"}):
        cfg = as_triton_json(render_config("kaem_x", UNIVARIATE, session=settings))
        want = {**DEFAULT_SESSION_PARAMETERS, **settings}
        opts = session_options(cfg)
        assert opts.intra_op_num_threads == int(want["intra_op_thread_count"])
        assert opts.inter_op_num_threads == int(want["inter_op_thread_count"])
        assert opts.execution_mode == (ort.ExecutionMode.ORT_PARALLEL if want["execution_mode"] == "1"
                                       else ort.ExecutionMode.ORT_SEQUENTIAL)
        assert opts.enable_cpu_mem_arena == (want["enable_mem_arena"] == "1")
        assert opts.enable_mem_pattern == (want["enable_mem_pattern"] == "1")
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == \
            ("1" if want["session.intra_op.allow_spinning"] == "1" else "0")
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(TritonConfigError, match="unknown onnxruntime session settings"):
        render_config("kaem_x", UNIVARIATE, session={"intra_op_threads": "2"})
    with pytest.raises(ValueError, match="execution_mode"):
        session_options(as_triton_json(render_config("kaem_x", UNIVARIATE, session={"execution_mode": "2"})))


def test_tensorrt_accelerator_config_parses() -> None:
    # gpu-marked tests serve this config on a GPU (tests/test_gpu.py); here: it is valid Triton config
    cfg = parse_config(render_config("kaem_x", UNIVARIATE, tensorrt=True))
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and dict(acc.parameters) == {"precision_mode": "FP32", "trt_engine_cache_enable": "1"}
    assert contract_from_config(cfg) == UNIVARIATE
