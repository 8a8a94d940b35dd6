"""The chart's alert rules as a plain Prometheus rule file.

    python monitoring/rules.py [--release aligner] [--namespace rlhf] [-f values.yaml] > aligner-rules.yaml

The alerts' one source is helm/aligner/templates/prometheusrule.yaml (thresholds from the values).
This renders it with helm and prints its `spec` (the `groups:` of a Prometheus rule file), for a
Prometheus without the Operator and for `promtool check rules` / `promtool test rules`
(monitoring/alerts_test.yaml is written against the default values, release "aligner" in
namespace "rlhf").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "aligner"
RULE_TEMPLATE = "templates/prometheusrule.yaml"


def find_helm() -> str:
    """The project's pinned helm (.tools/bin/helm, from scripts/install_tools.sh), else PATH's."""
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("helm")
    if found is None:
        raise FileNotFoundError("helm not found: run `make tools` (scripts/install_tools.sh installs helm 3.18.0)")
    return found


def render_rules(release: str = "aligner", namespace: str = "rlhf", values_files: list[str] = (),
                 helm: str | None = None) -> dict:
    """The rendered PrometheusRule's spec: {"groups": [...]}."""
    command = [helm or find_helm(), "template", release, str(CHART), "--namespace", namespace,
               "--show-only", RULE_TEMPLATE, "--set", "monitoring.prometheusRule.enabled=true"]
    for path in values_files:
        command += ["--values", path]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed: {result.stderr.strip()}")
    manifest = yaml.safe_load(result.stdout)
    return manifest["spec"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="aligner")
    parser.add_argument("--namespace", default="rlhf")
    parser.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    args = parser.parse_args(argv)
    try:
        spec = render_rules(args.release, args.namespace, args.values)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"rules: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump(spec, sort_keys=False, width=1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
