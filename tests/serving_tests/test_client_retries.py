"""kaem-generate's overload handling: the backoff schedule (no server), then the real local Triton 2.51 with toy
models whose bounded queue rejects: queue-full and queue-timeout rejections are retried until success or the
deadline, INVALID_ARGUMENT never, and the client's attempt count matches the server's own count."""

from __future__ import annotations

import random
import re
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.toy_model import TOY_CONTRACT, TOY_MODEL, build_toy_repository, reference_images, write_toy_model
from export.triton_config import render_config
from serving import client, metrics
from serving.client import RequestFailed, RetryPolicy, ServingError
from serving.local.launcher import LocalTriton, free_ports

# At most one request waits, and the batcher holds it 300 ms for others to join: concurrent requests are turned
# away every time. (Without the hold the toy model drains its queue so fast that 32 requests at concurrency 4 may
# all get through; a CI run saw that.)
QUEUE_OF_ONE = "kaem_toy_queue1"
EXPIRES = "kaem_toy_expires"  # a 1 µs queue timeout: every request is rejected after waiting in the queue
DELAYED = "kaem_toy_delayed"  # the batcher holds a lone request 1 s for others to join: a slow answer
D = TOY_CONTRACT.u_dim


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(retries=8, base_s=0.05, cap_s=2.0)
    for retry, bound in enumerate((0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0)):
        rng = random.Random(retry)
        waits = np.array([policy.backoff_s(retry, rng) for _ in range(4000)])
        assert waits.min() >= 0 and waits.max() <= bound
        # uniform on [0, bound]: mean bound/2, and both ends are reached (full jitter, not "bound/2 + jitter")
        assert waits.mean() == pytest.approx(bound / 2, rel=0.05)
        assert waits.min() < 0.01 * bound and waits.max() > 0.99 * bound
    # a seeded generator gives the same schedule every time, drawn as uniform(0, min(cap, base * 2**k))
    first = [policy.backoff_s(k, random.Random(7)) for k in range(8)]
    assert first == [policy.backoff_s(k, random.Random(7)) for k in range(8)]
    assert first == [random.Random(7).uniform(0.0, min(2.0, 0.05 * 2**k)) for k in range(8)]


@pytest.mark.parametrize("status, message, kind", [
    # the answers of the real Triton 2.51 server (tritonclient's status strings)
    ("StatusCode.UNAVAILABLE", "[request id: <id_unknown>] Exceeds maximum queue size", "queue_full"),
    ("StatusCode.UNAVAILABLE", "Request timeout expired", "queue_timeout"),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", "unavailable"),
    ("StatusCode.INVALID_ARGUMENT", "[request id: <id_unknown>] inference request batch-size must be <= 64", None),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", None),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", None),
    (None, "Exceeds maximum queue size", None),  # an error raised inside the client, not by the server
])
def test_only_rejections_for_now_are_retried(status, message, kind) -> None:
    assert client.rejection_kind(InferenceServerException(message, status=status)) == kind


@pytest.mark.parametrize("argv, message", [(["--retries", "-1"], "--retries must be >= 0"),
                                           (["--deadline", "0"], "--deadline must be > 0 seconds")])
