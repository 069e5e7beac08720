"""``kaem-serve``: run the real Triton 2.51 server (from nvidia-pytriton) on this CPU machine,
serving the production model repository unchanged through the Python-based onnxruntime shim.

Python API: :class:`LocalTriton` (a context manager used by tests, demo and benchmarks) and
:func:`free_ports`.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from export.triton_config import (
    DEFAULT_MODEL_FILENAME,
    TritonConfigError,
    parse_config,
    version_dirs,
)
from serving.local.triton_env import TritonNotInstalled, build_backend_dir, cache_dir, server_env, triton_install
from serving.verify_repository import verify
from serving.warmup import zeros_inputs
from training.cli import command
from training.errors import KaemError

SUMMARY_METRICS_ARGS = ("--metrics-config=summary_latencies=true",
                        "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001")
# The server flags local and production serving share, one source: the Dockerfile's CMD is `tritonserver
# --model-repository=/models` followed by these and model_control_args("none") (tests/test_dockerfile.py).
# Serve exactly the config on disk (no auto-completion); drain for up to 5 s on SIGTERM.
# Triton's response cache, 64 MiB in memory: used by the models whose config enables it (kaem-export --seed-model;
# a seed model's ~4 KB per image holds ~16,000 single-image answers); the others never touch it.
CACHE_ARGS = ("--cache-config=local,size=67108864",)
SERVING_ARGS = ("--disable-auto-complete-config", "--exit-timeout-secs=5", *SUMMARY_METRICS_ARGS, *CACHE_ARGS)
MODEL_CONTROL_MODES = ("none", "poll", "explicit")


def model_control_args(mode: str, poll_secs: int = 2) -> list[str]:
    """Triton's flags for a model-control mode: ``none`` loads the repository once (a baked image); ``poll``
    rescans it every ``poll_secs`` (a new export or a rollback goes live without a restart); ``explicit`` loads
    everything at start, then only what the repository API (``/v2/repository/models/<name>/load``) asks for."""
    if mode == "none":
        return ["--model-control-mode=none"]
    if mode == "poll":
        if poll_secs < 1:
            raise LaunchError(f"--repository-poll-secs must be >= 1, got {poll_secs}")
        return ["--model-control-mode=poll", f"--repository-poll-secs={poll_secs}"]
    if mode == "explicit":
        return ["--model-control-mode=explicit", "--load-model=*"]
    raise LaunchError(f"model control mode {mode!r} is not one of {', '.join(MODEL_CONTROL_MODES)}")


_ERROR_LINE = re.compile(r"^E\d{4} |UNAVAILABLE|failed to load|error:|Error:", re.IGNORECASE)


class LaunchError(KaemError):
    """The server cannot start or did not become ready; the message says why."""


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (for tests; another process may still race)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise :class:`LaunchError` naming the first port someone else listens on."""
    for label, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Like the server itself: TIME_WAIT leftovers do not block, a live listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as err:
                flag = f"--{label.lower()}-port"
                raise LaunchError(
                    f"{label} port {port} on {host} is already in use ({err.strerror}): stop the other"
                    f" server (another kaem-serve?) or choose a free port with {flag}"
                ) from None


def _served_versions(model_dir: Path, policy) -> list[Path]:
    versions = version_dirs(model_dir, model_file=None)
    which = policy.WhichOneof("policy_choice") if policy is not None else None
    if which == "all":
        return versions
    if which == "specific":
        return [p for p in versions if int(p.name) in set(policy.specific.versions)]
    n = policy.latest.num_versions if which == "latest" else 1
    return versions[-max(1, n):]


