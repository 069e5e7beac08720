"""``python export/to_onnx.py`` / ``kaem-export``: a checkpoint becomes one ONNX graph (uniforms in,
images out, a single forward pass) plus its Triton config, written atomically into the model
repository as a new numbered version, after graph checks and an onnxruntime-vs-eager parity test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.contract import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MODEL_NAME,
    INPUT_SEED,
    INPUT_TRUNCATION,
    INPUT_U,
    OUTPUT_IMAGES,
    OUTPUT_MEAN,
    PRECISIONS,
    SEED_MODEL_SUFFIX,
    ModelContract,
    canary_rows,
    canary_sha256,
    canary_u,
    seed_feed,
)
from export.module import ExportError, ServedGenerator
from export.seed_graph import with_seed_inputs
from export.triton_config import (
    ARTIFACT_KEY,
    ARTIFACTS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_QUEUE_TIMEOUT_US,
    TritonConfigError,
    file_sha256,
    parse_config,
    recorded_artifacts,
    render_config,
    version_dirs,
    write_config,
)
from training.checkpoint import load_model
from training.cli import HelpFormatter, UserError, command
from training.eval.health import LatentHealth, latent_health
from training.model.kaem import KAEM
from training.uniforms import seeds_to_u

DEFAULT_OPSET = 18
MAX_IR_VERSION = 10  # onnxruntime in tritonserver 24.10 loads IR <= 10
# Ops that would make the graph random or depend on kernels the production image may lack.
FORBIDDEN_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                 "Bernoulli"}
# Parity: the decoder mean may differ by float32 reordering only; images by at most one grey
# level (a mean within ~1e-6 of a rounding boundary can round either way).
MEAN_TOL = 1e-4
PIXEL_TOL = 1
FP16_MEAN_TOL = 4e-3  # the fp16 graph against fp32 eager: within about one grey level (1/255 = 3.9e-3)


@dataclass
class ExportReport:
    path: Path
    version: int
    contract: ModelContract
    size_bytes: int
    max_mean_diff: float
    max_pixel_diff: int
    ms_per_image_ort: float
    ops: list[str]
    health: LatentHealth
    seed_model: Path | None = None  # <name>_seed/<version>/model.onnx when exported with seed_model=True


def contract_for(model: KAEM, precision: str = "fp32") -> ModelContract:
    cfg = model.cfg
    c, h, w = cfg.decoder.image_shape
    return ModelContract(prior_kind=cfg.prior.kind, P=cfg.prior.P, Q=cfg.prior.Q, image_h=h, image_w=w,
                         image_c=c, config_id=cfg.identity(), preset=cfg.preset, precision=precision)


def export_graph(model: KAEM, path: Path, opset: int = DEFAULT_OPSET, extra_meta: dict[str, str] | None = None,
                 precision: str = "fp32") -> onnx.ModelProto:
    """Export with the dynamo exporter, a dynamic batch axis and the contract's tensor names."""
    gen = ServedGenerator(model, precision).eval()
    u = torch.rand(4, model.u_dim)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(gen, (u,), dynamo=True, opset_version=opset, input_names=[INPUT_U],
                                 output_names=[OUTPUT_IMAGES, OUTPUT_MEAN], dynamic_shapes={"u": {0: batch}},
                                 optimize=True, verbose=False)
    proto = prog.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    meta = {**contract_for(model, precision).to_metadata(), **(extra_meta or {})}
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return proto


