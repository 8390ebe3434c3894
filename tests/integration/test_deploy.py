"""The deployment files agree with the code.

``scripts/check_deploy.sh`` lints the Dockerfile (hadolint) and renders and validates every
kustomization offline (kubectl kustomize, kubernetes-validate --strict, warnings fail); it runs
once per session here, so CI runs it. The rest reads the rendered manifests the way a new
user gets them and compares what they use (ports, probe paths, drain timing, command lines,
keys, Secrets, security settings) with the code's defaults and routes, through the gateway's
own argument parser and policy loader.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from gateway import __version__
from gateway.app.server import create_app
from gateway.cli import _parser
from gateway.config.model import GatewayConfig, Server, parse_config
from gateway.request.auth import hash_key
from tests.gwtest import policy

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.prefix) / "bin"
DEFAULTS = Server.model_validate({})
FLUSH_MARGIN_S = 10  # after the drain: settlements and the degraded-mode journal
SIDECAR_AGENT_BUDGET_S = 60  # what the example agent gets to finish (its manifest says so)

SHARED = ["shared/base", "shared/overlays/dev", "shared/overlays/production"]
SIDECAR = ["sidecar/base", "sidecar/overlays/dev", "sidecar/overlays/production"]
DEV = {"shared/overlays/dev", "sidecar/overlays/dev"}


@pytest.fixture(scope="session")
def check_deploy() -> str:
    """Run the CI script once (it installs hadolint, kubectl, kubernetes-validate if needed)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "check_deploy.sh")], cwd=ROOT, check=False,
                          env={**os.environ, "VENV": sys.prefix},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_check_deploy_lints_the_dockerfile_and_validates_every_kustomization(
    check_deploy: str
) -> None:
    assert "ok Dockerfile (hadolint)" in check_deploy
    dirs = sorted(str(p.parent.relative_to(ROOT)) for p in K8S.rglob("kustomization.yaml"))
    assert {f"deploy/kubernetes/{d}" for d in [*SHARED, *SIDECAR, "redis-dev", "mock-upstream"]
            } <= set(dirs)
    for d in dirs:
        assert f"ok {d} (" in check_deploy, d


def render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(K8S / overlay)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, (kind, name, [d["metadata"]["name"] for d in hits])
    return hits[0]


def secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    return base64.b64decode(find(docs, "Secret", name)["data"][key]).decode()


@pytest.fixture(scope="module")
def routes() -> Iterator[set[str]]:
    app = create_app(policy("http://127.0.0.1:1"))
    yield {r.resource.canonical for r in app.router.routes() if r.resource is not None}


class Gateway:
    """The gateway container of a rendering, with what it will actually run with."""

    def __init__(self, docs: list[dict[str, Any]], pod: dict[str, Any],
                 container: dict[str, Any]) -> None:
        self.pod, self.container = pod, container
        self.args = _parser().parse_args(container["args"])
        assert self.args.func.__name__ == "_serve"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        policy_dir = str(Path(self.args.config).parent)
        mount = mounts[policy_dir]
        assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
        self.policy: GatewayConfig = parse_config(
            yaml.safe_load(configmap["data"][Path(self.args.config).name]))
        self.host = self.args.host or self.policy.server.host
        self.port = self.args.port or self.policy.server.port
        self.mounts = mounts

    def env(self, name: str) -> dict[str, Any]:
        return next(e for e in self.container["env"] if e["name"] == name)


def _probe_path(probe: dict[str, Any]) -> tuple[str, int | str]:
    if "httpGet" in probe:
        return probe["httpGet"]["path"], probe["httpGet"]["port"]
    args = _parser().parse_args(probe["exec"]["command"][1:])
    assert probe["exec"]["command"][0] == "gateway" and args.func.__name__ == "_healthcheck"
    assert args.host == "127.0.0.1"
    return args.path, args.port


