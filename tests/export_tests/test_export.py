"""Export: the real exporter on trained checkpoints (univariate and mixture priors), graph checks,
onnxruntime-vs-eager parity at two batch sizes, NaN/edge inputs, atomic versioning, the committed
default config, and the ``python export/to_onnx.py`` script invocation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from testpaths import ROOT

from export.contract import INPUT_U, OUTPUT_IMAGES, OUTPUT_MEAN, ModelContract, canary_sha256, canary_u
from export.to_onnx import export_checkpoint, ort_session
from export.triton_config import (
    contract_from_config,
    file_sha256,
    parse_config,
    recorded_artifacts,
    recorded_sha256,
)
from serving.verify_repository import verify as verify_repository
from training.checkpoint import load_model, save_checkpoint
from training.config import get_preset, with_overrides
from training.model.kaem import KAEM
from training.sample import sample_images, u_for_model
from training.train import train

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("digits")
    return train(with_overrides(get_preset("digits"), steps=30), run, torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def exported(digits_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    return export_checkpoint(digits_ckpt, repo, "kaem_digits", max_batch_size=64), repo


def test_graph_contract_and_metadata(exported) -> None:
    report, _ = exported
    proto = onnx.load(str(report.path))
    assert proto.ir_version <= 10
    meta = {p.key: p.value for p in proto.metadata_props}
    contract = ModelContract.from_metadata(meta)
    assert contract == report.contract and contract.u_dim == 4
    assert [i.name for i in proto.graph.input] == [INPUT_U]
    assert {o.name for o in proto.graph.output} == {OUTPUT_IMAGES, OUTPUT_MEAN}
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"RandomUniform", "RandomUniformLike", "RandomNormal", "Multinomial"}
    assert "IsNaN" in ops  # the graph sanitises u itself
    # Latent health travels with the artefact, the same numbers as training.eval.health computes.
    assert meta["kaem.latent_pr"] == f"{report.health.latent_pr:.4f}"
    assert meta["kaem.gen_dim"] == f"{report.health.gen_dim:.4f}"
    assert len(meta["kaem.latent_top3"].split(",")) == 3


@pytest.mark.parametrize("batch", [1, 37])
def test_ort_matches_eager_for_seeds(exported, digits_ckpt: Path, batch: int) -> None:
    report, _ = exported
    model, _ = load_model(digits_ckpt)
    seeds = list(range(1000, 1000 + batch))
    eager = sample_images(model, seeds)
    ort_images = ort_session(report.path).run([OUTPUT_IMAGES], {INPUT_U: u_for_model(model, seeds)})[0]
    assert ort_images.dtype == np.uint8 and ort_images.shape == (batch, 8, 8, 1)
    assert int(np.abs(ort_images.astype(int) - eager.astype(int)).max()) <= 1  # stated tolerance: 1 grey level
    assert (ort_images == eager).mean() > 0.99


def test_nan_and_out_of_range_u_give_valid_images(exported) -> None:
    report, _ = exported
    u = np.array([[np.nan] * 4, [-5.0] * 4, [7.0] * 4, [0.0, 1.0, np.inf, -np.inf], [0.5] * 4], dtype=np.float32)
    images, mean = ort_session(report.path).run([OUTPUT_IMAGES, OUTPUT_MEAN], {INPUT_U: u})
    assert np.isfinite(mean).all() and mean.min() >= 0 and mean.max() <= 1
    assert np.array_equal(images[0], images[4])  # NaN is treated as 0.5


def test_mixture_prior_exports_with_selection_layout(tmp_path: Path) -> None:
    cfg = get_preset("svhn")
    from dataclasses import replace

    small = replace(cfg, prior=replace(cfg.prior, P=3, Q=5, grid_size=6, n_quad=30),
                    decoder=replace(cfg.decoder, channels=(8, 4, 4)))
    model = KAEM(small)
    ckpt = save_checkpoint(tmp_path / "ckpt-0000000.pt", model, 0)
    report = export_checkpoint(ckpt, tmp_path / "repo", "kaem_mix", max_batch_size=8)
    assert report.contract.u_dim == 10 and report.contract.its_start == 5
    assert report.max_pixel_diff <= 1
    cfg_text = (tmp_path / "repo" / "kaem_mix" / "config.pbtxt").read_text()
    parsed = parse_config(cfg_text)
    assert list(parsed.input[0].dims) == [10] and parsed.max_batch_size == 8


@pytest.mark.slow
def test_versions_are_atomic_and_pruned(digits_ckpt: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / ".gitkeep").touch()  # the committed placeholder
    versions = [export_checkpoint(digits_ckpt, repo, "m", keep_versions=2).version for _ in range(3)]
    assert versions == [1, 2, 3]
    assert not (repo / "m" / "1" / "model.onnx").exists() and (repo / "m" / "1" / ".gitkeep").exists()
    assert (repo / "m" / "3" / "model.onnx").exists() and (repo / "m" / "2" / "model.onnx").exists()
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".")]  # no staging leftovers
    # each kept version's model.onnx digest is in the config (the launcher checks it); version 1's left with it
    recorded = recorded_artifacts(parse_config((repo / "m" / "config.pbtxt").read_text()))
    assert {v: a["sha256"] for v, a in recorded.items()} == {
        v: file_sha256(repo / "m" / str(v) / "model.onnx") for v in (2, 3)}
    assert verify_repository(repo) == ["m: version(s) 2, 3 match their recorded sha256"]  # the pod's init container
    # and the canary digest: the version's uint8 images for the canary seeds in onnxruntime
    graph = repo / "m" / "3" / "model.onnx"
    assert recorded[3]["canary"] == canary_sha256(ort_session(graph).run([OUTPUT_IMAGES], {
        INPUT_U: canary_u(contract_from_config(parse_config((repo / "m" / "config.pbtxt").read_text())))})[0])


@pytest.mark.slow
def test_rollback_removes_the_newest_version_and_its_digest(digits_ckpt: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for _ in range(2):
        export_checkpoint(digits_ckpt, repo, "m", keep_versions=2)
    before = (repo / "m" / "config.pbtxt").read_text()
    r = subprocess.run([str(BIN / "kaem-export"), "--rollback", "--model-repository", str(repo), "--model-name", "m"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "removed version 2, version 1 is the newest" in r.stdout, r.stdout + r.stderr
    assert (repo / "m" / "1" / "model.onnx").is_file() and not (repo / "m" / "2").exists()
    after = (repo / "m" / "config.pbtxt").read_text()
    assert recorded_sha256(parse_config(after)) == {1: file_sha256(repo / "m" / "1" / "model.onnx")}
    assert after == re.sub(r'  \{\n    key: "artifact\.(sha256|canary)\.2"\n.*?\n  \},\n', "", before)
    assert "artifact.canary.1" in after and "artifact.canary.2" in before
    for argv, expect in ((["--model-name", "m"], "nothing to roll back to"),
                         (["--model-name", "m", "--checkpoint", str(digits_ckpt)], "takes no --checkpoint"),
                         (["--model-name", "nope"], "holds 0 version")):
        bad = subprocess.run([str(BIN / "kaem-export"), "--rollback", "--model-repository", str(repo), *argv],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and expect in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    missing = subprocess.run([str(BIN / "kaem-export"), "--model-repository", str(repo)], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "--checkpoint is required" in missing.stderr, missing.stderr


def test_an_export_into_the_default_repository_leaves_the_checkout_clean() -> None:
    # kaem-export writes model.onnx and a config.pbtxt that records each version's digests: both are build
    # outputs, so `make demo` must not show them as changes; the empty version folder is kept for the layout.
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    folder = ROOT / "model_repository" / "kaem_fmnist"
    written = [folder / "config.pbtxt", folder / "1" / "model.onnx", folder / "2" / "model.onnx"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *map(str, written)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and len(r.stdout.split()) == len(written), r.stdout + r.stderr
    assert (folder / "1" / ".gitkeep").exists()
    r = subprocess.run(["git", "ls-files", "--error-unmatch", str(folder / "1" / ".gitkeep")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_script_invocation_and_user_errors(digits_ckpt: Path, tmp_path: Path) -> None:
    script = ROOT / "export" / "to_onnx.py"
    r = subprocess.run([sys.executable, str(script), "--checkpoint", str(digits_ckpt), "--model-repository",
                        str(tmp_path), "--model-name", "kaem_digits"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "parity vs eager" in r.stdout and (tmp_path / "kaem_digits" / "1" / "model.onnx").exists()
    assert "latent health: latent PR" in r.stdout and "generator dimension" in r.stdout
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "nope.pt")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(digits_ckpt), "--opset", "13"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--opset" in bad.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a repository path through a regular file cannot be created
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(digits_ckpt), "--model-repository",
                          str(blocker / "repo")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "error: cannot install the model under" in bad.stderr and str(blocker) in bad.stderr


def test_fp16_export_is_its_own_model_and_within_one_grey_level(tmp_path: Path) -> None:
    # The optional fp16 graph (GPUs): the decoder's matmuls in half precision, published under its own name
    # with kaem.precision=fp16 in its contract; on CPU within one grey level of the fp32 eager images.
    ckpt = ROOT / "checkpoints" / "kaem_fmnist.pt"
    report = export_checkpoint(ckpt, tmp_path, "kaem_fmnist_fp16", precision="fp16")
    assert report.contract.precision == "fp16" and report.max_pixel_diff <= 1
    proto = onnx.load(str(report.path))
    assert {p.key: p.value for p in proto.metadata_props}["kaem.precision"] == "fp16"
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sum(int(np.prod(t.dims)) for t in halves) > 1_000_000  # the spline matrices really are fp16
    cfg = parse_config((tmp_path / "kaem_fmnist_fp16" / "config.pbtxt").read_text())
    assert cfg.parameters["kaem.precision"].string_value == "fp16"
    model, _ = load_model(ckpt)
    seeds = range(1024)
    eager = sample_images(model, seeds)
    sess = ort_session(report.path)
    served = sess.run([OUTPUT_IMAGES], {INPUT_U: u_for_model(model, seeds)})[0]
    diff = np.abs(served.astype(np.int16) - eager.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05


def test_fp16_never_takes_the_default_name(tmp_path: Path) -> None:
    script = ROOT / "export" / "to_onnx.py"
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(ROOT / "checkpoints" / "kaem_fmnist.pt"),
                          "--model-repository", str(tmp_path), "--model-name", "kaem_fmnist", "--precision", "fp16"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot take the default model's name" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "kaem_fmnist").exists()


def test_a_seed_model_that_fails_its_check_publishes_nothing(digits_ckpt: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import export.to_onnx as exporter
    from export.module import ExportError

    def differs(*args, **kwargs):
        raise ExportError("the seed model's images differ")

    monkeypatch.setattr(exporter, "check_seed_parity", differs)
    with pytest.raises(ExportError, match="differ"):
        export_checkpoint(digits_ckpt, tmp_path / "repo", "m", max_batch_size=8, seed_model=True)
    assert not list(tmp_path.rglob("model.onnx")) and not list(tmp_path.rglob("config.pbtxt"))
