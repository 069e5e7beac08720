"""The alert rules (deploy/prometheus/rules.yml) with the real promtool from Debian's Prometheus package (unpacked
under .cache/tools on first use): `check rules` passes and rejects a broken copy, deploy/prometheus.yml loads the
rules, `test rules` passes rules_test.yml, and moving any alert's threshold so that it always or never fires breaks
those unit tests: every alert has a case that fires and one that does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from deploy_tests.ops_tools import RULES, alert_rules, promtool, split_threshold
from testpaths import ROOT

RULES_TEST = RULES.with_name("rules_test.yml")
ALERTS = sorted(alert_rules())
# Thresholds that make "<query> op t" true for every finite query value >= 0 (all of ours are), or for none.
MOVED = {"always": {">": "-1", ">=": "-1", "<": "+Inf", "<=": "+Inf"},
         "never": {">": "+Inf", ">=": "+Inf", "<": "-1", "<=": "-1"}}


def test_every_alert_is_complete() -> None:
    assert ALERTS == ["KaemServeFailureRatio", "KaemServeHighP99", "KaemServeNoReadyReplica", "KaemServeQueueTime"]
    for name, rule in alert_rules().items():
        assert rule["for"] and rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        split_threshold(rule["expr"])  # the shape the threshold test below relies on


def test_promtool_check_rules_passes_and_rejects_a_broken_copy(tmp_path: Path) -> None:
    ok = promtool("check", "rules", RULES)
    assert ok.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in ok.stdout, ok.stdout + ok.stderr
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("(rate(nv_inference_request_failure[5m]))", "(rate(", 1))
    bad = promtool("check", "rules", broken)
    assert bad.returncode != 0 and "parse error" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_prometheus_config_loads_the_rules() -> None:
    r = promtool("check", "config", ROOT / "deploy" / "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout and f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULES_TEST)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, set[bool]] = {name: set() for name in ALERTS}
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            cases[case["alertname"]].add(bool(case["exp_alerts"]))
    assert all(fires == {True, False} for fires in cases.values()), cases


@pytest.mark.parametrize("mode", sorted(MOVED))
@pytest.mark.parametrize("alert", ALERTS)
def test_moving_a_threshold_breaks_the_unit_tests(tmp_path: Path, alert: str, mode: str) -> None:
    # "always" must break the quiet case, "never" the firing one: both cases really depend on the threshold.
    doc = yaml.safe_load(RULES.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)
    query, op, _ = split_threshold(rule["expr"])
    rule["expr"] = f"{query} {op} {MOVED[mode][op]}"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    r = promtool("test", "rules", tmp_path / "rules_test.yml")
    assert r.returncode != 0 and f"alertname: {alert}" in r.stderr + r.stdout, r.stdout + r.stderr