def test_bad_retry_options_exit_with_a_message(argv, message, capsys) -> None:
    assert client.main(["--seeds", "0-3", "--url", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_toy_repository(tmp_path_factory.mktemp("retries"))
    for name, size, timeout_us, delay_us in ((QUEUE_OF_ONE, 1, 10_000_000, 300_000), (EXPIRES, 0, 1, 0),
                                             (DELAYED, 0, 10_000_000, 1_000_000)):
        write_toy_model(repo / name, config_text=render_config(name, TOY_CONTRACT, max_batch_size=64,
                                                               max_queue_delay_us=delay_us, max_queue_size=size,
                                                               queue_timeout_us=timeout_us))
    grpc_port, http_port, metrics_port = free_ports(3)
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                     log_file=tmp_path_factory.mktemp("log") / "tritonserver.log") as srv:
        yield srv


@pytest.fixture()
def grpc(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _rejected(server: LocalTriton, model: str, before: dict) -> float:
    window = metrics.delta(metrics.read_settled(server.metrics_url, model), before)[model]["1"]
    return window["failures"]["REJECTED"]


@pytest.mark.triton
def test_queue_full_rejections_are_retried_until_every_image_arrives(server) -> None:
    seeds = list(range(8))  # served one at a time, each held 300 ms
    # Triton 2.51's batcher sometimes stalls for 500 ms with a queue policy (a full queue all that time), so a
    # request may be turned away dozens of times in a row here: retry often and without a count limit.
    patient = RetryPolicy(retries=10_000, base_s=0.005, cap_s=0.1)
    images, stats = client.generate_images(server.grpc_url, QUEUE_OF_ONE, seeds, batch_size=1, concurrency=4,
                                           retry=patient, rng=random.Random(0))
    repo = server.model_repository
    ref = reference_images(repo / QUEUE_OF_ONE / "1" / "model.onnx", client.u_for_contract(seeds, TOY_CONTRACT))
    assert np.array_equal(images, ref["images"])
    assert stats.requests == 8 and stats.attempts > stats.requests  # the queue of one turned requests away
    assert "retried attempts" in stats.summary()
    # without retries the same load fails on the first rejection, naming Triton's status and message
    with pytest.raises(RequestFailed, match=r"after 1 attempt \(--retries 0\); last status UNAVAILABLE: .*Exceeds "
                                            "maximum queue size") as err:
        client.generate_images(server.grpc_url, QUEUE_OF_ONE, seeds, batch_size=1, concurrency=4,
                               retry=RetryPolicy(retries=0))
    assert err.value.attempts == 1


@pytest.mark.triton
def test_queue_timeouts_are_retried_and_counted_like_the_server_counts_them(server, grpc) -> None:
    before = metrics.read_settled(server.metrics_url, EXPIRES)
    u = client.u_for_contract([0, 1], TOY_CONTRACT)
    with pytest.raises(RequestFailed, match=r"after 3 attempts \(--retries 2\); last status UNAVAILABLE: Request "
                                            "timeout expired") as err:
        client.infer_with_retries(grpc, EXPIRES, u, 10.0, RetryPolicy(retries=2, base_s=0.001), random.Random(0))
    assert err.value.attempts == 3 and _rejected(server, EXPIRES, before) == 3  # Triton counts each as REJECTED


@pytest.mark.triton
def test_the_deadline_bounds_all_attempts_together(server, tmp_path, capsys) -> None:
    t0 = time.monotonic()
    rc = client.main(["--url", server.grpc_url, "--model", EXPIRES, "--seeds", "0-3", "--retries", "1000",
                      "--deadline", "0.6", "--out", str(tmp_path / "grid.png")])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: inference on 'kaem_toy_expires' gave up after") and "Traceback" not in err
    assert re.search(r"gave up after \d+ attempts? in 0\.\d\d s: .* the deadline of 0.6 s \(--deadline\); last status "
                     r"(UNAVAILABLE: Request timeout expired|DEADLINE_EXCEEDED)", err), err
    assert elapsed < 0.6 + 5.0  # connect and the contract check come on top of the deadline; never 1000 retries
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.triton
@pytest.mark.parametrize("rows, cols, message", [(2, D - 1, f"Expected [-1,{D}], got [2,{D - 1}]"),
                                                 (65, D, "batch-size must be <= 64")])
def test_invalid_argument_is_never_retried(grpc, rows, cols, message) -> None:
    u = np.full((rows, cols), 0.5, np.float32)
    with pytest.raises(RequestFailed) as err:
        client.infer_with_retries(grpc, TOY_MODEL, u, 10.0, RetryPolicy(retries=5, base_s=0.0), random.Random(0))
    assert err.value.attempts == 1 and message in str(err.value) and "attempts" not in str(err.value)


@pytest.mark.triton
def test_an_attempt_cut_by_the_deadline_says_so(grpc) -> None:
    u = client.u_for_contract([0], TOY_CONTRACT)
    t0 = time.monotonic()
    with pytest.raises(ServingError, match=r"gave up after 1 attempt in 0\.\d\d s: the last attempt ran into the "
                                           r"deadline of 0.3 s \(--deadline\); last status DEADLINE_EXCEEDED"):
        client.infer_with_retries(grpc, DELAYED, u, 10.0, RetryPolicy(retries=3, deadline_s=0.3))
    assert time.monotonic() - t0 < 1.0  # cut at the deadline, before the 1 s answer (or the 10 s timeout)
    # the client's own --timeout is per attempt and never retried
    with pytest.raises(RequestFailed, match="Deadline Exceeded") as err:
        client.infer_with_retries(grpc, DELAYED, u, 0.3, RetryPolicy(retries=3))
    assert err.value.attempts == 1
