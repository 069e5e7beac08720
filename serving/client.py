"""``kaem-generate``: seeds -> uniforms -> Triton (gRPC) -> uint8 images -> PNG grid.

The client checks liveness, readiness and the served model's contract before sending anything,
retries what the server turned away for now (capped exponential backoff with full jitter, within an
optional deadline per request), and records its own request latencies in a Prometheus histogram
(histograms aggregate across replicas; Triton's summaries do not).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry, Histogram
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from export.contract import (
    DEFAULT_MODEL_NAME,
    INPUT_U,
    OUTPUT_IMAGES,
    OUTPUT_IMAGES_DTYPE,
    ContractError,
    ModelContract,
    request_rows,
)
from export.triton_config import contract_from_config
from serving.metrics import histogram_quantile
from training import uniforms
from training.cli import command
from training.errors import KaemError
from training.uniforms import parse_seeds

# Request latency buckets in seconds: 0.25 ms .. ~46 s, x sqrt(2) per bucket (quantile estimates
# interpolate inside one bucket, so their error is bounded by its width).
LATENCY_BUCKETS = tuple(round(0.00025 * 2 ** (i / 2), 7) for i in range(36))


# Retries: a request is tried again only when the server turned it away *for now*. Triton 2.51 (observed on the
# local server) answers both rejections of a model's bounded queue with gRPC UNAVAILABLE: "[request id: ...]
# Exceeds maximum queue size" when the queue is full (not counted in its failure metrics) and "Request timeout
# expired" when the request waited past its queue timeout (counted as reason="REJECTED"). A server or proxy
# that cannot be reached mid-run is UNAVAILABLE too. Everything else fails again the same way (INVALID_ARGUMENT
# for a bad shape or batch size, NOT_FOUND for an unknown model) or already took --timeout (DEADLINE_EXCEEDED,
# which the server counts as CANCELED), and is never retried.
RETRY_STATUS = "StatusCode.UNAVAILABLE"
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"
QUEUE_TIMEOUT_MESSAGE = "Request timeout expired"
# Defaults of kaem-generate: 2 retries ride out a short overload burst while multiplying the load an overloaded
# server sees by at most 3; the backoff before retry k is uniform in [0, min(cap, base * 2**k)] ("full jitter",
# so that clients rejected together do not come back together): 0-50 ms, then 0-100 ms, ..., at most 2 s.
DEFAULT_RETRIES = 2
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0


class ServingError(KaemError):
    """The server is unreachable, not ready, does not serve the model, or rejected a request."""


class RequestFailed(ServingError):
    """An inference request that failed for good; ``attempts`` says how many times it was sent."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class ServerUnavailable(ServingError):
    """No server answers at the address, or it or the model is not ready yet: what a restart or a model load
    looks like from the client, so :func:`connect_with_retries` tries again."""


class MalformedResponse(ServingError):
    """The server answered, but its ``images`` output disagrees with the model's contract (missing, not uint8,
    not one H x W x C image per requested row, or not that many bytes): a broken model, never retried."""


def rejection_kind(err: InferenceServerException) -> str | None:
    """Why a failed request is worth another attempt: ``"queue_full"``, ``"queue_timeout"`` (Triton's bounded
    queue turned it away) or ``"unavailable"`` (any other gRPC UNAVAILABLE); None: never retry it."""
    if err.status() != RETRY_STATUS:
        return None
    message = err.message() or ""
    if QUEUE_FULL_MESSAGE in message:
        return "queue_full"
    if QUEUE_TIMEOUT_MESSAGE in message:
        return "queue_timeout"
    return "unavailable"


def status_name(err: InferenceServerException) -> str:
    """``UNAVAILABLE`` for tritonclient's ``StatusCode.UNAVAILABLE``; ``CLIENT`` for an error raised in the client."""
    return str(err.status() or "CLIENT").removeprefix("StatusCode.")


