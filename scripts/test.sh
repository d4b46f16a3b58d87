#!/usr/bin/env bash
# Run the test suite (engine, demo pair, real tritonserver, perf_analyzer smoke).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" test
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pytest "$@"
