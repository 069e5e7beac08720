#!/usr/bin/env bash
# GPU checks for a CUDA machine, in under 10 minutes: the gpu-marked tests (CUDA provider parity with the
# CPU, the TensorRT config served by the production image's native Triton where that binary is present)
# and the sampling benchmark with onnxruntime on the GPU. Run from a checkout after `make setup`:
#   bash benchmarks/gpu_check.sh
# onnxruntime-gpu (same version as the pinned CPU onnxruntime) goes into .cache/ort-gpu, ahead of the CPU
# package on PYTHONPATH, so the project's venv is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    version=$("$PY" -c "import onnxruntime; print(onnxruntime.__version__)")
    "$PY" -m pip install --quiet --no-deps --target .cache/ort-gpu "onnxruntime-gpu==$version"
    export PYTHONPATH="$PWD/.cache/ort-gpu${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
timeout 420 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs
timeout 150 "$PY" benchmarks/sampling.py --checkpoint-kaem checkpoints/kaem_fmnist.pt --batch 256 --threads 4 \
    --seconds 1 --ort-provider cuda
