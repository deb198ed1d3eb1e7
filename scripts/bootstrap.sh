#!/usr/bin/env bash
# Create .venv with torch and gosgd-p2p (editable, with the test tools and the optional
# integrations the tests cover). Safe to re-run.
#
#   TORCH_SPEC   the torch to install first (default torch==2.13.0, the CPU build on the
#                project's machines; on a CUDA host use e.g. "torch" or a CUDA wheel URL)
#   PYTHON       the interpreter to build the venv from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP=(.venv/bin/python -m pip install --quiet --root-user-action=ignore --disable-pip-version-check)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and alone: the package only asks for torch>=2.2, so this choice sticks
# (left to the resolver, a bare "torch" pulls a multi-gigabyte CUDA build).
"${PIP[@]}" "$TORCH_SPEC"
# the test tools, and the optional integrations the tests run (Lightning, transformers)
"${PIP[@]}" -e '.[dev,lightning,hf]'
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
