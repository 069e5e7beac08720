"""The Grafana dashboard (deploy/grafana/kaem-serve.json), the alert rules' queries and the prometheus-adapter rule
against the real stack: Debian's Prometheus (unpacked under .cache/tools on first use) scrapes a real local Triton
with deploy/prometheus.yml while the test drives traffic, and every Triton-metric query, with the dashboard's
variables substituted, returns data over Prometheus's HTTP API. Queries on kube-state-metrics series (replicas)
need a cluster: they are parsed and checked against the Kubernetes bundle instead."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from deploy_tests.ops_tools import Prometheus, alert_rules, metric_names, selectors, split_threshold
from testpaths import ROOT

from export.toy_model import TOY_CONTRACT, TOY_MAX_BATCH, TOY_MODEL, write_toy_model
from export.triton_config import render_config
from serving import client
from serving.local.launcher import SUMMARY_METRICS_ARGS, LocalTriton, free_ports

DASHBOARD = ROOT / "deploy" / "grafana" / "kaem-serve.json"
K8S = ROOT / "deploy" / "k8s"
PANELS = ["Images/s", "Requests/s", "p50/p90/p99 per pod", "Queue vs compute µs", "Average batch size",
          "Failures by reason", "Cache hits", "Replicas"]
# Grafana's $__rate_interval with Prometheus's default 15 s scrape interval (4 scrapes): 1m.
BUILTINS = {"__rate_interval": "1m"}
# kube-state-metrics exports the kube_* series from the Kubernetes API; there is no cluster here.
CLUSTER_ONLY = "kube_"
CACHED_MODEL = f"{TOY_MODEL}_cached"
TOY_REQUESTS, CACHED_SEEDS = 48, 8


def live(test):
    return pytest.mark.triton(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _variables(dashboard: dict) -> dict[str, str]:
    """The value each variable has when the dashboard opens (its ``current``; "All" is the ``allValue`` regex)."""
    values = dict(BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            current = var["current"]["value"]
            values[var["name"]] = var["allValue"] if current in ("$__all", ["$__all"]) else current
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    def value(m: re.Match) -> str:
        assert m[1] in values, f"undefined variable ${m[1]} in {expr}"
        return values[m[1]]

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, query with the variables substituted) for every target of every panel."""
    values = _variables(dashboard)
    return [(p["title"], _substitute(t["expr"], values)) for p in dashboard["panels"] for t in p["targets"]]


def _cluster_only(expr: str) -> bool:
    names = metric_names(expr)
    assert all(n.startswith("nv_") for n in names) or all(n.startswith(CLUSTER_ONLY) for n in names), names
    return next(iter(names)).startswith(CLUSTER_ONLY)


def test_dashboard_has_every_panel(dashboard: dict) -> None:
    assert [p["title"] for p in dashboard["panels"]] == PANELS


def test_dashboard_is_grafana_json(dashboard: dict) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]  # Grafana's grid is 24 columns wide
        mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]) and all(t["expr"] for t in p["targets"])
    kinds = {v["name"]: v["type"] for v in dashboard["templating"]["list"]}
    assert kinds == {"datasource": "datasource", "namespace": "query", "pod": "query", "model": "query"}


def test_every_query_parses_and_triton_or_cluster_metrics_only(dashboard: dict) -> None:
    queries = _queries(dashboard)
    sources = {title: {_cluster_only(q) for t, q in queries if t == title} for title in PANELS}
    assert sources == {title: {title == "Replicas"} for title in PANELS}  # only replicas come from the cluster
    assert all('namespace="kaem-serve"' in q for _, q in queries)  # the bundle's namespace, the default pick


def test_cluster_only_queries_name_the_bundles_objects(dashboard: dict) -> None:
    # No Kubernetes API and so no kube-state-metrics here: these queries cannot return data. promql-parser reads
    # them, and their selectors must name the objects deploy/k8s creates, in the namespace kustomize puts them in.
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    objects = {kind: yaml.safe_load((K8S / f"{file}.yaml").read_text())["metadata"]["name"]
               for kind, file in (("deployment", "deployment"), ("horizontalpodautoscaler", "hpa"))}
    cluster = [q for _, q in _queries(dashboard) if _cluster_only(q)]
    cluster.append(alert_rules()["KaemServeNoReadyReplica"]["expr"])
    for q in cluster:
        for name, labels in selectors(q):
            kind = name.split("_")[1]  # kube_<kind>_...
            assert labels.get("namespace") == namespace and labels.get(kind) == objects[kind], q


