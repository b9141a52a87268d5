"""The Grafana dashboard and the alerting rules: each provisioned by an optional component, every query naming a
metric the scorer pushes, and each alert firing on the series that should raise it (promtool test rules)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from investment_risk.scoring.prometheus import PUSH_JOB, registry_for
from investment_risk.scoring.pipeline import ScoreConfig, score

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "k8s" / "components" / "grafana"
ALERTS = ROOT / "k8s" / "components" / "alerts"


def pushed_names(merged: dict, shard: dict) -> set[str]:
    names = set()
    for metrics, scope in ((merged, "batch"), (shard, "00000")):
        for family in registry_for(metrics, scope).collect():
            # A labelled family with no sample yet (no rejects tonight) is still declared, and queryable.
            names |= {sample.name for sample in family.samples} | {family.name + ("_total" if family.type == "counter" else "")}
    return names


def test_every_dashboard_query_names_a_pushed_metric(exported, split_dir, tmp_path):
    _, model, _ = exported
    merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out"))
    shard = json.loads((tmp_path / "out" / "metrics" / "part-00000.json").read_text())
    pushed = pushed_names(merged, shard)
    dashboard = json.loads((COMPONENT / "dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 10
    used = {name for q in queries for name in re.findall(r"investment_risk_[a-z0-9_]+", q)}
    assert used and used <= pushed, used - pushed
    # What the issue asks the dashboard to show: throughput, rejects by reason, tier shares, PSI per dimension.
    for metric in ("investment_risk_rows_per_second", "investment_risk_reject_rows_total", "investment_risk_tier_share",
                   "investment_risk_score_psi"):
        assert metric in used, metric
    alerts = [rule["expr"] for group in rule_groups() for rule in group["rules"]]
    used = {name for q in alerts for name in re.findall(r"investment_risk_[a-z0-9_]+", q)}
    assert len(alerts) >= 4 and used <= pushed, used - pushed
    assert all(f'job="{PUSH_JOB}"' in q for q in alerts)  # the job the scorer pushes as


def rule_groups() -> list[dict]:
    import yaml

    return yaml.safe_load((ALERTS / "prometheusrule.yaml").read_text())["spec"]["groups"]


def test_the_alerts_are_valid_rules_and_fire_when_they_should(tmp_path):
    """promtool checks the PrometheusRule's rules and runs their unit tests: each alert silent before its condition
    holds (long enough), firing with its labels and annotations after."""
    import yaml

    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(ALERTS / "rules-test.yaml", tmp_path)
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "rules-test.yaml"]):
        done = subprocess.run(["promtool", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    tested = {t["alertname"] for test in yaml.safe_load((ALERTS / "rules-test.yaml").read_text())["tests"]
              for t in test["alert_rule_test"]}
    assert tested == {rule["alert"] for group in rule_groups() for rule in group["rules"]}  # every alert tested


def test_the_alerts_component_renders_a_prometheusrule(tmp_path):
    docs = rendered_with(ALERTS, tmp_path)
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "investment-risk" and rule["spec"]["groups"] == rule_groups()


def rendered_with(component: Path, tmp_path: Path) -> list[dict]:
    """The base with `component`, as kubectl kustomize renders an overlay that adds it."""
    import yaml

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        f"  - {os.path.relpath(ROOT / 'k8s' / 'base', overlay)}\ncomponents:\n  - {os.path.relpath(component, overlay)}\n")
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay), "--load-restrictor", "LoadRestrictionsNone"],
                              capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def test_the_component_renders_a_labelled_configmap(tmp_path):
    docs = rendered_with(COMPONENT, tmp_path)
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    assert json.loads(dashboards[0]["data"]["investment-risk-scoring.json"])["uid"] == "investment-risk-scoring"
