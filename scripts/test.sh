#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs redis-server (Debian) when missing,
# sets up .venv with the test extras, then runs pytest. Redis tests fail, never skip, when
# redis-server cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests run for real: redis-server (+ redis-cli for the Cluster),
# promtool (package prometheus) for the alert rules, and openssl, which makes the private CA
# and certificates of the TLS tests (upstream, rediss://, a TLS Redis Cluster).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
bash scripts/setup.sh test
# Lint and types first: a finding fails the run like a failing test (the ruff rules of
# pyproject.toml on the package and its tests; mypy --strict on the package, its tests and the
# bench scripts, the `files` of pyproject.toml's [tool.mypy]).
.venv/bin/ruff check gateway tests
.venv/bin/mypy --strict gateway tests bench
exec .venv/bin/python -m pytest "$@"
