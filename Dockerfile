# gosgd-node in a container. CPU torch by default; for GPU hosts build FROM a CUDA base image
# and pass a CUDA torch (see deploy/README.md).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The torch to install: a pip requirement, and the index it comes from.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/gosgd
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY gosgd_p2p ./gosgd_p2p
RUN pip install . && useradd --create-home --uid 10001 gosgd
USER gosgd
EXPOSE 7070
ENTRYPOINT ["gosgd-node"]
CMD ["--listen", "0.0.0.0:7070"]
