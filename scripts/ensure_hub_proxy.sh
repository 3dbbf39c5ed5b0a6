#!/usr/bin/env bash
# Make sure the JupyterHub benchmark and test (benchmarks/bench_hub.py, tests/test_hub.py) have JupyterHub's
# proxy, configurable-http-proxy, a Node.js program from npm. It goes into a folder the kit owns:
#
#   scripts/ensure_hub_proxy.sh [PREFIX]     PREFIX defaults to .venv/hub (git-ignored)
#
# Prints the proxy command's path as the last line of stdout; messages go to stderr.
# Exit status: 0 ready; 3 node or npm is missing (the message says how to install them); 1 npm failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PREFIX="${1:-.venv/hub}"
# 5.2.0 is the newest release whose dependencies all run on Node 20, Debian 13's nodejs (5.3.0's commander wants 22).
CHP_VERSION="5.2.0"
CHP="$PREFIX/node_modules/.bin/configurable-http-proxy"

say() { echo "==> hub proxy: $*" >&2; }

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    say "'$tool' is not on PATH. JupyterHub's proxy is a Node.js program: install Node.js 20 or newer and npm"
    say "(Debian/Ubuntu: sudo apt-get install nodejs npm; elsewhere https://nodejs.org), then run this again."
    exit 3
  fi
done
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  say "node $(node --version) is too old for configurable-http-proxy $CHP_VERSION: install Node.js 20 or newer."
  exit 3
fi

if [ -x "$CHP" ] && [ "$("$CHP" --version 2>/dev/null)" = "$CHP_VERSION" ]; then
  realpath "$CHP"; exit 0
fi
say "installing configurable-http-proxy@$CHP_VERSION into $PREFIX (npm)"
mkdir -p "$PREFIX"
if ! npm install --prefix "$PREFIX" --no-fund --no-audit --no-save --loglevel=error \
    "configurable-http-proxy@$CHP_VERSION" >&2; then
  say "npm install failed (is https://registry.npmjs.org reachable? an npm proxy set in ~/.npmrc?)"
  exit 1
fi
realpath "$CHP"
