#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct with its draft (and the demo pair) on :8000 (HTTP), :8001 (gRPC), :8002 (metrics).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" serve
exec minedraft serve "$@"