@dataclass(frozen=True)
class RetryPolicy:
    """How one request is retried: at most ``retries`` more attempts after the first, each after a backoff
    (seconds) drawn by :meth:`backoff_s`; ``deadline_s`` (None: none) bounds the request's total time, attempts
    and backoffs together, and each attempt waits at most min(per-attempt timeout, time left)."""

    retries: int = DEFAULT_RETRIES
    deadline_s: float | None = None
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ServingError(f"--retries must be >= 0, got {self.retries}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ServingError(f"--deadline must be > 0 seconds, got {self.deadline_s}")
        if not 0 <= self.base_s <= self.cap_s:
            raise ServingError(f"backoff needs 0 <= base <= cap, got base {self.base_s} s, cap {self.cap_s} s")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 first): capped exponential backoff with full jitter,
        uniform in [0, min(cap, base * 2**retry)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2.0**retry))


DEFAULT_RETRY = RetryPolicy()


@dataclass
class ServedModel:
    """What the client learned about one served model before sending."""

    name: str
    contract: ModelContract
    max_batch_size: int


@dataclass
class GenerationStats:
    """Client-side view of one ``generate_images`` call (latencies in seconds)."""

    images: int
    requests: int
    wall_s: float
    registry: CollectorRegistry = field(repr=False)
    histogram: Histogram = field(repr=False)
    attempts: int = 0  # requests sent, retries included (0: not counted)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else math.nan

    def latency_quantile(self, q: float) -> float:
        """Request-latency quantile (s) estimated from the histogram buckets."""
        buckets = [(float(s.labels["le"]), s.value) for m in self.registry.collect() for s in m.samples
                   if s.name.endswith("_bucket")]
        return histogram_quantile(q, buckets)

    def summary(self) -> str:
        p50, p90, p99 = (1000 * self.latency_quantile(q) for q in (0.5, 0.9, 0.99))
        retried = f" ({self.attempts - self.requests} retried attempts)" if self.attempts > self.requests else ""
        return (f"{self.images} images in {self.requests} requests{retried}, {self.wall_s:.3f} s: "
                f"{self.images_per_s:,.1f} images/s; request latency p50 {p50:.2f} ms, p90 {p90:.2f} ms,"
                f" p99 {p99:.2f} ms (client-side, estimated from histogram buckets, retries included)")


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InferenceServerException as err:
        raise ServingError(f"{what}: {err.message() or err}") from None


