"""``kaem-canary``: the step after every rollout. Asks the server for the canary seeds' images and compares their
digest with the one the export recorded for the version that answered (config parameter
``artifact.canary.<version>``). Exit 0: the served graph gives the images it gave at export; 1: it does not (a
wrong or corrupted model, another runtime's rounding); 2: the check could not run (no server, no record).

    kaem-canary [--url localhost:8001] [--model kaem_fmnist] [--timeout 10]

Digests are of the CPU onnxruntime images at export. A GPU execution provider may round a pixel one grey level
differently (fp32 parity there is within one grey level, not exact), so on GPUs a mismatch asks for a look at
the images rather than proving a broken model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.contract import CANARY_SEEDS, OUTPUT_IMAGES, canary_rows, canary_sha256
from export.triton_config import recorded_artifacts
from serving.client import ServingError, checked_images, connect, infer_inputs, server_parser
from training.cli import command


def check(url: str, model: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """(whether the served images match the recorded digest, a one-line report)."""
    client, served = connect(url, model, timeout_s)
    config = client.get_model_config(model, client_timeout=timeout_s).config
    try:
        result = client.infer(model, infer_inputs(canary_rows(served.contract)),
                              outputs=[grpcclient.InferRequestedOutput(OUTPUT_IMAGES)], client_timeout=timeout_s)
    except InferenceServerException as err:
        raise ServingError(f"the canary request to {model!r} at {url} failed: {err.message() or err}") from None
    version = int(result.get_response().model_version)
    want = recorded_artifacts(config).get(version, {}).get("canary")
    if want is None:
        raise ServingError(f"model {model!r} version {version} at {url} has no recorded canary digest: it was "
                           "exported before canaries were recorded; export it again with kaem-export")
    got = canary_sha256(checked_images(result, len(CANARY_SEEDS), model, served.contract))
    seeds = f"seeds {CANARY_SEEDS[0]}-{CANARY_SEEDS[-1]}"
    if got != want:
        return False, (f"MISMATCH: {model!r} version {version} at {url} returns other images for {seeds} than at "
                       f"export (sha256 {got[:16]}…, recorded {want[:16]}…)")
    return True, f"ok: {model!r} version {version} at {url} returns the exported images for {seeds}"


def build_parser():
    p = server_parser("kaem-canary", __doc__)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per server call")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ok, report = check(args.url, args.model, args.timeout)
    print(report, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