# ---- the real stack ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real Triton serving two toy models, scraped by a real Prometheus with deploy/prometheus.yml, after
    traffic. Triton disables the request-latency summary of a model with the response cache on, and the cache
    metrics exist only for such a model on a server started with a cache: so one model has the config kaem-export
    renders (no cache: the p50/p90/p99 panel's data) and a copy with `response_cache { enable: true }` on a server with
    Triton's local cache (`--cache-config=local,size=...`) answers repeated seeds from the cache (Cache hits)."""
    tmp = tmp_path_factory.mktemp("observability")
    repo = tmp / "model_repository"
    write_toy_model(repo / TOY_MODEL)
    cached_config = render_config(CACHED_MODEL, TOY_CONTRACT, max_batch_size=TOY_MAX_BATCH)
    write_toy_model(repo / CACHED_MODEL, config_text=cached_config + "response_cache {\n  enable: true\n}\n")
    grpc_port, http_port, metrics_port = free_ports(3)
    with LocalTriton(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                     log_file=tmp / "tritonserver.log") as triton:  # kaem-serve's flags include the cache
        config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
        (job,) = config["scrape_configs"]
        (static,) = job["static_configs"]
        static["targets"] = [triton.metrics_url]  # the shipped file's labels stay
        config["rule_files"] = [str(ROOT / "deploy" / f) for f in config["rule_files"]]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        with Prometheus(tmp / "prometheus.yml", tmp / "tsdb") as prom:
            # one scrape before the traffic, so that every rate() window spans it
            prom.wait_for(f'up{{job="{job["job_name"]}"}} == 1', bool)
            # the models' load-time warm-up requests (model_warmup) count as successes too
            warmed = sum(float(r["value"][1]) for r in prom.query("sum(nv_inference_request_success)"))
            client.generate_images(triton.grpc_url, TOY_MODEL, list(range(TOY_REQUESTS)), batch_size=1,
                                   concurrency=8)
            for _ in range(2):  # the second round comes from the response cache
                client.generate_images(triton.grpc_url, CACHED_MODEL, list(range(CACHED_SEEDS)), batch_size=1)
            done = warmed + TOY_REQUESTS + 2 * CACHED_SEEDS
            prom.wait_for("sum(nv_inference_request_success)", lambda r: r and float(r[0]["value"][1]) == done)
            yield prom, static["labels"]


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


@live
def test_dashboard_variables_resolve_on_real_prometheus(stack, dashboard: dict) -> None:
    prom, labels = stack
    values = _variables(dashboard)
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        # Grafana answers label_values(selector, label) from Prometheus's label-values endpoint.
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", _substitute(var["query"]["query"], values))
        found = prom.api(f"label/{m[2]}/values", **{"match[]": m[1]})
        assert found and re.fullmatch(values[var["name"]], found[0]), (var["name"], found)
    assert prom.api("label/pod/values", **{"match[]": "nv_inference_count"}) == [labels["pod"]]


@live
def test_every_triton_dashboard_query_returns_data(stack, dashboard: dict) -> None:
    prom, _ = stack
    triton = [(title, q) for title, q in _queries(dashboard) if not _cluster_only(q)]
    empty = [(title, q) for title, q in triton if not _finite(prom.query(q))]
    assert not empty, f"{len(empty)} of {len(triton)} Triton queries returned no data: {empty}"
    (latency,) = [q for title, q in triton if title == "p50/p90/p99 per pod"]
    quantiles = {s["metric"]["quantile"] for s in prom.query(latency) if math.isfinite(float(s["value"][1]))}
    assert quantiles == set(re.findall(r"([\d.]+):[\d.]+", SUMMARY_METRICS_ARGS[1]))  # the launcher's quantiles
    (hits,) = [q for _, q in triton if "nv_cache_num_hits_per_model" in q]
    assert [s["metric"]["model"] for s in prom.query(f"{hits} > 0")] == [CACHED_MODEL]


@live
def test_alert_queries_return_data_and_prometheus_loads_the_rules(stack) -> None:
    prom, _ = stack
    rules = alert_rules()
    for name, rule in rules.items():
        query, _, _ = split_threshold(rule["expr"])
        if not _cluster_only(query):
            assert _finite(prom.query(query)), name
    loaded = {r["name"] for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]}
    assert loaded == set(rules)


@live
def test_adapter_query_gives_each_pod_its_queue_time(stack) -> None:
    # What prometheus-adapter sends for the HPA's Pods metric: its seriesQuery finds the pods, then metricsQuery
    # with <<.GroupBy>> = pod and <<.LabelMatchers>> = the namespace and those pods.
    prom, labels = stack
    config_map = yaml.safe_load((K8S / "prometheus-adapter-config.yaml").read_text())
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    series = prom.api("series", **{"match[]": rule["seriesQuery"]})
    assert series and all(re.fullmatch(rule["name"]["matches"], s["__name__"]) for s in series)
    pods = sorted({s["pod"] for s in series})
    matchers = f'namespace="{labels["namespace"]}",pod=~"{"|".join(pods)}"'
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", matchers)
    result = prom.query(query)
    assert sorted(s["metric"]["pod"] for s in result) == pods and _finite(result)
