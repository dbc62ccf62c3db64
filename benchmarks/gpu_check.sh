#!/usr/bin/env bash
# Runs benchmarks/gpu_check.py's device step on a lent GPU machine (see that file's docstring).
# Expects .gpu/ (made by `python benchmarks/gpu_check.py prepare`) in the repository root.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
# TVM's CUDA runtime links libcudart.so.13: the toolkit's, or the one PyTorch's wheels bring
NV=$(python3 -c 'import glob, os, site; print(":".join(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "*", "lib"))))')
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:$NV:${LD_LIBRARY_PATH:-}
nvidia-smi -L
python3 benchmarks/gpu_check.py device --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
# the GPU-marked tests that need no TVM compiler
python3 -m pytest -q -m gpu tests/test_torch_backend.py -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
