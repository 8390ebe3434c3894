#!/usr/bin/env bash
# Set up (skipped when .venv is current, see setup.sh), then run the gateway with
# config/example.yaml in front of the bundled mock upstream. It prints the URL and the demo's
# admin key for `gateway status`. No provider keys needed. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gateway demo --config config/example.yaml "$@"
