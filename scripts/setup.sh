#!/usr/bin/env bash
# Create .venv and install the gateway into it (with test extras when given "test").
# The install is skipped when .venv already holds one made from this pyproject.toml with these
# extras (the stamp .venv/.installed): the package is installed editable, so code changes
# need no reinstall, only changes to pyproject.toml (dependencies, entry points) do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
stamp=".venv/.installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras:-[]}"
have="$(cat "$stamp" 2>/dev/null || true)"
# A [test] install also satisfies a plain one.
if [ -x .venv/bin/gateway ] && { [ "$have" = "$want" ] || { [ -z "$extras" ] && [ "${have% *}" = "${want% *}" ]; }; }; then
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
echo "$want" > "$stamp"
