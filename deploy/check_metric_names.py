#!/usr/bin/env python3
"""Checks that the Grafana dashboard and the alert rules use only metrics that
src/metrics.rs defines, and that the dashboard shows every one of them.

Usage: python3 deploy/check_metric_names.py   (from the repository root; exit 1 on a problem)
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\btokenlease_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def defined_metrics():
    source = (ROOT / "src" / "metrics.rs").read_text()
    names = set(re.findall(r'pub const [A-Z_]+: &str = "(tokenlease_[a-z0-9_]+)"', source))
    if not names:
        sys.exit("no metric names found in src/metrics.rs")
    return names


def base_name(name, defined):
    if name in defined:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in defined:
            return name[: -len(suffix)]
    return None


def dashboard_exprs(path):
    dashboard = json.loads(path.read_text())  # fails loudly on invalid JSON
    exprs = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    if not exprs:
        sys.exit(f"{path}: no PromQL expressions found")
    return exprs


def main():
    defined = defined_metrics()
    problems = []
    used = set()
    dashboard = ROOT / "deploy" / "grafana" / "tokenlease.json"
    for title, expr in dashboard_exprs(dashboard):
        for name in NAME.findall(expr):
            base = base_name(name, defined)
            if base is None:
                problems.append(f"{dashboard.name}: panel {title!r} uses {name}, not defined in src/metrics.rs")
            used.add(base)
    for name in sorted(defined - used):
        problems.append(f"{dashboard.name}: no panel shows {name}")
    rules = ROOT / "deploy" / "prometheus" / "tokenlease.rules.yml"
    for name in NAME.findall(rules.read_text()):
        if base_name(name, defined) is None:
            problems.append(f"{rules.name}: uses {name}, not defined in src/metrics.rs")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"dashboard and rules use only the {len(defined)} metrics of src/metrics.rs; the dashboard shows all of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
