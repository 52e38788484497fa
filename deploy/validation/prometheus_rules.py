"""Keeps the alert rules' two forms in step, and the dashboard's queries valid.

deploy/prometheus/weft-alerts.yml is the rules file a plain Prometheus loads;
weft-alerts.prometheusrule.yaml holds the same groups as a Prometheus Operator
`PrometheusRule`. The manifest is generated from the rules file, never edited
by hand: this check fails when its groups differ from the file's, and
`--write` regenerates it. The Grafana dashboard's queries go through
`promtool check rules` as recording rules, so a typo in one fails here.

Usage: prometheus_rules.py [--write] DIR   (DIR laid out like deploy/prometheus/)
"""

import json
import os
import subprocess
import sys
import tempfile

import yaml

RULES = "weft-alerts.yml"
MANIFEST = "weft-alerts.prometheusrule.yaml"
DASHBOARD = "weft-dashboard.json"
HEADER = """\
# Generated from weft-alerts.yml by
#   python3 deploy/validation/prometheus_rules.py --write deploy/prometheus
# do not edit: deploy/validate fails when the two differ. For the Prometheus
# Operator (monitoring.coreos.com/v1); the `release` label is the one its
# ruleSelector commonly matches, change it to what yours selects.
#   kubectl apply -f deploy/prometheus/weft-alerts.prometheusrule.yaml
"""


def manifest(groups):
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "weft-alerts",
            "namespace": "weft-system",
            "labels": {"app.kubernetes.io/name": "weft", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }


def main(args):
    write = "--write" in args
    paths = [a for a in args if a != "--write"]
    if len(paths) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    directory = paths[0]
    with open(os.path.join(directory, RULES), encoding="utf-8") as f:
        groups = yaml.safe_load(f)["groups"]
    path = os.path.join(directory, MANIFEST)
    if write:
        with open(path, "w", encoding="utf-8") as f:
            f.write(HEADER)
            yaml.safe_dump(manifest(groups), f, sort_keys=False, width=100)
        return 0
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        print(f"ERROR {path}: {e}", file=sys.stderr)
        return 1
    if document != manifest(groups):
        print(
            f"ERROR {path} does not hold the groups of {RULES}; regenerate it with "
            f"python3 deploy/validation/prometheus_rules.py --write {directory}",
            file=sys.stderr,
        )
        return 1
    return check_dashboard(os.path.join(directory, DASHBOARD))


def check_dashboard(path):
    try:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as e:
        print(f"ERROR {path}: {e}", file=sys.stderr)
        return 1
    exprs = [
        target["expr"]
        for panel in dashboard.get("panels", [])
        for target in panel.get("targets", [])
    ]
    rules = [{"record": f"weft:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        checked = subprocess.run(
            ["promtool", "check", "rules", f.name], capture_output=True, text=True, check=False
        )
    if checked.returncode != 0:
        print(
            f"ERROR {path} has a query promtool refuses:\n{checked.stdout}{checked.stderr}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
