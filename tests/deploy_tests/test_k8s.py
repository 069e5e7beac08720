"""The Kubernetes bundle (deploy/k8s) validated offline: every manifest passes `kubernetes-validate --strict`
(which really rejects a broken one), `kubectl kustomize` renders the bundle, and the rendered objects keep the
production promises: probes on Triton's health endpoints, no unavailable replica during a rollout, a preStop
pause and a grace period above the server's exit timeout, a locked-down non-root container with GPU requests,
the Dockerfile's own server command, and an HPA on the metric the prometheus-adapter rule exposes. checkov (its
own venv under .cache, built on first use: it conflicts with the project's pins) finds nothing in the rendered
bundle apart from the skips justified in-line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_tests.ops_tools import TOOLS, built_once
from testpaths import ROOT

K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
CHECKOV = "checkov==3.3.30"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    r = subprocess.run([str(BIN / "kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(r.stdout)}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_strict_schema_validation(path: Path) -> None:
    r = _validate(path)
    assert r.returncode == 0 and "passed" in r.stdout + r.stderr, r.stdout + r.stderr


def test_strict_validation_rejects_a_broken_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("replicas: 2", 'replicas: "two"'))
    assert _validate(bad).returncode != 0


def test_kustomize_renders_the_whole_bundle(rendered: dict[str, dict]) -> None:
    assert set(rendered) == {"Namespace", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
                             "PodDisruptionBudget", "NetworkPolicy"}
    assert all(d["metadata"].get("namespace") == "kaem-serve" for k, d in rendered.items() if k != "Namespace")


def test_deployment_keeps_the_production_promises(rendered: dict[str, dict]) -> None:
    dep = rendered["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The startup probe is the warm-up (serving/warmup.py, copied into the image by the Dockerfile): readiness and
    # traffic start after one gRPC inference per model, sent to the container's own gRPC port.
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert c["startupProbe"]["exec"]["command"][:4] == ["python3", "/opt/kaem/warmup.py", "--url",
                                                        f"127.0.0.1:{grpc_port}"]
    assert c["startupProbe"]["timeoutSeconds"] > float(c["startupProbe"]["exec"]["command"][5])
    # Before the server: the repository check (serving/verify_repository.py) on the repository the server serves,
    # from the same image, as locked down as the server
    (init,) = spec["initContainers"]
    repo = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--model-repository="))
    assert init["command"] == ["python3", "/opt/kaem/verify_repository.py", repo] and init["image"] == c["image"]
    assert init["securityContext"] == c["securityContext"]
    exit_timeout = int(next(a.split("=")[1] for a in c["args"] if a.startswith("--exit-timeout-secs=")))
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= c["readinessProbe"]["periodSeconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + exit_timeout
    sec, pod_sec = c["securityContext"], spec["securityContext"]
    assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"]
    assert sec["capabilities"]["drop"] == ["ALL"]
    assert pod_sec["runAsNonRoot"] and pod_sec["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert rendered["ServiceAccount"]["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory", "nvidia.com/gpu"} <= set(c["resources"][kind])
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}  # the only writable places are emptyDirs
    # The same server command as the production image: one source of flags.
    cmd = re.search(r"^CMD (\[.*?\])", (ROOT / "Dockerfile").read_text().replace("\\\n", ""), re.M | re.S).group(1)
    assert c["args"] == json.loads(cmd)
    ports = {p["name"]: p["port"] for p in rendered["Service"]["spec"]["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002}


def test_hpa_scales_on_the_metric_the_adapter_exposes(rendered: dict[str, dict]) -> None:
    (metric,) = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"]
    config_map = yaml.safe_load((K8S / "prometheus-adapter-config.yaml").read_text())
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    query = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query


def _install_checkov(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", CHECKOV], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr


def _checkov() -> Path:
    """The checkov executable of its own venv under .cache/tools, built on first use."""
    return built_once(TOOLS / CHECKOV.replace("==", "-"), _install_checkov) / "bin" / "checkov"


def test_checkov_passes_the_rendered_bundle_with_justified_skips(tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    r = subprocess.run([str(BIN / "kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    rendered.write_text(r.stdout)
    out = subprocess.run([str(_checkov()), "-f", str(rendered), "-f", str(K8S / "prometheus-adapter-config.yaml"),
                          "--framework", "kubernetes", "--skip-download", "--compact", "--quiet"],
                         capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", out)
    assert m, out
    passed, failed, skipped = map(int, m.groups())
    skips = re.findall(r"checkov\.io/skip\d+: (CKV_K8S_\d+)=(.*)", (K8S / "deployment.yaml").read_text())
    assert failed == 0 and passed > 80, out
    assert skipped == len(skips) and all(len(reason.split()) >= 5 for _, reason in skips), skips
