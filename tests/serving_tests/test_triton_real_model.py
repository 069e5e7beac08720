"""End to end on a real trained and exported model: the same seed gives the same image through
PyTorch eager, onnxruntime and the real Triton server over gRPC."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract import INPUT_U, OUTPUT_IMAGES
from export.to_onnx import export_checkpoint, ort_session
from serving import canary
from serving.client import generate_images
from serving.local.launcher import LocalTriton, free_ports
from serving.metrics import fetch_metrics_text, read_settled
from training.checkpoint import load_model
from training.config import get_preset, with_overrides
from training.sample import sample_images, u_for_model
from training.train import train

pytestmark = pytest.mark.triton


def cache_hits(text: str, model: str) -> float:
    """Triton's per-model response-cache hit counter from a metrics scrape."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nv_cache_num_hits_per_model{") and f'model="{model}"' in line)


@pytest.mark.parametrize("kind", ["univariate", "mixture"])  # the paper's layout; the fmnist/mnist presets' one
def test_seed_gives_same_image_eager_ort_triton(tmp_path: Path, kind: str) -> None:
    cfg = with_overrides(get_preset("digits"), steps=40)
    cfg = replace(cfg, prior=replace(cfg.prior, kind=kind))
    ckpt = train(cfg, tmp_path / "run", torch.device("cpu"), progress=False)
    report = export_checkpoint(ckpt, tmp_path / "repo", "kaem_digits", max_batch_size=16, seed_model=True)
    assert report.seed_model == tmp_path / "repo" / "kaem_digits_seed" / "1" / "model.onnx"
    model, _ = load_model(ckpt)
    seeds = list(range(500, 540))  # 40 seeds: the client splits them into 16 + 16 + 8
    eager = sample_images(model, seeds, truncation=0.7)
    ort = ort_session(report.path).run([OUTPUT_IMAGES], {INPUT_U: u_for_model(model, seeds, 0.7)})[0]
    grpc, http, metrics = free_ports(3)
    with LocalTriton(tmp_path / "repo", grpc_port=grpc, http_port=http, metrics_port=metrics) as server:
        warm_up = read_settled(server.metrics_url, "kaem_digits")  # model_warmup's requests count as requests
        served, stats = generate_images(server.grpc_url, "kaem_digits", seeds, truncation=0.7, concurrency=2)
        counts = read_settled(server.metrics_url, "kaem_digits")
        # The seed model: the same images from seeds alone (the uniforms computed in the graph), and a repeated
        # request answered by Triton's response cache; kaem-canary checks it like the u model.
        by_seed, _ = generate_images(server.grpc_url, "kaem_digits_seed", seeds, truncation=0.7, concurrency=2)
        again, _ = generate_images(server.grpc_url, "kaem_digits_seed", seeds[:16], truncation=0.7)
        hits = cache_hits(fetch_metrics_text(server.metrics_url), "kaem_digits_seed")
        assert canary.main(["--url", server.grpc_url, "--model", "kaem_digits_seed"]) == 0
    assert np.array_equal(by_seed, ort) and np.array_equal(again, ort[:16])
    assert hits >= 1  # the first 16 seeds at 0.7 are one request the first run already made
    assert np.array_equal(served, ort)  # Triton runs the very same graph: bit-identical
    assert int(np.abs(served.astype(int) - eager.astype(int)).max()) <= 1  # eager vs graph: <= 1 grey level
    assert stats.requests == 3 and stats.images == 40
    assert sum(v["requests"] for v in counts["kaem_digits"].values()) - sum(
        v["requests"] for v in warm_up["kaem_digits"].values()) == 3