def check_graph(proto: onnx.ModelProto, contract: ModelContract) -> list[str]:
    """onnx.checker + contract names/dtypes + no random or foreign-domain ops; returns op types."""
    onnx.checker.check_model(proto, full_check=True)
    if proto.ir_version > MAX_IR_VERSION:
        raise ExportError(f"IR version {proto.ir_version} > {MAX_IR_VERSION}: Triton 24.10's onnxruntime refuses it")
    ops = sorted({n.op_type for n in proto.graph.node})
    bad = FORBIDDEN_OPS.intersection(ops)
    if bad:
        raise ExportError(f"graph contains random ops {sorted(bad)}: the served graph must be deterministic")
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or proto.functions:
        raise ExportError(f"graph uses non-standard op domains {foreign} or local functions")
    ins = {i.name: i for i in proto.graph.input}
    outs = {o.name: o for o in proto.graph.output}
    if set(ins) != {INPUT_U} or set(outs) != {OUTPUT_IMAGES, OUTPUT_MEAN}:
        raise ExportError(f"graph I/O {sorted(ins)} -> {sorted(outs)} does not match the contract")
    want = {OUTPUT_IMAGES: onnx.TensorProto.UINT8, OUTPUT_MEAN: onnx.TensorProto.FLOAT}
    for name, dtype in want.items():
        if outs[name].type.tensor_type.elem_type != dtype:
            raise ExportError(f"output {name} has the wrong dtype")
    dims = [d.dim_value for d in ins[INPUT_U].type.tensor_type.shape.dim]
    if len(dims) != 2 or dims[1] != contract.u_dim or dims[0] != 0:
        raise ExportError(f"input u has shape {dims}, expected [batch, {contract.u_dim}] with a dynamic batch")
    return ops


def ort_session(path: Path, threads: int | None = None, flush_denormal: bool = False, *, provider: str = "cpu",
                profile_dir: Path | None = None):  # -> InferenceSession
    """onnxruntime session on the CPU (or ``provider="cuda"``); ``threads`` pins the intra-op pool (benchmarks
    compare at equal threads), ``flush_denormal`` treats denormal floats as zero, ``profile_dir`` profiles the
    runs and saves the optimised graph there (benchmarks/sampling.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if flush_denormal:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if profile_dir is not None:
        opts.optimized_model_filepath = str(profile_dir / "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / "profile")
    want = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    if want not in ort.get_available_providers():
        raise ExportError(f"onnxruntime here has no {want} (available: {', '.join(ort.get_available_providers())})")
    return ort.InferenceSession(str(path), opts, providers=[want])


def check_parity(model: KAEM, sess, batch_sizes: tuple[int, ...] = (1, 64), precision: str = "fp32"
                 ) -> tuple[float, int]:
    """onnxruntime session vs PyTorch eager (fp32) on the same uniforms (edge values and NaN included); an
    fp16 graph gets FP16_MEAN_TOL on the mean, the same one grey level on the images."""
    gen = ServedGenerator(model).eval()
    worst_mean, worst_px = 0.0, 0
    for b in batch_sizes:
        u = torch.rand(b, model.u_dim, generator=torch.Generator().manual_seed(b))
        u[0, 0] = float("nan") if b > 1 else u[0, 0]
        if b > 2:
            u[1, :] = 0.0
            u[2, :] = 1.0
        with torch.no_grad():
            img_t, mean_t = gen(u)
        img_o, mean_o = sess.run([OUTPUT_IMAGES, OUTPUT_MEAN], {INPUT_U: u.numpy()})
        if not np.isfinite(mean_o).all():
            raise ExportError(f"onnxruntime produced non-finite pixels at batch {b}")
        worst_mean = max(worst_mean, float(np.abs(mean_o - mean_t.numpy()).max()))
        worst_px = max(worst_px, int(np.abs(img_o.astype(np.int16) - img_t.numpy().astype(np.int16)).max()))
    mean_tol = FP16_MEAN_TOL if precision == "fp16" else MEAN_TOL
    if worst_mean > mean_tol or worst_px > PIXEL_TOL:
        raise ExportError(f"onnxruntime ({precision}) differs from eager: mean {worst_mean:.3g} (tol {mean_tol}), "
                          f"pixels {worst_px} (tol {PIXEL_TOL})")
    return worst_mean, worst_px


def canary_digest(sess, contract: ModelContract) -> str:
    """The digest kaem-canary expects for this graph: its uint8 images for the canary seeds in onnxruntime."""
    (images,) = sess.run([OUTPUT_IMAGES], {INPUT_U: canary_u(contract)})
    return canary_sha256(images)


def seed_model_proto(u_proto: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    """The seed model of an exported ``u`` graph: the in-graph generator in front, contract ``inputs="seed"``."""
    proto = with_seed_inputs(u_proto, contract.its_start)
    meta = {**{p.key: p.value for p in proto.metadata_props},
            **dataclasses.replace(contract, inputs="seed").to_metadata()}
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=k, value=v)
    return proto


def check_seed_parity(u_sess, seed_sess, contract: ModelContract, n: int = 256) -> None:
    """The seed model must give the ``u`` model's images bit for bit for the same seeds, at T = 1 and 0.7."""
    seeds = list(range(n))
    for t in (1.0, 0.7):
        want = u_sess.run([OUTPUT_IMAGES], {INPUT_U: seeds_to_u(seeds, contract.u_dim, contract.its_start, t)})[0]
        got = seed_sess.run([OUTPUT_IMAGES], seed_feed(seeds, t))[0]
        if not np.array_equal(got, want):
            raise ExportError(f"the seed model's images differ from the u model's for seeds 0-{n - 1} at truncation"
                              f" {t} (max {int(np.abs(got.astype(int) - want).max())} grey levels): not published")


