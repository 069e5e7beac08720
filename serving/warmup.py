"""One real inference per model over gRPC before a server takes traffic: ``kaem-serve`` sends it at start
(serving/local/launcher.py), and the production pod's startup probe runs this file (deploy/k8s/deployment.yaml;
the Dockerfile copies it to /opt/kaem/warmup.py).

Triton's ``model_warmup`` runs inside the server and leaves its gRPC frontend cold: measured on fresh local
servers (median of 4), the first gRPC request took 2.6x the warm p50 with nothing sent before and 1.4x after
one inference from another client. A metadata call or a request to an unknown model warmed it less (2.6x,
2.0x), so this sends a real one.

    python3 warmup.py [--url 127.0.0.1:8001] [--timeout 10]

Exit 0 when the server is ready and every loaded model without a response cache answered a batch-1 request
of zeros (so Kubernetes starts its readiness probe, and traffic, only after that); exit 1 with one line on
stderr otherwise. Models with a response cache are left alone, so their cache counters stay the clients' own.

Standalone on purpose: it imports only the standard library, numpy and tritonclient, so the production image
needs this one file (tests/serving_tests/test_triton_live.py checks its imports).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def zeros_inputs(config, client_module) -> list | None:
    """A batch-1 request of zeros for a model config (``tritonclient.grpc.model_config_pb2.ModelConfig``) as
    ``client_module.InferInput`` objects (``tritonclient.grpc``), or None when an input is not numeric."""
    from tritonclient.grpc import model_config_pb2
    from tritonclient.utils import triton_to_np_dtype

    inputs = []
    for spec in config.input:
        kind = model_config_pb2.DataType.Name(spec.data_type).removeprefix("TYPE_")
        dtype = triton_to_np_dtype(kind)
        if dtype is None:  # TYPE_STRING: zeros are numbers only
            return None
        shape = ([1] if config.max_batch_size > 0 else []) + [max(1, d) for d in spec.dims]
        inputs.append(client_module.InferInput(spec.name, shape, kind))
        inputs[-1].set_data_from_numpy(np.zeros(shape, dtype=dtype))
    return inputs


def warm_up(url: str, timeout_s: float = 10.0) -> list[str]:
    """Send one batch-1 request of zeros to every ready model without a response cache on the server at ``url``
    (gRPC host:port); the models it went to. Raises RuntimeError saying what failed."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        try:
            if not client.is_server_ready(client_timeout=timeout_s):
                raise RuntimeError(f"the server at {url} is not ready yet (models still loading)")
            index = client.get_model_repository_index(as_json=True).get("models", [])
        except InferenceServerException as err:
            raise RuntimeError(f"no answer from a Triton server at {url}: {err.message()}") from err
        warmed = []
        for entry in index:
            name, version = entry["name"], entry.get("version", "")
            if entry.get("state") != "READY":
                continue
            try:
                config = client.get_model_config(name, version, client_timeout=timeout_s).config
                if config.response_cache.enable:
                    continue
                inputs = zeros_inputs(config, grpcclient)
                if inputs is None:
                    continue
                client.infer(name, inputs, model_version=version, client_timeout=timeout_s)
            except InferenceServerException as err:
                raise RuntimeError(f"warm-up request to {name} version {version or '(latest)'} failed: "
                                   f"{err.message()}") from err
            warmed.append(name)
        return warmed
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001",
                   help="the server's gRPC address, host:port (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        warmed = warm_up(args.url, args.timeout)
    except RuntimeError as err:
        print(f"warm-up: {err}", file=sys.stderr)
        return 1
    print(f"warm-up: one request each to {', '.join(sorted(set(warmed))) or 'no model (all cached or non-numeric)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
