"""``make demo``: the main job end to end on the embedded default model — export to ONNX, start
the real Triton server, generate 64 images over gRPC into ``samples.png``, show latency metrics,
stop cleanly. Uses the shipped checkpoint; trains a short one only if it is missing."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from export.contract import DEFAULT_MODEL_NAME
from export.to_onnx import export_checkpoint
from serving.client import generate_images
from serving.local.launcher import LaunchError, LocalTriton, check_ports, free_ports
from serving.metrics import delta, format_report, read_settled
from training.checkpoint import load_model
from training.cli import command
from training.images import save_grid
from training.sample import sample_images

DEFAULT_CHECKPOINT = Path("checkpoints/kaem_fmnist.pt")


def _ports() -> tuple[int, int, int]:
    """Triton's usual ports when free, otherwise free ones (said out loud)."""
    try:
        check_ports("127.0.0.1", {"gRPC": 8001, "HTTP": 8000, "metrics": 8002})
        return 8001, 8000, 8002
    except LaunchError:
        g, h, m = free_ports(3)
        print(f"ports 8000-8002 are busy: using grpc {g}, http {h}, metrics {m}")
        return g, h, m


def ensure_checkpoint(path: Path) -> Path:
    if path.exists():
        return path
    from training.config import get_preset, with_overrides
    from training.train import train

    print(f"{path} is missing: training a short fmnist model instead (run `make default-model` for the real one)")
    import torch

    run = Path("runs/demo-fallback")
    cfg = with_overrides(get_preset("fmnist"), steps=600)
    return train(cfg, run, torch.device("cpu"), resume=run.exists())


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint to serve")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--out", default="samples.png")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    print("== 1/4 export to ONNX")
    ckpt = ensure_checkpoint(Path(args.checkpoint))
    rep = export_checkpoint(ckpt, args.model_repository, DEFAULT_MODEL_NAME)
    print(f"   {rep.path} ({rep.size_bytes / 1e6:.1f} MB), parity vs eager: mean {rep.max_mean_diff:.1e}, "
          f"pixels {rep.max_pixel_diff}; onnxruntime {rep.ms_per_image_ort:.3f} ms/image")

    print("== 2/4 start Triton (real tritonserver 2.51, CPU, loopback)")
    grpc, http, metrics = _ports()
    with LocalTriton(args.model_repository, grpc_port=grpc, http_port=http, metrics_port=metrics) as server:
        print(f"   ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}")
        print(f"   log: {server.log_file}")
        at_load = read_settled(server.metrics_url, DEFAULT_MODEL_NAME)  # the warm-up requests count as requests

        print("== 3/4 generate 64 images over gRPC")
        seeds = list(range(64))
        images, stats = generate_images(server.grpc_url, DEFAULT_MODEL_NAME, seeds)
        grid = save_grid(images, args.out, upscale=3)
        eager = sample_images(load_model(ckpt)[0], seeds)
        diff = int(np.abs(images.astype(np.int16) - eager.astype(np.int16)).max())
        print(f"   wrote {grid}; max pixel difference vs eager PyTorch for the same seeds: {diff}")
        print(f"   {stats.summary()}")
        # A burst of single-image requests shows the dynamic batcher merging them.
        _, burst = generate_images(server.grpc_url, DEFAULT_MODEL_NAME, list(range(64, 320)), concurrency=8,
                                   batch_size=1)
        print(f"   256 single-image requests at concurrency 8: {burst.summary()}")

        print("== 4/4 server metrics (Prometheus endpoint)")
        print(format_report(delta(read_settled(server.metrics_url, DEFAULT_MODEL_NAME), at_load)))
        warm = sum(v["requests"] for v in at_load.get(DEFAULT_MODEL_NAME, {}).values())
        grpc_warmup = ", and kaem-serve's one gRPC request" if server.warmed == DEFAULT_MODEL_NAME else ""
        print(f"counts exclude the {warm:.0f} warm-up requests made at load (config.pbtxt model_warmup{grpc_warmup}); "
              "the quantiles are Triton's own window, which includes them")
    print(f"done in {time.perf_counter() - t_start:.0f} s; server stopped. Open {grid}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