def ort_ms_per_image(sess, u_dim: int, batch: int = 64, reps: int = 5) -> float:
    u = np.random.default_rng(0).random((batch, u_dim), dtype=np.float32)
    sess.run([OUTPUT_IMAGES], {INPUT_U: u})
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run([OUTPUT_IMAGES], {INPUT_U: u})
    return (time.perf_counter() - t0) * 1000 / (reps * batch)


def _versions(model_dir: Path) -> list[int]:
    return [int(p.name) for p in version_dirs(model_dir)]


@dataclass
class _Staged:
    """A graph copied next to its model folder, with the config that records it: what :func:`_install` renames into
    place."""

    model_dir: Path
    version: int
    staging: Path  # the folder <model_dir>/.v<version>-*, holding model.onnx
    config: str  # the rendered config.pbtxt recording this version
    keep_versions: int
    created: bool  # model_dir did not exist before (removed again if the publication fails)


def _stage(onnx_file: Path, render: Callable[[Mapping[int, Mapping[str, str]]], str], model_dir: Path,
           keep_versions: int, canary: str | None) -> _Staged:
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    recorded = _recorded(model_dir)
    versions = _versions(model_dir)
    version = max(versions, default=0) + 1
    record = {"sha256": file_sha256(onnx_file), **({"canary": canary} if canary else {})}
    kept = {v: recorded[v] for v in [*versions, version][-keep_versions:] if v in recorded}
    config = render({**kept, version: record})
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=model_dir))
    except BaseException:
        _remove_if_created(model_dir, created)
        raise
    staged = _Staged(model_dir, version, staging, config, keep_versions, created)
    try:
        shutil.copyfile(onnx_file, staging / "model.onnx")
    except BaseException:
        _abandon([staged])
        raise
    return staged