def connect(url: str, model: str, timeout_s: float = 10.0) -> tuple[grpcclient.InferenceServerClient, ServedModel]:
    """Open a gRPC client, check server liveness/readiness and model readiness, and read the
    model's contract from its config (raises :class:`ServingError` or ``ContractError``)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        try:
            live = client.is_server_live(client_timeout=timeout_s)
        except InferenceServerException as err:
            raise ServerUnavailable(f"no Triton server reachable at {url} ({err.message() or err}):"
                                    " start one with kaem-serve or pass --url host:port") from None
        if not live:
            raise ServerUnavailable(f"the Triton server at {url} is not live")
        if not _call("readiness", client.is_server_ready, client_timeout=timeout_s):
            raise ServerUnavailable(f"the Triton server at {url} is live but not ready (models still loading?)")
        if not _call("model readiness", client.is_model_ready, model, client_timeout=timeout_s):
            index = _call("repository index", client.get_model_repository_index)
            names = sorted({m.name for m in index.models if m.state == "READY"})
            raise ServerUnavailable(f"model {model!r} is not served (ready) at {url}; ready models: "
                                    f"{names or 'none'}")
    except BaseException:
        client.close()
        raise
    cfg = _call("model config", client.get_model_config, model, client_timeout=timeout_s).config
    try:
        contract = contract_from_config(cfg)
    except ContractError as err:
        raise ContractError(f"refusing model {model!r} at {url}: {err}") from None
    return client, ServedModel(model, contract, cfg.max_batch_size)


def connect_with_retries(url: str, model: str, policy: RetryPolicy = DEFAULT_RETRY, rng: random.Random | None = None,
                         timeout_s: float = 10.0) -> tuple[grpcclient.InferenceServerClient, ServedModel]:
    """:func:`connect`, tried again while the server is unreachable or not ready (a restart, a model load), with
    the same retries, backoff and deadline as a request (``policy``); then the last reason, with the count."""
    rng = rng or random.Random()
    start, attempts = time.monotonic(), 0
    deadline = math.inf if policy.deadline_s is None else policy.deadline_s
    while True:
        attempts += 1
        left = deadline - (time.monotonic() - start)
        try:
            return connect(url, model, min(timeout_s, max(left, 0.1)))
        except ServerUnavailable as err:
            wait = policy.backoff_s(attempts - 1, rng)
            spent = time.monotonic() - start
            if attempts > policy.retries or spent + wait >= deadline:
                if attempts == 1:
                    raise
                raise ServerUnavailable(f"{err} (still so after {_attempts(attempts)} in {spent:.1f} s; --retries "
                                        f"{policy.retries}, --deadline {policy.deadline_s})") from None
        time.sleep(wait)


def u_for_contract(seeds: Sequence[int], contract: ModelContract, truncation: float = 1.0) -> np.ndarray:
    """Uniforms ``[N, D]`` for image seeds, with the truncation trick on the ITS columns only."""
    return uniforms.seeds_to_u(seeds, contract.u_dim, contract.its_start, truncation)


Rows = np.ndarray | Mapping[str, np.ndarray]  # u [N, D], or a request's named input tensors (request_rows)


def _named(rows: Rows) -> Mapping[str, np.ndarray]:
    return {INPUT_U: np.asarray(rows, dtype=np.float32)} if isinstance(rows, np.ndarray) else rows


def _n_rows(rows: Rows) -> int:
    return next(iter(_named(rows).values())).shape[0]


def infer_inputs(rows: Rows) -> list[grpcclient.InferInput]:
    """The request's input tensors (``tritonclient.grpc.aio`` takes the same objects): ``u`` as an array, or
    the named tensors of :func:`export.contract.request_rows` (a seed model's ``seed`` and ``truncation``)."""
    out = []
    for name, array in _named(rows).items():
        array = np.ascontiguousarray(array)
        inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inp.set_data_from_numpy(array)
        out.append(inp)
    return out


def _infer(client: grpcclient.InferenceServerClient, model: str, rows: Rows, timeout_s: float,
           contract: ModelContract | None = None) -> np.ndarray:
    """One attempt; a failure raises :class:`ServingError` with the server's message, a malformed answer
    :class:`MalformedResponse` (:func:`checked_images`)."""
    result = _call(f"inference on {model!r}", client.infer, model, infer_inputs(rows),
                   outputs=[grpcclient.InferRequestedOutput(OUTPUT_IMAGES)], client_timeout=timeout_s)
    return checked_images(result, _n_rows(rows), model, contract)


def _raw_output(result, name: str):
    """The named output's tensor description and raw bytes in a gRPC answer; (None, b"") when it has none."""
    response = result.get_response()
    for index, output in enumerate(response.outputs):
        if output.name == name:
            raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
            return output, raw
    return None, b""


def checked_images(result, n: int, model: str, contract: ModelContract | None = None) -> np.ndarray:
    """The uint8 images ``[n, H, W, C]`` of a gRPC answer to a request of ``n`` rows, after checking the answer
    against the model's contract: an ``images`` output is there, its datatype is UINT8, its shape is one
    H x W x C image (the contract's) per requested row, and its bytes are exactly that many. Anything else
    raises :class:`MalformedResponse` naming what is wrong (without ``contract``: any image shape passes).
    The checks read the answer's own description before decoding it, so no answer ends in a numpy error."""
    out, raw = _raw_output(result, OUTPUT_IMAGES)
    bad = f"malformed response from {model!r} to a request of {n} row{'s' * (n != 1)}:"
    hint = " (a Python-backend stub running with numpy 2 answers so: keep numpy<2 on the server)"
    if out is None:
        raise MalformedResponse(f"{bad} it has no {OUTPUT_IMAGES!r} output{hint}")
    shape = [int(d) for d in out.shape]
    want_dtype = OUTPUT_IMAGES_DTYPE.removeprefix("TYPE_")
    if out.datatype != want_dtype:
        raise MalformedResponse(f"{bad} {OUTPUT_IMAGES!r} is {out.datatype} {shape}, the contract says {want_dtype}")
    if contract is None:
        image, want = None, f"expected [{n}, H, W, C] (one image per requested row)"
    else:
        image = [contract.image_h, contract.image_w, contract.image_c]
        want = f"the contract says {[n, *image]} (one {'x'.join(map(str, image))} image per requested row)"
    if len(shape) != 4 or shape[0] != n or image is not None and shape[1:] != image:
        empty = hint if n and shape[:1] == [0] else ""
        raise MalformedResponse(f"{bad} {OUTPUT_IMAGES!r} has shape {shape}, {want}{empty}")
    if len(raw) != math.prod(shape):
        raise MalformedResponse(f"{bad} {OUTPUT_IMAGES!r} of shape {shape} ({want_dtype}) holds {len(raw)} bytes,"
                                f" not {math.prod(shape)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' * (n != 1)}"


def _deadline_error(what: str, policy: RetryPolicy, attempts: int, spent: float, why: str,
                    err: InferenceServerException) -> RequestFailed:
    return RequestFailed(f"{what} gave up after {_attempts(attempts)} in {spent:.2f} s: {why}"
                         f" the deadline of {policy.deadline_s:g} s (--deadline); last status {status_name(err)}:"
                         f" {err.message() or err}", attempts)


def infer_with_retries(client: grpcclient.InferenceServerClient, model: str, u: Rows, timeout_s: float,
                       policy: RetryPolicy = DEFAULT_RETRY, rng: random.Random | None = None,
                       contract: ModelContract | None = None) -> tuple[np.ndarray, int]:
    """Images for ``u`` (or a seed model's named inputs, :data:`Rows`) and the number of attempts they took. An
    attempt waits at most ``timeout_s`` seconds (and no longer than the time left before ``policy.deadline_s``);
    only rejections for now (:func:`rejection_kind`) are retried, after :meth:`RetryPolicy.backoff_s` drawn from
    ``rng`` (seed it for a reproducible schedule). Raises :class:`RequestFailed` naming the last status, and
    :class:`MalformedResponse` (never retried) for an answer that breaks ``contract`` (:func:`checked_images`)."""
    rng = rng or random.Random()
    what, inputs = f"inference on {model!r}", infer_inputs(u)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT_IMAGES)]
    deadline = math.inf if policy.deadline_s is None else policy.deadline_s
    start, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        left = deadline - (time.monotonic() - start)
        try:
            result = client.infer(model, inputs, outputs=outputs, client_timeout=min(timeout_s, max(left, 0.0)))
            return checked_images(result, _n_rows(u), model, contract), attempts
        except InferenceServerException as err:
            spent = time.monotonic() - start
            if rejection_kind(err) is None:
                if left < timeout_s and status_name(err) == "DEADLINE_EXCEEDED":
                    raise _deadline_error(what, policy, attempts, spent, "the last attempt ran into", err) from None
                raise RequestFailed(f"{what}: {err.message() or err}", attempts) from None
            if attempts > policy.retries:
                raise RequestFailed(f"{what} failed after {_attempts(attempts)} (--retries {policy.retries}); last"
                                    f" status {status_name(err)}: {err.message() or err}", attempts) from None
            wait = policy.backoff_s(attempts - 1, rng)
            if spent + wait >= deadline:
                raise _deadline_error(what, policy, attempts, spent, "the next attempt would start after",
                                      err) from None
        time.sleep(wait)