def check_repository(repo: str | Path) -> list[str]:
    """Names of the models in ``repo``; raise :class:`LaunchError` when it is missing or empty, a
    config does not parse, a served version folder lacks its model file, or a version's file is not the one its
    export recorded in the config (serving/verify_repository.py)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise LaunchError(f"model repository {repo} does not exist: export a model first"
                          " (python export/to_onnx.py ...) or pass --model-repository")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise LaunchError(f"model repository {repo} is empty: it needs <model>/config.pbtxt and <model>/1/model.onnx")
    for model_dir in models:
        config = model_dir / "config.pbtxt"
        if not config.is_file():
            if not any(model_dir.glob("[0-9]*/model.*")):  # a fresh clone's placeholder folder
                raise LaunchError(f"model {model_dir.name!r} in {repo} has not been exported yet: run make demo, or"
                                  f" kaem-export --checkpoint PATH --model-name {model_dir.name}")
            raise LaunchError(f"{model_dir} has no config.pbtxt (every folder in the repository is a model)")
        try:
            cfg = parse_config(config.read_text())
        except TritonConfigError as err:
            raise LaunchError(f"{config}: {err}") from None
        onnx = cfg.backend == "onnxruntime" or cfg.platform == "onnxruntime_onnx"
        filename = cfg.default_model_filename or (DEFAULT_MODEL_FILENAME if onnx else "")
        versions = _served_versions(model_dir, cfg.version_policy if cfg.HasField("version_policy") else None)
        if not versions:
            raise LaunchError(f"model {model_dir.name!r} has no numbered version folder in {model_dir}:"
                              " export the model first (python export/to_onnx.py ...)")
        for v in versions:
            if filename and not (v / filename).is_file():
                raise LaunchError(f"model {model_dir.name!r} version {v.name} has no {filename} ({v}):"
                                  " export the model first (python export/to_onnx.py ...)")
    try:  # every recorded digest, by the check the production pod's init container runs
        verify(repo)
    except RuntimeError as err:
        raise LaunchError(str(err)) from None
    return [m.name for m in models]


# Resolved once in the parent: between fork and exec the child only makes this one foreign call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # The server gets SIGTERM if the launching thread dies (even by SIGKILL), so crashed tests never
    # leave servers holding ports. Call start() from a long-lived thread.
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalTriton:
    """A local tritonserver process on loopback; ``with LocalTriton(repo, ...) as server:``.

    Ports are TCP ports; URLs are ``host:port`` as tritonclient and ``kaem-metrics`` take them."""

    def __init__(self, model_repository: str | Path = "model_repository", grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, host: str = "127.0.0.1",
                 log_file: str | Path | None = None, backend_dir: str | Path | None = None,
                 startup_timeout_s: float = 120.0, extra_args: Sequence[str] = (),
                 model_control_mode: str = "none", repository_poll_secs: int = 2, grpc_warmup: bool = True) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host, self.grpc_port, self.http_port, self.metrics_port = host, grpc_port, http_port, metrics_port
        self.log_file = Path(log_file) if log_file else cache_dir() / "logs" / f"tritonserver-{grpc_port}.log"
        self.backend_dir = Path(backend_dir) if backend_dir else None
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.control_args = model_control_args(model_control_mode, repository_poll_secs)
        self.models: list[str] = []
        self.grpc_warmup = grpc_warmup  # start() sends warm_up_grpc's request before it returns
        self.warmed: str | None = None  # the model warm_up_grpc sent its request to
        self.process: subprocess.Popen | None = None

    def _url(self, port: int) -> str:
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{port}"

    @property
    def grpc_url(self) -> str:
        return self._url(self.grpc_port)

    @property
    def http_url(self) -> str:
        return self._url(self.http_port)

    @property
    def metrics_url(self) -> str:
        return self._url(self.metrics_port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        inst = triton_install()
        return [
            str(inst.binary), f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}", f"--cache-directory={inst.caches}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            *SERVING_ARGS, *self.control_args, *self.extra_args,
        ]

    def start(self) -> LocalTriton:
        """Check repository and ports, start the server, wait until it and its models are ready, then warm its
        gRPC frontend with one request (:meth:`warm_up_grpc`; ``grpc_warmup=False`` skips it)."""
        if self.running:
            return self
        try:
            self.models = check_repository(self.model_repository)
            check_ports(self.host, {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port})
            self.backend_dir = self.backend_dir or build_backend_dir()
        except TritonNotInstalled as err:
            raise LaunchError(str(err)) from None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=server_env(), start_new_session=True, preexec_fn=_die_with_parent,
            )
        try:
            self.wait_ready(self.startup_timeout_s)
            self.warmed = self.warm_up_grpc() if self.grpc_warmup else None
        except BaseException:
            self.stop()
            raise
        return self

    def warm_up_grpc(self, timeout_s: float = 10.0) -> str | None:
        """Send one batch-1 inference of zeros over gRPC to the first loaded model without a response cache; the
        model it went to, or None (no such model, or it failed: the server serves regardless).

        Triton's ``model_warmup`` leaves the gRPC frontend cold (serving/warmup.py has the measurements; the
        production pod's startup probe runs that file against every model). One request warms the frontend; it
        counts as one request in that model's metrics, and a model with a response cache is left alone, so its
        cache counters are the clients' own."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            for name in self.models:
                cfg = parse_config((self.model_repository / name / "config.pbtxt").read_text())
                if cfg.response_cache.enable or not client.is_model_ready(name):
                    continue
                inputs = zeros_inputs(cfg, grpcclient)
                if inputs is not None:
                    client.infer(name, inputs, client_timeout=timeout_s)
                    return name
        except (InferenceServerException, TritonConfigError, OSError, TypeError, ValueError):
            return None
        finally:
            client.close()
        return None

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/v2/health/ready`` (strict readiness: every model loaded), then ``/metrics``, until
        ``timeout_s``: Triton opens its metrics port after the HTTP one, so a scrape right after HTTP
        readiness can be refused."""
        deadline = time.monotonic() + timeout_s
        for url in (f"http://{self.http_url}/v2/health/ready", f"http://{self.metrics_url}/metrics"):
            while not self._answers(url):
                if time.monotonic() >= deadline:
                    raise LaunchError(f"tritonserver was not ready after {timeout_s:.0f} s ({url} did not"
                                      f" answer). From {self.log_file}:\n{self.log_excerpt()}")
                time.sleep(0.1)

    def _answers(self, url: str) -> bool:
        if not self.running:
            raise LaunchError(f"tritonserver exited during startup (exit code {self.process.returncode})."
                              f" From {self.log_file}:\n{self.log_excerpt()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_excerpt(self, max_lines: int = 20) -> str:
        """Error lines of the server log (model load failures, bad configs), else its tail."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "  (no log)"
        errors = [ln for ln in lines if _ERROR_LINE.search(ln) and "CudaDriverHelper" not in ln]
        # the Python backend appends the stub's Python stack ("\n\nAt:\n ...") to each message
        return "\n".join("  " + ln.split("\\n\\nAt:")[0] for ln in (errors or lines)[-max_lines:])

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait (the server drains for up to 5 s), SIGKILL as a last resort; exit code."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when the wait is interrupted (a second Ctrl-C): never leave the server running
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop


