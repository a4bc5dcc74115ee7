"""The Grafana dashboard and the alert rules name only metrics Relay exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from relay import metrics
from relay.model import QueueSummary

ROOT = Path(__file__).resolve().parent.parent


def _exported() -> set[str]:
    """Metric names as a query uses them (a counter ``x`` is queried as ``x_total``)."""
    text = metrics.render(QueueSummary({}, None), suppression_entries=0).decode()
    types = [line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
    return {f"{name.removesuffix('_total')}_total" if kind == "counter" else name for name, kind in types}


def _used(text: str) -> set[str]:
    return set(re.findall(r"\brelay_[a-z_]+", text))


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    exported = _exported()
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy/prometheus-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in _used(e)}
    assert used - exported == set()
    for needed in ("relay_bounces_total", "relay_complaints_total", "relay_suppressed_total",
                   "relay_suppression_entries", "relay_bounce_reports_total"):  # fmt: skip
        assert needed in exported
    assert any("relay_complaints_total" in e for e in exprs[-len(rules["groups"][0]["rules"]) :])
