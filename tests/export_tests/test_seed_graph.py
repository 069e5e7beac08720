"""The in-graph seed -> u subgraph (export/seed_graph.py): bit-identical to training.uniforms.seeds_to_u for
several u layouts, small, huge and 2**32-boundary seeds, per-row truncation; free of the UINT64 Add/Mul that
Triton 24.10's onnxruntime lacks; and composed in front of a real exported graph, the same images as the u
graph given seeds_to_u."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.contract import INPUT_U, OUTPUT_IMAGES, OUTPUT_MEAN, ContractError, ModelContract
from export.seed_graph import (
    INPUT_SEED,
    INPUT_TRUNCATION,
    build_seed_graph,
    build_seed_model,
    with_seed_inputs,
)
from training.uniforms import MAX_SEED, seeds_to_u

SEEDS = [*range(1024), MAX_SEED, MAX_SEED - 1, 2**62, 2**32 - 1, 2**32, 2**32 + 1]
LAYOUTS = [(20, 0), (82, 41), (9, 0), (4, 0), (10, 5)]


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def feeds(seeds: list[int], truncation: float | list[float]) -> dict[str, np.ndarray]:
    t = np.broadcast_to(np.asarray(truncation, dtype=np.float32), (len(seeds),))
    return {INPUT_SEED: np.array(seeds, dtype=np.int64)[:, None], INPUT_TRUNCATION: t[:, None].copy()}


def reference(seeds: list[int], dim: int, its_start: int, truncation: float | list[float]) -> np.ndarray:
    """seeds_to_u row by row, at the float32 value of T (the served input is FP32)."""
    ts = np.broadcast_to(np.asarray(truncation, dtype=np.float32), (len(seeds),))
    rows = [seeds_to_u([s], dim, its_start, float(t))[0] for s, t in zip(seeds, ts, strict=True)]
    return np.stack(rows)


def assert_bitwise_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(("dim", "its_start"), LAYOUTS)
@pytest.mark.parametrize("truncation", [1.0, 0.7])
def test_seed_graph_matches_seeds_to_u(dim: int, its_start: int, truncation: float) -> None:
    model = build_seed_model(dim, its_start)
    onnx.checker.check_model(model, full_check=True)
    (u,) = session(model).run([INPUT_U], feeds(SEEDS, truncation))
    assert_bitwise_equal(u, seeds_to_u(SEEDS, dim, its_start, truncation))
    if truncation == 1.0:  # no rounding of T involved: the plain generator
        assert_bitwise_equal(u, seeds_to_u(SEEDS, dim, its_start))
    else:
        assert np.array_equal(u[:, :its_start], seeds_to_u(SEEDS, dim, its_start)[:, :its_start])


def test_truncation_is_per_row() -> None:
    """Triton batches rows of different requests: each row keeps its own T, and T = 1 rows are untouched."""
    seeds = SEEDS[:40] + SEEDS[-6:]
    ts = [(1.0, 0.7, 0.5, 0.999, 0.05)[i % 5] for i in range(len(seeds))]
    for dim, its_start in [(82, 41), (20, 0)]:
        (u,) = session(build_seed_model(dim, its_start)).run([INPUT_U], feeds(seeds, ts))
        assert_bitwise_equal(u, reference(seeds, dim, its_start, ts))


def test_no_uint64_add_or_mul() -> None:
    """onnxruntime 1.19.2 (Triton 24.10) has no CPU Add/Mul/Sub/Div kernels for UINT64: the graph must not need
    them, or it loads here and fails in the production server."""
    model = onnx.shape_inference.infer_shapes(build_seed_model(82, 41), strict_mode=True)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types |= {t.name: t.data_type for t in g.initializer}
    arith = [n for n in g.node if n.op_type in ("Add", "Sub", "Mul", "Div")]
    assert arith and all(types[n.input[0]] != TensorProto.UINT64 for n in arith)
    shifts = [n for n in g.node if n.op_type == "BitShift"]
    assert len(shifts) == 7 and all(types[n.input[0]] == TensorProto.UINT64 for n in shifts)
    assert {n.op_type for n in g.node} <= {"Cast", "Add", "Sub", "Mul", "Div", "BitShift", "BitwiseXor", "Equal",
                                           "Not", "And", "Where"}


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError):
        build_seed_graph(0, 0)
    with pytest.raises(ValueError):
        build_seed_graph(4, 5)
    with pytest.raises(ValueError):
        build_seed_model(4, 0, opset=17)


def toy_served(dim: int, opset: int = 18) -> onnx.ModelProto:
    """A stand-in served graph: mean = u, images = uint8(u * 255)."""
    nodes = [helper.make_node("Identity", [INPUT_U], [OUTPUT_MEAN]),
             helper.make_node("Mul", [INPUT_U, "scale"], ["scaled"]),
             helper.make_node("Cast", ["scaled"], [OUTPUT_IMAGES], to=TensorProto.UINT8)]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info(INPUT_U, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(OUTPUT_IMAGES, TensorProto.UINT8, ["batch", dim]),
         helper.make_tensor_value_info(OUTPUT_MEAN, TensorProto.FLOAT, ["batch", dim])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_compose_in_front_of_a_toy_graph_with_a_selection_layout() -> None:
    seeds, ts = SEEDS[-6:] + SEEDS[:10], [0.7, 1.0] * 8
    composed = with_seed_inputs(toy_served(10), its_start=5, expose_u=True)
    onnx.checker.check_model(composed, full_check=True)
    images, mean, u = session(composed).run([OUTPUT_IMAGES, OUTPUT_MEAN, INPUT_U], feeds(seeds, ts))
    want = reference(seeds, 10, 5, ts)
    assert_bitwise_equal(u, want)
    assert_bitwise_equal(mean, want)
    assert np.array_equal(images, (want * np.float32(255)).astype(np.uint8))


def test_compose_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ContractError, match="opset"):
        with_seed_inputs(toy_served(4, opset=17), its_start=0)
    with pytest.raises(ContractError, match="kaem"):  # no contract metadata to read its_start from
        with_seed_inputs(toy_served(4))
    clashing, taken = toy_served(4), build_seed_graph(4, 0).initializer[0].name
    clashing.graph.initializer[0].name = clashing.graph.node[1].input[1] = taken
    with pytest.raises(ContractError, match="names"):
        with_seed_inputs(clashing, its_start=0)
    two_inputs = toy_served(4)
    two_inputs.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1]))
    with pytest.raises(ContractError, match="single input"):
        with_seed_inputs(two_inputs, its_start=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """A real exported graph of an untrained digits KAEM (the cheapest real one: no training)."""
    import torch

    from export.to_onnx import export_graph
    from training.config import get_preset
    from training.model.registry import build_model

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(get_preset("digits"), init_seed=0)
        return export_graph(model, Path(tmp_path_factory.mktemp("served")) / "model.onnx")
    finally:
        torch.set_num_threads(previous)


def test_composed_real_graph_gives_the_u_graphs_images(served: onnx.ModelProto) -> None:
    contract = ModelContract.from_metadata({p.key: p.value for p in served.metadata_props})
    dim, its_start = contract.u_dim, contract.its_start
    composed = with_seed_inputs(served, expose_u=True)
    onnx.checker.check_model(composed, full_check=True)
    assert [i.name for i in composed.graph.input] == [INPUT_SEED, INPUT_TRUNCATION]
    assert [o.name for o in composed.graph.output] == [*(o.name for o in served.graph.output), INPUT_U]
    assert composed.ir_version == served.ir_version <= 10
    assert list(composed.opset_import) == list(served.opset_import)
    assert list(composed.metadata_props) == list(served.metadata_props)
    assert [o.name for o in with_seed_inputs(served).graph.output] == [o.name for o in served.graph.output]

    seeds = SEEDS[:64] + SEEDS[-6:]
    u_graph, seed_graph = session(served), session(composed)
    for ts in (1.0, 0.7, [1.0, 0.7, 0.5] * 23 + [0.9]):
        want_u = reference(seeds, dim, its_start, ts)
        images, mean, u = seed_graph.run([OUTPUT_IMAGES, OUTPUT_MEAN, INPUT_U], feeds(seeds, ts))
        want_images, want_mean = u_graph.run([OUTPUT_IMAGES, OUTPUT_MEAN], {INPUT_U: want_u})
        assert_bitwise_equal(u, want_u)
        assert images.dtype == np.uint8 and np.array_equal(images, want_images)
        assert np.array_equal(mean, want_mean)
