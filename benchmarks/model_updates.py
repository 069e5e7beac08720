"""Model loads and updates on the real local Triton: what warm-up buys, and how fast a rollback takes effect.

* Warm-up after a start: the shipped model is exported into a scratch repository twice, once with the rendered
  config's ``model_warmup`` (batch 1 and max_batch_size, u = 0) and once without, and served three ways: without
  either warm-up, with ``model_warmup`` only (the launcher's gRPC warm-up request off), and as kaem-serve serves it
  (both). For each, --servers fresh servers are started; on each, the first batch-1 request after start() returns
  is timed (on an open gRPC channel), then ``--calls`` more give the warm p50; printed: the medians over the
  servers. Target: the first request within 2x the warm p50.
* After a version swap: a server in poll mode (``kaem-serve --model-control-mode poll``) serves version 1;
  version 2 is published (the same graph; its load runs ``model_warmup``): the first answer from version 2 is
  timed against that server's warm p50; then ``kaem-export --rollback`` removes it. Printed: seconds from each
  change on disk to the first response from the new version (one poll interval bounds it).

    python benchmarks/model_updates.py [--checkpoint checkpoints/kaem_fmnist.pt] [--calls 50] [--servers 3]
                                       [--poll-secs 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent
INPUT_U = "u"  # export.contract.INPUT_U (checked in main)


def _request(client: grpcclient.InferenceServerClient, model: str, u: np.ndarray) -> tuple[float, str]:
    """(ms, version that answered) of one batch-1 request."""
    x = grpcclient.InferInput(INPUT_U, list(u.shape), "FP32")
    x.set_data_from_numpy(u)
    t0 = time.perf_counter()
    version = client.infer(model, [x]).get_response().model_version
    return 1000 * (time.perf_counter() - t0), version


def _server(repo: Path, log: Path, **kwargs):  # -> LocalTriton
    from serving.local.launcher import LocalTriton, free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    return LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, log_file=log,
                       **kwargs)


def first_and_warm(repo: Path, model: str, u: np.ndarray, calls: int, log: Path,
                   grpc_warmup: bool) -> tuple[float, float]:
    """(first request ms after the server is ready, warm p50 ms)."""
    with _server(repo, log, grpc_warmup=grpc_warmup) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.is_model_ready(model)  # open the gRPC channel first: the first inference times the model, not it
        first, _ = _request(client, model, u)
        warm = [_request(client, model, u)[0] for _ in range(calls)]
    return first, statistics.median(warm)


PACE_S = 0.02  # the pause between the requests that watch for a new version


def _paced(client: grpcclient.InferenceServerClient, model: str, u: np.ndarray, n: int) -> list[float]:
    """ms of ``n`` requests, each after a PACE_S pause, as _wait_for sends them."""
    out = []
    for _ in range(n):
        time.sleep(PACE_S)
        out.append(_request(client, model, u)[0])
    return out


def _wait_for(client: grpcclient.InferenceServerClient, model: str, u: np.ndarray, version: str,
              timeout_s: float) -> tuple[float, float]:
    """(seconds until ``version`` answered, ms of its first answer)."""
    t0 = time.perf_counter()
    while (answer := _request(client, model, u))[1] != version:
        if time.perf_counter() - t0 > timeout_s:
            raise SystemExit(f"version {version} not served after {timeout_s} s")
        time.sleep(PACE_S)
    return time.perf_counter() - t0, answer[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/kaem_fmnist.pt")
    p.add_argument("--calls", type=int, default=50, help="warm batch-1 requests after the first")
    p.add_argument("--servers", type=int, default=3, help="fresh servers per warm-up configuration (medians)")
    p.add_argument("--poll-secs", type=int, default=1, help="repository poll interval of the rollback server")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT)]  # the project's packages, not this folder's serving.py
    from export import contract as C
    from export.to_onnx import DEFAULT_MODEL_NAME, export_checkpoint, publish, rollback
    from export.triton_config import parse_config, render_config, write_config
    from serving.perf_data import contract_from_repository

    assert C.INPUT_U == INPUT_U
    model = DEFAULT_MODEL_NAME
    with tempfile.TemporaryDirectory(prefix="kaem-updates-") as tmp:
        tmp = Path(tmp)
        warm_repo = tmp / "warm"
        export_checkpoint(args.checkpoint, warm_repo, model)
        contract = contract_from_repository(warm_repo, model)
        cold_repo = tmp / "cold"
        (cold_repo / model / "1").mkdir(parents=True)
        graph = warm_repo / model / "1" / "model.onnx"
        (cold_repo / model / "1" / "model.onnx").write_bytes(graph.read_bytes())
        cfg = parse_config((warm_repo / model / "config.pbtxt").read_text())
        write_config(cold_repo / model, render_config(model, contract, max_batch_size=cfg.max_batch_size,
                                                      warmup=False))
        u = np.full((1, contract.u_dim), 0.5, dtype=np.float32)
        print(f"model {model} from {args.checkpoint}; batch-1 requests; {args.calls} warm calls per server, "
              f"medians over {args.servers} fresh servers")
        print(f"{'warm-up':34s} {'first ms':>9s} {'warm p50 ms':>12s} {'first / p50':>12s}")
        configs = (("none", cold_repo, False), ("model_warmup only", warm_repo, False),
                   ("model_warmup + gRPC (kaem-serve)", warm_repo, True))
        for name, repo, grpc_warmup in configs:
            runs = [first_and_warm(repo, model, u, args.calls, tmp / f"warmup-{i}.log", grpc_warmup)
                    for i in range(args.servers)]
            ratios = [first / p50 for first, p50 in runs]
            print(f"{name:34s} {statistics.median(r[0] for r in runs):9.2f} "
                  f"{statistics.median(r[1] for r in runs):12.2f} {statistics.median(ratios):11.2f}x"
                  f"   (per server {', '.join(f'{r:.2f}' for r in ratios)})"
                  + ("   target <= 2x" if grpc_warmup else ""))

        with _server(warm_repo, tmp / "poll.log", model_control_mode="poll",
                     repository_poll_secs=args.poll_secs) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            def render(shas):
                return render_config(model, contract, max_batch_size=cfg.max_batch_size, artifacts=shas)

            warm = statistics.median(_request(client, model, u)[0] for _ in range(args.calls))
            # the watching requests come after a pause, and a pause alone slows a request on a warm server: the
            # same pacing on the old version is the like-for-like reference
            warm_paced = statistics.median(_paced(client, model, u, args.calls))
            version = publish(graph, render, warm_repo / model, keep_versions=2)
            up, first_new = _wait_for(client, model, u, str(version), 10 + 10 * args.poll_secs)
            after = _paced(client, model, u, 5)
            t0 = time.perf_counter()
            removed, served = rollback(warm_repo / model)
            _wait_for(client, model, u, str(served), 10 + 10 * args.poll_secs)
            back = time.perf_counter() - t0
            print(f"version swap: the first answer from version {version} took {first_new:.2f} ms: "
                  f"{first_new / warm_paced:.2f}x the p50 of {warm_paced:.2f} ms of the version before it at the same "
                  f"pace (one request every {1000 * PACE_S:.0f} ms; target <= 2x), {first_new / warm:.2f}x its "
                  f"back-to-back p50 of {warm:.2f} ms; the next 5 at that pace: "
                  f"{', '.join(f'{ms:.2f}' for ms in after)} ms")
            print(f"poll mode, every {args.poll_secs} s: version {version} answered {up:.2f} s after its export; "
                  f"version {served} again {back:.2f} s after `kaem-export --rollback` removed {removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
