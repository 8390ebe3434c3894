#!/usr/bin/env bash
# Set up, then run the gateway with config/example.yaml in front of the bundled mock upstream.
# No provider keys needed. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gateway demo --config config/example.yaml "$@"
