"""The Grafana dashboard: provisioned by an optional component, and every query names a metric the scorer pushes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from investment_risk.scoring.prometheus import registry_for
from investment_risk.scoring.pipeline import ScoreConfig, score

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "k8s" / "components" / "grafana"


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


def test_the_component_renders_a_labelled_configmap(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        f"  - {os.path.relpath(ROOT / 'k8s' / 'base', overlay)}\ncomponents:\n  - {os.path.relpath(COMPONENT, overlay)}\n")
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay), "--load-restrictor", "LoadRestrictionsNone"],
                              capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    import yaml

    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    assert json.loads(dashboards[0]["data"]["investment-risk-scoring.json"])["uid"] == "investment-risk-scoring"
