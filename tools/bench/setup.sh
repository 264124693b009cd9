#!/usr/bin/env bash
# Installs what the benchmarks need beyond the test suite: the bench extras (matplotlib, tqdm,
# the SGLang router from PyPI) and Debian's wrk (a C load generator, so the client is not the
# bottleneck of a throughput run).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]' 2>&1 \
  | grep -v "^WARNING: Location" || true
if ! command -v wrk >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi
echo "benchmark tools ready: .venv/bin/python -m tools.bench --help"