def _common_checks(docs: list[dict[str, Any]], gw: Gateway, routes: set[str],
                   overlay: str) -> None:
    c, pod = gw.container, gw.pod
    assert gw.port == DEFAULTS.port
    name, tag = c["image"].rsplit(":", 1)
    assert tag == __version__ and name.endswith("llm-gateway")
    # Security: matches the Dockerfile's USER; read-only root needs a writable /tmp only.
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user.group(1)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in gw.mounts
    assert pod["automountServiceAccountToken"] is False
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    # Redis: state shared through REDIS_URL from a Secret (the policy says redis).
    assert gw.policy.state.backend == "redis"
    ref = gw.env("REDIS_URL")["valueFrom"]["secretKeyRef"]
    provider_keys = next(v for v in pod["volumes"] if v["name"] == gw.mounts[
        "/var/run/secrets/llm-gateway/providers"]["name"])["secret"]["secretName"]
    for p in gw.policy.providers.values():
        if p.api_key_file:
            assert str(Path(p.api_key_file).parent) == "/var/run/secrets/llm-gateway/providers"
    if overlay in DEV:
        url = secret_value(docs, ref["name"], ref["key"])
        redis = find(docs, "Service", "redis-dev")
        assert url == f"redis://redis-dev:{redis['spec']['ports'][0]['port']}/0"
        find(docs, "Secret", provider_keys)
        # Every provider of the dev policy is the bundled mock, by Service name and port.
        mock = find(docs, "Service", "mock-upstream")["spec"]["ports"][0]["port"]
        assert {p.base_url.split("/")[2] for p in gw.policy.providers.values()} == {
            f"mock-upstream:{mock}"}
    else:  # created out of band; the overlay tells how
        assert not [d for d in docs if d["kind"] == "Secret"]
        if overlay.endswith("production"):
            readme = (K8S / overlay / "kustomization.yaml").read_text()
            assert f"create secret generic {ref['name']}" in readme
            assert f"create secret generic {provider_keys}" in readme


