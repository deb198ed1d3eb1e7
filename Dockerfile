# gosgd-node in a container: serves gRPC on 7070 and Prometheus metrics on 9100, as a non-root
# user, with a HEALTHCHECK on the node's grpc.health.v1 service.
#
#   CPU (default):  docker build -t gosgd-p2p .
#   GPU host:       docker build -t gosgd-p2p:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                   (run with --gpus all; the node picks CUDA by itself with --device auto)
#   Air-gapped:     docker build -t gosgd-p2p --build-arg WHEELS=deploy/wheels .
#                   (a folder in the build context holding every wheel; see deploy/README.md)
#
# Written for the classic builder and BuildKit alike (deploy/smoke.sh uses the classic one).

# Any image with python3 >= 3.10, or a Debian/Ubuntu one where apt can install it.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# CUDA images come without Python: add it (needs apt, so not for air-gapped builds)
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --user-group gosgd

FROM base AS build
# The torch to install: a pip requirement and the index it comes from (ignored with WHEELS).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A folder in the build context with every wheel needed; set, pip uses nothing else.
ARG WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# deploy/wheels always exists (it may be empty), so this COPY works without WHEELS too
COPY ${WHEELS:-deploy/wheels}/ /tmp/wheels/
RUN python3 -m venv /opt/venv
# torch first, alone: the project's `torch>=2.2` is then satisfied and cannot pull a CUDA build
RUN if [ -n "$WHEELS" ]; then pip_from="--no-index --find-links /tmp/wheels"; \
    else pip_from="--index-url $TORCH_INDEX_URL"; fi \
    && /opt/venv/bin/pip install $pip_from "$TORCH_SPEC" \
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/test \
              /opt/venv/lib/python3*/site-packages/torch/include
# (C++ test binaries and headers: a node compiles no C++; about 150 MB less)
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gosgd_p2p ./gosgd_p2p
RUN if [ -n "$WHEELS" ]; then pip_from="--no-index --find-links /tmp/wheels"; else pip_from=; fi \
    && /opt/venv/bin/pip install $pip_from . \
    && /opt/venv/bin/gosgd-node --help >/dev/null

FROM base
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# numeric, so that Kubernetes' runAsNonRoot can check it
USER 10001
WORKDIR /home/gosgd
# gRPC (gossip, grpc.health.v1), Prometheus /metrics
EXPOSE 7070 9100
# The health service needs no cluster token; with mutual TLS pass the node's --tls-* files.
# (A generous timeout: gosgd-health starts a Python process, slow on a busy CPU.)
HEALTHCHECK --interval=15s --timeout=30s --start-period=60s --retries=3 \
    CMD ["gosgd-health", "--address", "127.0.0.1:7070", "--timeout", "10"]
ENTRYPOINT ["gosgd-node"]
CMD ["--listen", "0.0.0.0:7070", "--metrics-port", "9100"]