def generate_images(url: str, model: str, seeds: Sequence[int], truncation: float = 1.0, concurrency: int = 1,
                    batch_size: int | None = None, timeout_s: float = 60.0, retry: RetryPolicy = DEFAULT_RETRY,
                    rng: random.Random | None = None) -> tuple[np.ndarray, GenerationStats]:
    """Images uint8 ``[N, H, W, C]`` for ``seeds`` (in seed order) from a Triton server at ``url``
    (gRPC ``host:port``). Requests hold at most ``batch_size`` rows (default and cap: the model's
    ``max_batch_size``); ``concurrency`` requests are in flight at once, one client per thread; each attempt
    waits at most ``timeout_s`` seconds, and ``retry`` says which failures are tried again and when: the first
    connection while the server is unreachable or not ready (:func:`connect_with_retries`) and each request
    (:func:`infer_with_retries`); ``rng`` draws the backoffs."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not seeds:
        raise ValueError("no seeds given")
    rng = rng or random.Random()
    client, served = connect_with_retries(url, model, retry, rng)
    limit = min(batch_size or served.max_batch_size, served.max_batch_size)
    if limit < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = request_rows(seeds, served.contract, truncation)  # u, or the seeds for a model that takes seeds
    chunks = [{k: v[i : i + limit] for k, v in rows.items()} for i in range(0, len(seeds), limit)]
    registry = CollectorRegistry()
    hist = Histogram("kaem_client_request_seconds", "Client-side Triton request latency",
                     ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    observe = hist.labels(model=model)
    local, opened, attempts = threading.local(), [client], []

    def run(chunk: Rows) -> np.ndarray:
        if concurrency == 1:
            local.client = client
        elif not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
            opened.append(local.client)  # list.append is atomic under the GIL
        t0 = time.perf_counter()
        images, n = infer_with_retries(local.client, model, chunk, timeout_s, retry, rng, served.contract)
        observe.observe(time.perf_counter() - t0)
        attempts.append(n)
        return images

    t0 = time.perf_counter()
    try:
        if concurrency == 1:
            parts = [run(c) for c in chunks]
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                parts = list(pool.map(run, chunks))  # map keeps seed order
    finally:
        for c in opened:
            c.close()
    wall = time.perf_counter() - t0
    stats = GenerationStats(len(seeds), len(chunks), wall, registry, hist, sum(attempts))
    return np.concatenate(parts), stats


def _upscale_for(h: int, w: int, target: int = 96) -> int:
    return max(1, target // max(h, w))


def server_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A CLI parser with the options every client of a served model shares (``--url``, ``--model``)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address (host:port)")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="served model name")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = server_parser("kaem-generate", __doc__)
    p.add_argument("--seeds", required=True, help="image seeds: '0-63', '7' or '0-9,100,200-203'")
    p.add_argument("--truncation", type=float, default=1.0,
                   help="truncation T in (0, 1] on the ITS uniforms: u' = 0.5 + T (u - 0.5); 1 is off")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--batch-size", type=int, default=None, help="rows per request (default: model max_batch_size)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--out-dir", default=None, help="also write one PNG per seed into this folder")
    p.add_argument("--upscale", type=int, default=0, help="pixel repeat for the grid (0: auto, ~96 px per image)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt of a request")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help="extra attempts for a request the server turned away for now (gRPC UNAVAILABLE: the"
                        " model's queue is full, the request timed out in it, or the server is briefly"
                        " unreachable), and for the first connection while no server answers or it or the model"
                        " is not ready yet (a restart, a model load), each after a backoff uniform in"
                        f" [0, min({BACKOFF_CAP_S:g} s,"
                        f" {BACKOFF_BASE_S:g} s x 2^k)] before retry k (capped exponential, full jitter). Never"
                        " retried: INVALID_ARGUMENT and every other error, and an attempt that ran into --timeout."
                        f" The default ({DEFAULT_RETRIES}: waits of at most {1000 * BACKOFF_BASE_S:g} and"
                        f" {2000 * BACKOFF_BASE_S:g} ms) rides out a short burst"
                        " while at most tripling what an overloaded server is sent; 0 fails on the first rejection")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds one request (and the first connection) may take in all, attempts and backoffs"
                        " together (each attempt waits at most min(--timeout, time left)); past it the command"
                        " fails naming the last status. None: no bound beyond --retries and --timeout")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    from training.images import save_each, save_grid

    args = build_parser().parse_args(argv)
    seeds = parse_seeds(args.seeds)
    retry = RetryPolicy(retries=args.retries, deadline_s=args.deadline)
    images, stats = generate_images(args.url, args.model, seeds, args.truncation, args.concurrency,
                                    args.batch_size, args.timeout, retry)
    upscale = args.upscale or _upscale_for(images.shape[1], images.shape[2])
    grid = save_grid(images, args.out, upscale=upscale)
    print(f"wrote {grid} ({len(seeds)} images of {images.shape[1]}x{images.shape[2]}x{images.shape[3]},"
          f" upscaled x{upscale})")
    if args.out_dir:
        paths = save_each(images, args.out_dir, seeds)
        print(f"wrote {len(paths)} PNGs to {args.out_dir}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
