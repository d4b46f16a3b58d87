#!/usr/bin/env bash
# Serve the prepared models (qwen-coder, smollm2, the demo pair) on :8000 (HTTP), :8001 (gRPC), :8002 (metrics),
# and OpenAI's API on :9000: this is the quick start, and most clients people have speak OpenAI's API.
# `minedraft serve` alone opens no OpenAI port unless asked; `bash scripts/serve.sh --openai-port N` moves it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" serve
exec minedraft serve --openai-port 9000 "$@"
