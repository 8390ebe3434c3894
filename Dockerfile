# syntax=docker/dockerfile:1
# The gateway's container image:   docker build -t llm-gateway:0.1.0 .
#
# - Two stages. The build stage installs requirements.lock (every package pinned by sha256)
#   and then the gateway itself, offline, into a virtualenv; the runtime stage gets only that
#   virtualenv: no pip cache, no build tools, no source tree.
# - Runs as an unprivileged user (uid/gid 10001) and writes nothing at run time (bytecode is
#   compiled at build time), so it runs with a read-only root filesystem. Mount an emptyDir
#   on /tmp if you want scratch space.
# - Exec-form ENTRYPOINT: the gateway is PID 1 and receives SIGTERM (graceful drain) and
#   SIGHUP (policy reload) itself; with --workers it supervises and reaps its own children.
# - No policy is baked in: mount one at /etc/llm-gateway/policy.yaml (a Kubernetes ConfigMap,
#   or `-v $PWD/my-policy.yaml:/etc/llm-gateway/policy.yaml:ro`).
#
# Linted with hadolint in CI (scripts/check_deploy.sh). Pin the base image by digest in your
# own build pipeline (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/llm-gateway \
    && /opt/llm-gateway/bin/pip install --no-cache-dir --require-hashes --no-deps \
       -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/llm-gateway/bin/pip install --no-cache-dir --no-deps --no-build-isolation --no-index . \
    && /opt/llm-gateway/bin/pip check \
    && /opt/llm-gateway/bin/python -m compileall -q /opt/llm-gateway/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="OpenAI-compatible gateway in front of LLM providers" \
      org.opencontainers.image.licenses="Proprietary"
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/llm-gateway/journal
COPY --from=build /opt/llm-gateway /opt/llm-gateway
# GATEWAY_JOURNAL_DIR: usage a stopping replica could not hand to Redis waits there for the
# next start (gateway/limits/journal.py); mount a volume on it (the Kubernetes manifests: emptyDir).
ENV PATH=/opt/llm-gateway/bin:$PATH \
    GATEWAY_JOURNAL_DIR=/var/lib/llm-gateway/journal \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# `gateway healthcheck` uses the standard library only: cheap enough to run every 15 s.
# It probes 127.0.0.1:8080; pass --port to it too if you serve on another port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["gateway", "healthcheck", "--path", "/healthz"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/llm-gateway/policy.yaml", "--host", "0.0.0.0"]