def _kill_on_next_signal(server: LocalTriton) -> list[int]:
    """From now on SIGINT/SIGTERM kill the server at once instead of raising: the drain's wait then returns by
    itself, so a second Ctrl-C can land anywhere (even before the wait starts) without ending in an interrupt.
    Returns a list that records the signals received."""
    received: list[int] = []

    def kill(signum, frame) -> None:
        received.append(signum)
        if server.running:
            server.process.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, kill)
    return received


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaem-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="Triton model repository folder")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--log-file", default=None, help="server log (default: .cache/logs/tritonserver-<grpc port>.log)")
    p.add_argument("--backend-dir", default=None, help="prebuilt backend directory (default: built in .cache)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
                   help="none: load the repository once (as the production image does); poll: pick up new exports and "
                   "rollbacks (kaem-export --rollback) every --repository-poll-secs without a restart; explicit: load "
                   "everything at start, then what the repository API asks for")
    p.add_argument("--repository-poll-secs", type=int, default=2,
                   help="rescan interval under --model-control-mode poll")
    p.add_argument("--dry-run", action="store_true", help="check the repository, print the server command, exit")
    return p


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = LocalTriton(args.model_repository, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, host=args.host, log_file=args.log_file,
                         backend_dir=args.backend_dir, startup_timeout_s=args.startup_timeout,
                         model_control_mode=args.model_control_mode, repository_poll_secs=args.repository_poll_secs)
    if args.dry_run:
        models = check_repository(server.model_repository)
        server.backend_dir = server.backend_dir or build_backend_dir()
        print(f"models: {', '.join(models)}\ncommand: {' '.join(server.command())}")
        return 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_stop)
    cut: list[int] = []
    try:
        server.start()
        print(f"kaem-serve: Triton ready with models {', '.join(server.models)} from {server.model_repository}\n"
              f"  gRPC {server.grpc_url}   HTTP {server.http_url}   metrics http://{server.metrics_url}/metrics\n"
              f"  log {server.log_file}   (Ctrl-C to stop)", flush=True)
        rc = server.process.wait()
        print(f"kaem-serve: tritonserver exited on its own (code {rc}). From {server.log_file}:\n"
              f"{server.log_excerpt()}", file=sys.stderr)
        return rc or 1
    except (KeyboardInterrupt, _Stop):
        cut = _kill_on_next_signal(server)  # before the message that invites the second Ctrl-C
        print("kaem-serve: stopping (requests in flight get up to 5 s to finish; Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        return 0
    finally:
        was_running = server.running
        rc = server.stop()
        if cut:
            print("kaem-serve: stopped at once; requests still in flight were cut", file=sys.stderr)
        elif was_running and rc not in (0, -signal.SIGTERM):
            print(f"kaem-serve: tritonserver stopped with code {rc}", file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
