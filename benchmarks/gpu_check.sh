#!/usr/bin/env bash
# One GPU check, at most ~8 minutes, on a machine with torch, triton and nvcc
# but no vLLM: build the CUDA extension, run the gpu-marked tests, and time
# the CUDA rotary op and the pre-RoPE paged attention kernels. Prints
# everything; results land in $OUT (or ./bench_results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_results}"
mkdir -p "$OUT"
nvidia-smi -L || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== build the CUDA extension (in place)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# torch finds CUDA_HOME from `which nvcc` before /usr/local/cuda; a wrapper script on PATH
# (as on the CPU build machine) then points it at a folder without cuda_runtime.h
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/include ] && export CUDA_HOME=/usr/local/cuda
# Step budgets add up to under 8 minutes (build 200 s, then 60 + 60 + 90 + 60 s).
time timeout 200 env YARN_VLLM_FORCE_CUDA=1 MAX_JOBS=16 python setup.py build_ext --inplace 2>&1 | tail -5
python -c "import torch, yarn_vllm.ops as o; print('extension', o.HAS_EXTENSION, 'cuda kernel', o.extension_supports(torch.device('cuda')))"

echo "== gpu tests: pre-RoPE paged attention (CUDA decode op, Triton on CUDA, xformers if present)"
timeout 60 python -m pytest -q -x -m gpu -p no:cacheprovider tests/test_paged_attention_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests_paged_attention.txt"

echo "== gpu tests (CUDA rotary op against the fp32 reference)"
timeout 60 python -m pytest -q -x -m gpu -p no:cacheprovider tests/test_rotary_op.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

echo "== paged attention benchmark: decode against the copy roofline, Triton prefill against SDPA"
timeout 90 python benchmarks/bench_paged_attention_gpu.py --out "$OUT/paged_attention_gpu.json" 2>&1 | tee "$OUT/paged_attention_gpu.txt"

echo "== rope benchmark on CUDA"
timeout 60 python benchmarks/bench_rope.py --device cuda --out "$OUT/rope_cuda.json" 2>&1 | tee "$OUT/rope_cuda.txt"