def _remove_if_created(model_dir: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            model_dir.rmdir()  # only if still empty: a folder without config.pbtxt would fail the server's load


def _abandon(staged: Sequence[_Staged]) -> None:
    """Undo what staging left: the staging folders, and model folders this publication created."""
    for st in staged:
        shutil.rmtree(st.staging, ignore_errors=True)
        _remove_if_created(st.model_dir, st.created)


def _install(staged: Sequence[_Staged]) -> None:
    """Publish staged graphs together: every config is written (a few KB each, atomically), then every graph is
    renamed into place. Copying the graphs, the step that needs space, happened in :func:`_stage`, so a full disk
    leaves every model as it was; should a later config fail to write, the earlier ones are put back."""
    written: list[tuple[_Staged, str | None]] = []
    try:
        for st in staged:
            path = st.model_dir / "config.pbtxt"
            before = path.read_text() if path.is_file() else None
            write_config(st.model_dir, st.config)
            written.append((st, before))
    except BaseException:
        for st, before in reversed(written):
            with contextlib.suppress(OSError):
                if before is None:
                    (st.model_dir / "config.pbtxt").unlink()
                else:
                    write_config(st.model_dir, before)
        raise
    for st in staged:
        target = st.model_dir / str(st.version)
        if target.exists():  # an empty placeholder (e.g. version 1 with .gitkeep): rename the file in
            os.replace(st.staging / "model.onnx", target / "model.onnx")
        else:
            os.replace(st.staging, target)
    for st in staged:
        shutil.rmtree(st.staging, ignore_errors=True)  # left when only its file moved into a placeholder
        for old in _versions(st.model_dir)[:-st.keep_versions]:
            shutil.rmtree(st.model_dir / str(old))
            (st.model_dir / str(old)).mkdir()  # keep the numbered placeholder so a committed .gitkeep survives
            if old == 1:
                (st.model_dir / "1" / ".gitkeep").touch()


def publish_all(graphs: Sequence[tuple[Path, Callable[[Mapping[int, Mapping[str, str]]], str], Path, str | None]],
                keep_versions: int) -> list[int]:
    """Install each (graph, render, model_dir, canary) as its model's next version, all or none: each graph is
    copied into a staging folder beside its model folder and its config rendered from the artifacts of the
    versions kept ({version: {"sha256": of its model.onnx, "canary": of its canary images}}, which the launcher's
    integrity check and kaem-canary read); only when every copy succeeded are the configs written and the folders
    renamed into place, so a running server (polling the repository) never sees a half-written model, and a full
    disk leaves every model at the version it had (kaem-export --seed-model publishes its two models so)."""
    staged: list[_Staged] = []
    try:
        for onnx_file, render, model_dir, canary in graphs:
            staged.append(_stage(onnx_file, render, model_dir, keep_versions, canary))
        _install(staged)
    except BaseException:
        _abandon(staged)
        raise
    return [st.version for st in staged]


def publish(onnx_file: Path, render: Callable[[Mapping[int, Mapping[str, str]]], str], model_dir: Path,
            keep_versions: int, canary: str | None = None) -> int:
    """Install the graph as the next version of the model in ``model_dir`` (:func:`publish_all` for one model)."""
    (version,) = publish_all([(onnx_file, render, model_dir, canary)], keep_versions)
    return version


def _recorded(model_dir: Path) -> dict[int, dict[str, str]]:
    config = model_dir / "config.pbtxt"
    try:
        return recorded_artifacts(parse_config(config.read_text())) if config.is_file() else {}
    except TritonConfigError:
        return {}  # a broken config is replaced below; its versions keep no recorded digest


def rollback(model_dir: Path) -> tuple[int, int]:
    """Remove the newest version of a model (its folder and its recorded artifacts), so that a server polling the
    repository serves the previous one again; returns (removed, now served). At least two versions must hold a
    model (kaem-export keeps two by default)."""
    versions = _versions(model_dir)
    if len(versions) < 2:
        raise ExportError(f"{model_dir} holds {len(versions)} version(s) with a model.onnx: nothing to roll back to "
                          "(kaem-export --keep-versions N keeps the older ones)")
    newest, previous = versions[-1], versions[-2]
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        raise ExportError(f"{model_dir} has no config.pbtxt: not a model folder kaem-export wrote")
    text = config.read_text()
    # the rendered layout of one parameter (export/triton_config.render_config), with its separator
    keys = "|".join(re.escape(ARTIFACT_KEY.format(name=name, version=newest)) for name in ARTIFACTS)
    block = re.compile(r'  \{\n    key: "(' + keys + r')"\n    value: \{ string_value: "[0-9a-f]{64}" \}\n  \}(,\n)?')
    kept = block.sub("", text).replace(",\n]\n", "\n]\n")
    aside = model_dir / f".rollback-{newest}"
    os.replace(model_dir / str(newest), aside)  # gone at once for a polling server
    shutil.rmtree(aside)
    if kept != text:
        write_config(model_dir, kept)
    return newest, previous


def export_checkpoint(checkpoint: str | Path, model_repository: str | Path = "model_repository",
                      model_name: str = DEFAULT_MODEL_NAME, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                      opset: int = DEFAULT_OPSET, keep_versions: int = 2, precision: str = "fp32",
                      queue: Mapping[str, int] | None = None, seed_model: bool = False) -> ExportReport:
    """Export, check and publish a checkpoint; ``queue``: render_config's max_queue_size / queue_timeout_us;
    ``seed_model``: also publish ``<model_name>_seed``, the same graph behind the in-graph seed generator
    (inputs ``seed`` and ``truncation``, Triton's response cache on), after checking it gives the same images."""
    model, ckpt = load_model(checkpoint, kaem_only=True)
    contract = contract_for(model, precision)
    health = latent_health(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        proto = export_graph(model, path, opset, {"kaem.checkpoint_step": str(ckpt["step"]), **health.to_metadata()},
                             precision)
        ops = check_graph(proto, contract)
        sess = ort_session(path)
        mean_diff, px_diff = check_parity(model, sess, (1, 64, 256), precision)
        ms = ort_ms_per_image(sess, contract.u_dim)
        size = path.stat().st_size
        model_dir = Path(model_repository) / model_name
        seed_dir, seed_contract = model_dir.with_name(model_name + SEED_MODEL_SUFFIX), None
        if seed_model:  # built and checked before anything is published: a failed check publishes nothing
            seed_file = Path(tmp) / "seed" / "model.onnx"
            seed_file.parent.mkdir()
            onnx.save(seed_model_proto(proto, contract), seed_file)
            seed_sess = ort_session(seed_file)
            check_seed_parity(sess, seed_sess, contract)
            seed_contract = dataclasses.replace(contract, inputs="seed")
            (seed_canary,) = seed_sess.run([OUTPUT_IMAGES], canary_rows(seed_contract))
        graphs = [(path, lambda records: render_config(model_name, contract, max_batch_size=max_batch_size,
                                                       artifacts=records, **(queue or {})),
                   model_dir, canary_digest(sess, contract))]
        if seed_contract is not None:
            graphs.append((seed_file, lambda records: render_config(
                seed_dir.name, seed_contract, max_batch_size=max_batch_size, artifacts=records, **(queue or {})),
                seed_dir, canary_sha256(seed_canary)))
        try:
            version, *seed_version = publish_all(graphs, keep_versions)
            seed_path = seed_dir / str(seed_version[0]) / "model.onnx" if seed_version else None
        except OSError as err:  # an uncreatable or read-only repository, a full disk
            raise ExportError(f"cannot install the model under {model_dir}: {err.strerror or err}"
                              f"{f' ({err.filename})' if err.filename else ''}") from err
    return ExportReport(model_dir / str(version) / "model.onnx", version, contract, size, mean_diff, px_diff,
                        ms, ops, health, seed_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kaem-export",
        description="Export a KAEM checkpoint to one ONNX graph (u [batch, D] FP32 -> images [batch, H, W, C] "
        "UINT8 and mean FP32) and install it with its config.pbtxt in a Triton model repository.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", help="a ckpt-*.pt file or a run directory (latest checkpoint); required unless "
                   "--rollback")
    p.add_argument("--rollback", action="store_true",
                   help="instead of exporting: remove the newest version of --model-name in --model-repository (its "
                   "folder and recorded digests), so that a server polling the repository serves the previous one")
    p.add_argument("--model-repository", default="model_repository", help="Triton model repository folder")
    p.add_argument("--model-name", default=None,
                   help=f"model name in the repository (default {DEFAULT_MODEL_NAME}; --precision fp16: "
                   f"{DEFAULT_MODEL_NAME}_fp16)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: the served graph gives the same image as eager sampling for a seed. fp16: the decoder's "
                   "matmuls in half precision (for GPUs; within one grey level of fp32, not identical), published "
                   "under its own model name and marked kaem.precision=fp16 in its contract")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="Triton max_batch_size")
    p.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
                   help="requests that may wait in Triton's queue; more are rejected at once (0: unbounded, no queue "
                   "policy: the default, since a queue policy stalled the local Triton 2.51's batcher)")
    p.add_argument("--queue-timeout-us", type=int, default=DEFAULT_QUEUE_TIMEOUT_US,
                   help="reject a request that has waited this long in the queue (0: never; a client's own timeout "
                   "may be shorter)")
    p.add_argument("--seed-model", action="store_true",
                   help=f"also publish <model-name>{SEED_MODEL_SUFFIX}: the same graph with the seed generator inside "
                   f"(inputs {INPUT_SEED} INT64 and {INPUT_TRUNCATION} FP32 per row, no client-side uniforms) and "
                   "Triton's response cache on, so a repeated seed is answered from the cache")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 18)")
    p.add_argument("--keep-versions", type=int, default=2, help="version folders with a model to keep")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rollback:
        if args.checkpoint:
            raise UserError("--rollback removes a version; it takes no --checkpoint")
        model_dir = Path(args.model_repository) / (args.model_name or DEFAULT_MODEL_NAME)
        t0 = time.perf_counter()
        removed, served = rollback(model_dir)
        print(f"rolled back {model_dir}: removed version {removed}, version {served} is the newest "
              f"({1000 * (time.perf_counter() - t0):.0f} ms; a polling server switches at its next poll)")
        return 0
    if not args.checkpoint:
        raise UserError("--checkpoint is required (or --rollback)")
    if args.opset < 18:
        raise UserError("--opset must be >= 18 (the exporter and the contract are tested at 18)")
    if not 1 <= args.max_batch_size <= 65536:
        raise UserError("--max-batch-size must be in 1..65536")
    if args.keep_versions < 1:
        raise UserError("--keep-versions must be >= 1")
    if args.max_queue_size < 0 or args.queue_timeout_us < 0:
        raise UserError("--max-queue-size and --queue-timeout-us must be >= 0 (0: no limit)")
    fp16 = args.precision == "fp16"
    if args.model_name is None:
        args.model_name = DEFAULT_MODEL_NAME + ("_fp16" if fp16 else "")
    elif fp16 and args.model_name == DEFAULT_MODEL_NAME:
        raise UserError(f"--precision fp16 cannot take the default model's name {DEFAULT_MODEL_NAME!r}: clients rely "
                        "on it giving the same image as eager sampling for a seed; pick another --model-name")
    if not args.model_name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--model-name {args.model_name!r}: use letters, digits, '_' and '-'")
    r = export_checkpoint(args.checkpoint, args.model_repository, args.model_name, args.max_batch_size,
                          args.opset, args.keep_versions, args.precision,
                          queue={"max_queue_size": args.max_queue_size, "queue_timeout_us": args.queue_timeout_us},
                          seed_model=args.seed_model)
    c = r.contract
    print(f"exported {r.path} (version {r.version}, {r.size_bytes / 1e6:.2f} MB)")
    print(f"  input  {INPUT_U}: FP32 [batch, {c.u_dim}]  ({c.u_layout_text})")
    print(f"  output {OUTPUT_IMAGES}: UINT8 [batch, {c.image_h}, {c.image_w}, {c.image_c}];"
          f" {OUTPUT_MEAN}: FP32 same shape")
    print(f"  parity vs eager ({c.precision}): max |mean diff| {r.max_mean_diff:.2e}, "
          f"max pixel diff {r.max_pixel_diff}")
    print(f"  onnxruntime CPU: {r.ms_per_image_ort:.3f} ms/image at batch 64; {len(r.ops)} op types")
    print(f"  latent health: {r.health.summary()}")
    for w in r.health.warnings():
        print(f"  warning: {w}")
    if r.seed_model is not None:
        print(f"exported {r.seed_model}: inputs {INPUT_SEED} INT64 [batch, 1], {INPUT_TRUNCATION} FP32 [batch, 1];"
              " the same images as the u model for seeds 0-255 at truncation 1 and 0.7; response cache on")
    print(f"  config: {Path(args.model_repository) / args.model_name / 'config.pbtxt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
