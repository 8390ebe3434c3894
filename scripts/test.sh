#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs redis-server (Debian) when missing,
# sets up .venv with the test extras, then runs pytest. Redis tests fail, never skip, when
# redis-server cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "redis-server missing: installing Debian's redis-server" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
