"""The client refuses answers that break the model's contract. The real local Triton 2.51 serves test-only
Python-backend models (tests/serving_tests/python_models.py) whose config is the production one for the toy
contract, so the client connects and accepts the contract, but whose ``images`` output has the wrong shape, the
wrong row count, no rows, the wrong dtype, or is missing. Triton passes all of them on as successes; the client
must stop with a clear error (kaem-generate: ``error: ...``, exit code 2, no PNG)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from python_models import FAULTS, build_faulty_repository, model_name
from testpaths import ROOT
from tritonclient.grpc import service_pb2

from export.toy_model import TOY_CONTRACT
from serving import client, metrics
from serving.client import MalformedResponse, RetryPolicy, ServingError
from serving.local.launcher import LocalTriton, free_ports

SEEDS = [0, 1, 2]
H, W, C = TOY_CONTRACT.image_h, TOY_CONTRACT.image_w, TOY_CONTRACT.image_c
HINT = "keep numpy<2 on the server"
# fault -> what the client's error says about it (a request of 3 rows)
MESSAGES = {
    "shape": [f"'images' has shape [3, {H}, {W - 2}, {C}], the contract says [3, {H}, {W}, {C}] (one {H}x{W}x{C}"
              " image per requested row)"],
    "rows": [f"'images' has shape [4, {H}, {W}, {C}], the contract says [3, {H}, {W}, {C}]"],
    "empty": [f"'images' has shape [0, {H}, {W}, {C}], the contract says [3, {H}, {W}, {C}]", HINT],
    "missing": ["it has no 'images' output", HINT],
    "dtype": [f"'images' is FP32 [3, {H}, {W}, {C}], the contract says UINT8"],
}
assert set(MESSAGES) == set(FAULTS) - {"good"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_faulty_repository(tmp_path_factory.mktemp("faulty"))
    grpc_port, http_port, metrics_port = free_ports(3)
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                     log_file=tmp_path_factory.mktemp("log") / "tritonserver.log") as srv:
        yield srv


@pytest.mark.triton
def test_a_contract_abiding_python_model_passes_the_checks(server) -> None:
    images, stats = client.generate_images(server.grpc_url, model_name("good"), SEEDS)
    assert images.dtype == np.uint8 and images.shape == (3, H, W, C) and (images == 128).all()
    assert stats.requests == 1


@pytest.mark.triton
@pytest.mark.parametrize("fault", sorted(MESSAGES))
def test_a_malformed_images_output_is_refused(server, fault) -> None:
    model = model_name(fault)
    with pytest.raises(MalformedResponse) as err:
        client.generate_images(server.grpc_url, model, SEEDS)
    text = str(err.value)
    assert text.startswith(f"malformed response from {model!r} to a request of 3 rows: "), text
    for part in MESSAGES[fault]:
        assert part in text, text
    assert isinstance(err.value, ServingError)  # the KaemError every command prints as "error: ..."


@pytest.mark.triton
def test_a_malformed_answer_is_never_retried_and_counts_as_a_success_on_the_server(server) -> None:
    # Triton counts the answer a success: only the client can catch it, and trying again would not help.
    model = model_name("rows")
    before = metrics.read_settled(server.metrics_url, model)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(MalformedResponse, match="'images' has shape"):
            client.infer_with_retries(c, model, client.u_for_contract(SEEDS, TOY_CONTRACT), 10.0,
                                      RetryPolicy(retries=5, base_s=0.0), random.Random(0), TOY_CONTRACT)
    finally:
        c.close()
    window = metrics.delta(metrics.read_settled(server.metrics_url, model), before)[model]["1"]
    assert (window["success"], window["failed"]) == (1, 0)


@pytest.mark.triton
def test_concurrent_requests_stop_at_the_first_malformed_answer(server) -> None:
    with pytest.raises(MalformedResponse, match=r"to a request of 2 rows: 'images' is FP32 \[2,"):
        client.generate_images(server.grpc_url, model_name("dtype"), list(range(8)), batch_size=2, concurrency=3)


@pytest.mark.triton
def test_kaem_generate_exits_2_with_an_error_line_and_writes_no_png(server, tmp_path) -> None:
    out, out_dir = tmp_path / "grid.png", tmp_path / "each"
    done = subprocess.run([sys.executable, "-m", "serving.client", "--url", server.grpc_url, "--model",
                           model_name("shape"), "--seeds", "0-2", "--out", str(out), "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: malformed response from 'kaem_faulty_shape'"), done.stderr
    assert MESSAGES["shape"][0] in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not out_dir.exists() and list(tmp_path.iterdir()) == []
    assert "wrote" not in done.stdout


def test_an_answer_whose_bytes_disagree_with_its_shape_is_refused() -> None:
    # No Triton sends this (it serializes what the model returned), so it is built here: the real response type,
    # read the way tritonclient reads it. The client checks the byte count before decoding: no numpy error.
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="images", datatype="UINT8", shape=[2, H, W, C])
    response.raw_output_contents.append(bytes(2 * H * W * C - 5))
    with pytest.raises(MalformedResponse, match=rf"of shape \[2, {H}, {W}, {C}\] \(UINT8\) holds {2 * H * W * C - 5}"
                                                rf" bytes, not {2 * H * W * C}"):
        client.checked_images(grpcclient.InferResult(response), 2, "m", TOY_CONTRACT)
    response.raw_output_contents[0] = bytes(2 * H * W * C)
    images = client.checked_images(grpcclient.InferResult(response), 2, "m", TOY_CONTRACT)
    assert images.shape == (2, H, W, C) and images.dtype == np.uint8
