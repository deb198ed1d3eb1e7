#!/usr/bin/env bash
# The GPU checks in one call, for a CUDA host: the CUDA tests, then every benchmark that says
# something about the GPU path or the host. Results go to $OUT (default bench/results/gpu):
# env.txt, pytest.txt, gpu_micro.json, overhead_gpu.json, transport_gpu_host.json,
# time_to_accuracy_gpu_host.json, time_to_accuracy_cnn_gpu_host.json,
# sender_placement_gpu_host.json, run.txt (9 files);
# docs/benchmarks.md quotes them.
#
#   bash bench/gpu_run.sh          # its expected length: docs/benchmarks.md
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-check PYTHON=.venv/bin/python bash bench/gpu_run.sh
#                                  # a check of the script on a host without a GPU (minutes)
#
# The host's python3 must have torch with CUDA. Missing packages may travel as wheels in .whl/
# (WHEELS=.whl, installed into /tmp/site, nothing else touched). Each step has its own time limit, and a
# failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the same steps on a host without a GPU (a check of the script)
QUICK=${QUICK:-}  # QUICK=1: every step, shrunk to check the script in minutes (not a measurement)
if [ -n "$QUICK" ]; then
    OVERHEAD=(--models mlp --batch-size 32 --steps 50 --warmup 5)
    TRANSPORT=(--sizes 16 --chunks-kib 1024 --repeats 1)
    PLACEMENT=(--repeats 1 --steps 300 --placements node,network,receive,netrecv)
else
    OVERHEAD=(--models resnet18 --batch-size 128 --steps 200 --warmup 30)
    TRANSPORT=(--sizes 16,64,256 --chunks-kib 1024,4096 --repeats 5)
    PLACEMENT=(--repeats 2)
fi
WHEELS=${WHEELS-.whl}  # a folder of wheels to install first; empty: none
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS COMMAND...: run one step under a time limit, log its status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - started))s"
}

{
    echo "== env"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        echo "cpus $(nproc)"
        "$PY" -c 'import torch, grpc, google.protobuf as p, isal
print("torch", torch.__version__, "grpc", grpc.__version__, "protobuf", p.__version__,
      "isal", isal.__version__, "cuda", torch.cuda.is_available())'
    } 2>&1 | tee "$OUT/env.txt"
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_wire.py \
        tests/test_node.py tests/test_malloc.py tests/test_send_process.py \
        tests/test_network_process.py 2>&1 | tee "$OUT/pytest.txt" | tail -15
    [ "$DEVICE" = cuda ] && step gpu_micro 60 "$PY" -m bench.gpu_micro --json "$OUT/gpu_micro.json"
    step overhead 300 "$PY" -m bench.overhead "${OVERHEAD[@]}" --device "$DEVICE" \
        --chunks-kib 1024,4096 --send-process --network-process --json "$OUT/overhead_gpu.json"
    step transport 120 "$PY" -m bench.transport "${TRANSPORT[@]}" \
        --json "$OUT/transport_gpu_host.json"
    if [ -d bench/time_to_accuracy ] && [ -z "$QUICK" ]; then
        step time_to_accuracy 120 "$PY" -m bench.time_to_accuracy --repeats 3 \
            --json "$OUT/time_to_accuracy_gpu_host.json" ${TTA_ARGS:-}
        step time_to_accuracy_cnn 120 "$PY" -m bench.time_to_accuracy --model cnn --repeats 3 \
            --json "$OUT/time_to_accuracy_cnn_gpu_host.json" ${TTA_ARGS:-}
    fi
    # GIL or CPU with 16 cores (last: the step limits add up to more than one 600 s call)
    step sender_placement 180 "$PY" -m bench.sender_placement "${PLACEMENT[@]}" \
        --json "$OUT/sender_placement_gpu_host.json"
} 2>&1 | tee "$OUT/run.txt"
