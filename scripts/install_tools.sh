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
