#!/usr/bin/env bash
# Serve the embedded demo model on :8000 (HTTP), :8001 (gRPC), :8002 (metrics).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" serve
exec minedraft serve "$@"