@pytest.mark.parametrize("overlay", SHARED)
def test_shared_gateway_manifests_match_the_code(overlay: str, check_deploy: str,
                                                 routes: set[str]) -> None:
    docs = render(overlay)
    deployment = find(docs, "Deployment", "llm-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    gw = Gateway(docs, pod, container)
    _common_checks(docs, gw, routes, overlay)
    server = gw.policy.server
    # Listening on the pod IP, on the code's default port and drain timing.
    assert gw.host == "0.0.0.0"
    assert (server.drain_delay_s, server.drain_timeout_s) == (
        DEFAULTS.drain_delay_s, DEFAULTS.drain_timeout_s)
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", gw.port)
    # Probes: the real routes; readiness waits longer than one Redis call may take.
    probes = {k: _probe_path(container[k]) for k in ("startupProbe", "readinessProbe",
                                                     "livenessProbe")}
    assert probes == {"startupProbe": ("/healthz", "http"), "readinessProbe": ("/readyz", "http"),
                      "livenessProbe": ("/healthz", "http")}
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    assert container["readinessProbe"]["timeoutSeconds"] > gw.policy.state.timeout_s
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(gw.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # Drain: preStop, then the gateway's delay and timeout, then the flush, within the grace.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + server.drain_delay_s + server.drain_timeout_s + FLUSH_MARGIN_S
    assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 30
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    # Service, HPA, PDB and NetworkPolicy all point at these pods and this port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(docs, "Service", "llm-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(gw.port, "http")]
    hpa = find(docs, "HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "llm-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = find(docs, "PodDisruptionBudget", "llm-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    netpol = find(docs, "NetworkPolicy", "llm-gateway")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for p in netpol["spec"]["ingress"][0]["ports"]] == ["http"]
    egress = {p["port"] for rule in netpol["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 6379, 443} <= egress
    if overlay in DEV:
        assert 9000 in egress  # the mock upstream


@pytest.mark.parametrize("overlay", SIDECAR)
def test_sidecar_manifests_match_the_code(overlay: str, check_deploy: str,
                                          routes: set[str]) -> None:
    docs = render(overlay)
    deployment = find(docs, "Deployment", "example-agent")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "llm-gateway"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar
    gw = Gateway(docs, pod, sidecar)
    _common_checks(docs, gw, routes, overlay)
    # On localhost: the code's default host, so only the pod's containers reach it.
    assert gw.host == DEFAULTS.host == "127.0.0.1" and gw.args.host is None
    (agent,) = pod["containers"]
    base_url = next(e["value"] for e in agent["env"] if e["name"] == "OPENAI_BASE_URL")
    assert base_url == f"http://{gw.host}:{gw.port}/v1"
    probes = {k: _probe_path(sidecar[k]) for k in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert probes == {"startupProbe": ("/readyz", gw.port), "readinessProbe": ("/readyz", gw.port),
                      "livenessProbe": ("/healthz", gw.port)}
    assert {"/healthz", "/readyz"} <= routes
    server = gw.policy.server
    needed = SIDECAR_AGENT_BUDGET_S + server.drain_delay_s + server.drain_timeout_s + \
        FLUSH_MARGIN_S
    assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 30
    assert f"{SIDECAR_AGENT_BUDGET_S} s to finish" in (K8S / "sidecar/base/agent-deployment.yaml"
                                                       ).read_text()
    key_ref = next(e for e in agent["env"] if e["name"] == "OPENAI_API_KEY")["valueFrom"][
        "secretKeyRef"]
    if overlay in DEV:  # the demo key the agent sends is a key of a tenant of the policy
        key = secret_value(docs, key_ref["name"], key_ref["key"])
        assert any(hash_key(key) in t.api_keys for t in gw.policy.tenants.values())


def test_dockerfile_matches_the_code() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = re.findall(r"^(EXPOSE|ENTRYPOINT|CMD|HEALTHCHECK|USER|ARG)\s+(.*?)$",
                              text.replace("\\\n", " "), re.MULTILINE)
    seen = {k: v for k, v in instructions}
    assert seen["EXPOSE"] == str(DEFAULTS.port)
    assert json.loads(seen["ENTRYPOINT"]) == ["gateway"]  # exec form: signals reach it
    cmd = json.loads(seen["CMD"])
    args = _parser().parse_args(cmd)
    assert args.func.__name__ == "_serve" and args.host == "0.0.0.0"
    health = json.loads(seen["HEALTHCHECK"].split("CMD", 1)[1])
    assert health[0] == "gateway" and _parser().parse_args(health[1:]).port == DEFAULTS.port
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python = re.search(r"python:(\d+\.\d+)", seen["ARG"])
    assert python is not None and f">={python.group(1)}" == requires
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:][:4] == ["!gateway/", "!pyproject.toml",
                                                   "!README.md", "!requirements.lock"]


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = (ROOT / "requirements.lock").read_text()
    # name==version [; environment marker] \
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)(?: ;[^\\\n]*)? \\$", text, re.MULTILINE))
    pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    wanted += [Requirement(r) for r in project["build-system"]["requires"]]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in requirements.lock: regenerate it"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1])
    assert all("--hash=sha256:" in b for b in blocks if "==" in b)


def test_the_kubernetes_readme_walks_through_every_overlay() -> None:
    readme = (K8S / "README.md").read_text()
    for overlay in [*SHARED[1:], *SIDECAR[1:]]:
        assert f"kubectl kustomize deploy/kubernetes/{overlay}" in readme, overlay
        assert f"kubectl apply -k deploy/kubernetes/{overlay}" in readme, overlay
    assert "docs/operations.md" in readme


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs (lower case, punctuation dropped, spaces to hyphens) and ids."""
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)}
    return slugs | set(re.findall(r'<a id="([^"]+)"></a>', markdown))


def test_every_runbook_and_operations_link_resolves_to_a_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = _anchors(operations)
    rules = yaml.safe_load((ROOT / "deploy" / "observability" / "alerts.yml").read_text())
    runbooks = {r["annotations"]["runbook"] for g in rules["groups"] for r in g["rules"]}
    assert runbooks
    for link in runbooks:
        path, anchor = link.split("#")
        assert path == "docs/operations.md" and anchor in anchors, link
    internal = set(re.findall(r"\]\(#([^)]+)\)", operations))
    assert internal <= anchors, internal - anchors
    for doc in (K8S / "README.md", ROOT / "requirements.lock", ROOT / "config" / "example.yaml"):
        for anchor in re.findall(r"operations\.md#([a-z0-9-]+)", doc.read_text()):
            assert anchor in anchors, (doc.name, anchor)
