"""Operations tools for the deploy tests, built once under .cache/tools (checkov's venv, Debian's Prometheus
unpacked), a real Prometheus server process to query, and the alert rules split into query and threshold."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import promql_parser
import pytest
import yaml
from testpaths import ROOT

from serving.local.launcher import free_ports
from serving.local.triton_env import cache_dir

TOOLS = cache_dir() / "tools"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
_THRESHOLD = re.compile(r"^(?P<query>.*\S)\s*(?P<op>[<>]=?)\s*(?P<threshold>[-+.\deE]+)\s*$", re.S)


def built_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, made by ``build(folder)`` unless an earlier build finished. Built in place (a venv's scripts
    hold absolute paths); a marker written last tells a finished build from an interrupted one."""
    done = folder / ".complete"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        done.touch()
    return folder


def _unpack_prometheus(folder: Path) -> None:
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if not (apt and dpkg):
        pytest.fail("Prometheus for the deploy tests comes from Debian's `prometheus` package: this needs apt-get and"
                    " dpkg (Debian or Ubuntu)", pytrace=False)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        # apt's package lists and cache of its own (no root, whatever state the machine's apt is in)
        for sub in ("lists/partial", "cache/archives/partial"):
            Path(tmp, sub).mkdir(parents=True)
        opts = [f"-oDir::State::Lists={tmp}/lists", f"-oDir::Cache={tmp}/cache", "-oDebug::NoLocking=1", "-q"]
        for cmd in (["update"], ["download", "prometheus"]):
            r = subprocess.run([apt, *opts, *cmd], cwd=tmp, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                pytest.fail(f"`apt-get {' '.join(cmd)}` failed ({(r.stderr or r.stdout).strip()[-300:]}): the deploy"
                            " tests need Debian's package registry once, to unpack its `prometheus`", pytrace=False)
        debs = sorted(Path(tmp).glob("prometheus_*.deb"))
        assert debs, f"`apt-get download prometheus` wrote no .deb into {tmp}"
        subprocess.run([dpkg, "-x", str(debs[0]), f"{tmp}/root"], check=True, capture_output=True, timeout=300)
        (folder / "bin").mkdir()
        for name in ("prometheus", "promtool"):
            shutil.move(f"{tmp}/root/usr/bin/{name}", folder / "bin" / name)
        (folder / "package.txt").write_text(debs[0].name + "\n")


def prometheus_bin() -> Path:
    """The folder holding ``prometheus`` and ``promtool`` from Debian's package (``apt-get update`` into private
    package lists, ``apt-get download``, ``dpkg -x``: no root), unpacked under .cache/tools on first use."""
    return built_once(TOOLS / "prometheus", _unpack_prometheus) / "bin"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(prometheus_bin() / "promtool"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


class Prometheus:
    """A Prometheus server on loopback with ``config``, its data in ``data_dir``; ``with Prometheus(...) as p:``."""

    def __init__(self, config: Path, data_dir: Path, startup_timeout_s: float = 30.0) -> None:
        self.config, self.data_dir, self.startup_timeout_s = config, data_dir, startup_timeout_s
        self.url = f"http://127.0.0.1:{free_ports(1)[0]}"
        self.log = data_dir.parent / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(prometheus_bin() / "prometheus"), f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.data_dir}", f"--web.listen-address={self.url.split('//')[1]}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.__exit__()
        raise AssertionError(f"prometheus not ready after {self.startup_timeout_s} s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str | list[str]):
        """``data`` of one HTTP API answer (``/api/v1/<path>``); a PromQL error fails with Prometheus's message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10.0) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant vector of ``expr`` now: ``[{"metric": labels, "value": [t, "v"]}, ...]``."""
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, ok: Callable[[list[dict]], bool], timeout_s: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while not ok(result := self.query(expr)):
            assert time.monotonic() < deadline, f"{expr} still gives {result} after {timeout_s} s"
            time.sleep(0.2)
        return result


def alert_rules(path: Path = RULES) -> dict[str, dict]:
    """``{alert name: rule}`` of a Prometheus rule file."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def split_threshold(expr: str) -> tuple[str, str, float]:
    """An alert expression ``<query> <comparison> <number>`` as (query, comparison, threshold); fails on any other
    shape (checked with promql-parser, so the split is the parser's, not only the regex's)."""
    tree = promql_parser.parse(expr)
    assert isinstance(tree, promql_parser.BinaryExpr) and isinstance(tree.rhs, promql_parser.NumberLiteral), expr
    m = _THRESHOLD.match(expr.strip())
    assert m and m["op"] == str(tree.op) and float(m["threshold"]) == tree.rhs.val, expr
    promql_parser.parse(m["query"])
    return m["query"], m["op"], float(m["threshold"])


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value of its = or =~ matcher}) of every series selector in a PromQL expression."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node, *_) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name: m.value for m in node.matchers.matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}
