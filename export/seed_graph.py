"""Seeds to uniforms inside the served graph: an ONNX subgraph that computes ``u`` from image seeds with
generator ``kaem-u-splitmix64-v1`` bit for bit as :func:`training.uniforms.seeds_to_u` does, so that a client
can send ``seed`` (INT64 [batch, 1]) and ``truncation`` (FP32 [batch, 1]) instead of the float uniforms.

Why the 64-bit arithmetic looks the way it does: the generator is SplitMix64, all of it modulo 2**64 with
logical shifts. ONNX's BitShift only takes unsigned types, so the state is kept in UINT64 for the shifts and
XORs. But the CPU kernels of onnxruntime 1.19.2 (the one in Triton 24.10, the production image) register
Add and Mul for float, double, int32 and int64 only: a graph with a UINT64 Add or Mul loads in a newer
onnxruntime and fails to load in Triton. The ring operations therefore run in INT64 (Cast between INT64 and
UINT64 reinterprets the bits): in two's complement the low 64 bits of a sum or product do not depend on the
signedness of the operands, so an INT64 Add/Mul that wraps gives exactly the UINT64 result. No step goes
through floating point until the final 23-bit mantissa, which is exact in double and in float.

Truncation (``u' = 0.5 + T (u - 0.5)`` on the ITS columns, in double, then rounded to float) is per row, since
Triton batches rows of different requests; rows with T == 1 get the untruncated u by a Where, as
:func:`training.uniforms.truncate` returns u untouched there. ``truncation`` arrives as FP32, and
:func:`training.uniforms.truncate` rounds T to float32 too, so both compute with the same T.
The graph does not validate its inputs: negative seeds or T outside (0, 1] are the client's to refuse.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.contract import (
    INPUT_SEED,
    INPUT_TRUNCATION,
    INPUT_U,
    OUTPUT_IMAGES,
    OUTPUT_MEAN,
    ContractError,
    ModelContract,
)
from training.uniforms import GENERATOR_VERSION

SEED_OPSET = 18  # BitwiseXor
IR_VERSION = 10  # = export.to_onnx.MAX_IR_VERSION (not imported from there: that module imports torch)
# Every name the subgraph adds (nodes, intermediate tensors, constants) starts with this, so that composing it
# in front of an exported graph cannot collide with the exporter's names.
NAME_PREFIX = "kaem_seed/"

_G = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MANTISSA_SHIFT = 41  # 64 - 23


def _as_int64(x: int | np.ndarray) -> np.ndarray:
    """The int64 with the same 64 bits as an unsigned value (two's complement)."""
    return np.asarray(x, dtype=np.uint64).view(np.int64)


class _Builder:
    """Accumulates nodes and constants under :data:`NAME_PREFIX` with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{NAME_PREFIX}{stem}_{self._count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self._name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: object) -> str:
        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type), **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def wrapping(self, op_type: str, x: str, const_i64: str) -> str:
        """``x`` (UINT64) op ``const`` modulo 2**64, computed in INT64 (see the module docstring)."""
        return self.cast(self.op(op_type, self.cast(x, TensorProto.INT64), const_i64), TensorProto.UINT64)

    def xorshift(self, z: str, shift: int) -> str:
        """``z ^ (z >> shift)`` on UINT64 (logical shift)."""
        s = self.const(f"shift{shift}", np.array(shift, dtype=np.uint64))
        return self.op("BitwiseXor", z, self.op("BitShift", z, s, direction="RIGHT"))

    def mix64(self, z: str) -> str:
        """The SplitMix64 finaliser on a UINT64 tensor."""
        m1 = self.const("m1", _as_int64(_M1))
        m2 = self.const("m2", _as_int64(_M2))
        z = self.wrapping("Mul", self.xorshift(z, 30), m1)
        z = self.wrapping("Mul", self.xorshift(z, 27), m2)
        return self.xorshift(z, 31)


def build_seed_graph(dim: int, its_start: int, *, batch_dim: str = "batch") -> onnx.GraphProto:
    """The graph ``seed`` INT64 [batch, 1], ``truncation`` FP32 [batch, 1] -> ``u`` FP32 [batch, dim], equal bit
    for bit to ``seeds_to_u(seeds, dim, its_start, T)`` row by row (columns ``its_start:`` truncated)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0 <= its_start <= dim:
        raise ValueError(f"its_start must be in [0, {dim}], got {its_start}")
    b = _Builder()
    seed = b.cast(INPUT_SEED, TensorProto.UINT64)
    key = b.mix64(b.wrapping("Add", seed, b.const("g", _as_int64(_G))))  # [batch, 1]
    with np.errstate(over="ignore"):
        offsets = np.arange(1, dim + 1, dtype=np.uint64) * np.uint64(_G)  # (j+1)·G mod 2**64, folded here
    v = b.mix64(b.wrapping("Add", key, b.const("offsets", _as_int64(offsets)[None, :])))  # [batch, dim]
    mantissa = b.op("BitShift", v, b.const("shift41", np.array(_MANTISSA_SHIFT, dtype=np.uint64)),
                    direction="RIGHT")
    half = b.const("half", np.array(0.5))
    # (m + 0.5) / 2**23 is exact in double (24 significant bits), and so is its rounding to float.
    u_double = b.op("Div", b.op("Add", b.cast(mantissa, TensorProto.DOUBLE), half),
                    b.const("two23", np.array(float(2**23))))
    u_plain = b.cast(u_double, TensorProto.FLOAT)

    t_double = b.cast(INPUT_TRUNCATION, TensorProto.DOUBLE)
    shrunk = b.op("Add", half, b.op("Mul", t_double, b.op("Sub", u_double, half)))
    its_columns = b.const("its_columns", (np.arange(dim) >= its_start)[None, :])
    truncated_row = b.op("Not", b.op("Equal", INPUT_TRUNCATION, b.const("one", np.array(1.0, dtype=np.float32))))
    b.op("Where", b.op("And", truncated_row, its_columns), b.cast(shrunk, TensorProto.FLOAT), u_plain,
         output=INPUT_U)

    return helper.make_graph(
        b.nodes, f"kaem_seed_to_u_{GENERATOR_VERSION}",
        [helper.make_tensor_value_info(INPUT_SEED, TensorProto.INT64, [batch_dim, 1]),
         helper.make_tensor_value_info(INPUT_TRUNCATION, TensorProto.FLOAT, [batch_dim, 1])],
        [helper.make_tensor_value_info(INPUT_U, TensorProto.FLOAT, [batch_dim, dim])],
        initializer=b.initializers,
    )


def build_seed_model(dim: int, its_start: int, *, opset: int = SEED_OPSET, ir_version: int = IR_VERSION
                     ) -> onnx.ModelProto:
    """:func:`build_seed_graph` as a model of its own (tests, or a separate Triton ensemble step)."""
    if opset < SEED_OPSET:
        raise ValueError(f"the seed graph needs opset >= {SEED_OPSET} (BitwiseXor), got {opset}")
    model = helper.make_model(build_seed_graph(dim, its_start), opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="kaem-serve export.seed_graph")
    model.ir_version = ir_version
    return model


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    for node in graph.node:
        names |= {node.name, *node.input, *node.output}
    return names - {""}


def with_seed_inputs(served: onnx.ModelProto, its_start: int | None = None, *, expose_u: bool = False
                     ) -> onnx.ModelProto:
    """``served`` (``u`` FP32 [batch, D] -> ``images``, ``mean``) with the seed graph in front: inputs ``seed``
    and ``truncation``, the same outputs (and ``u``, the in-graph uniforms, last when ``expose_u``).

    ``its_start`` defaults to the one the model's contract metadata implies, which must also agree with D.
    Everything else of ``served`` (metadata, opset imports, IR version, functions) is kept as it is."""
    graph = served.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    if list(inputs) != [INPUT_U] or not {OUTPUT_IMAGES, OUTPUT_MEAN} <= outputs:
        raise ContractError(f"cannot put the seed graph in front of a graph with inputs {sorted(inputs)} and "
                            f"outputs {sorted(outputs)}: expected the single input {INPUT_U!r}")
    if INPUT_SEED in outputs or INPUT_TRUNCATION in outputs:
        raise ContractError(f"graph already has an output named {INPUT_SEED!r} or {INPUT_TRUNCATION!r}")
    u_type = inputs[INPUT_U].type.tensor_type
    dims = u_type.shape.dim
    if u_type.elem_type != TensorProto.FLOAT or len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ContractError(f"input {INPUT_U!r} must be FP32 [batch, D] with a fixed D")
    dim = dims[1].dim_value
    if its_start is None:
        contract = ModelContract.from_metadata({p.key: p.value for p in served.metadata_props})
        if contract.u_dim != dim:
            raise ContractError(f"input {INPUT_U!r} has D={dim} but the model's contract implies {contract.u_dim}")
        its_start = contract.its_start
    opset = max((o.version for o in served.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < SEED_OPSET:
        raise ContractError(f"the served graph imports ONNX opset {opset}; the seed graph needs >= {SEED_OPSET}")

    seed = build_seed_graph(dim, its_start, batch_dim=dims[0].dim_param or "batch")
    clash = sorted((_graph_names(seed) - {INPUT_U}) & _graph_names(graph))
    if clash:
        raise ContractError(f"the served graph already uses the seed graph's names {clash[:5]}")

    model = onnx.ModelProto()
    model.CopyFrom(served)
    g = model.graph
    nodes = [*seed.node, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(seed.initializer)
    del g.input[:]
    g.input.extend(seed.input)
    if expose_u:
        g.output.extend(seed.output)
    return model
