#!/usr/bin/env bash
# The CUDA build and vLLM interface check on a machine without a GPU (issue 15, items 1-2).
#
#   benchmarks/cuda_build_check.sh [--env-only | --rebuild]
#
# 1. env:   a side environment .venv-cuda (idempotent) with the CUDA build of torch that
#           vllm==0.32.0 pins, and vllm==0.32.0 itself. Several GB the first time.
# 2. build: the extension with YARN_VLLM_FORCE_CUDA=1 in a copy of the tree under $OUT, so
#           the CPU extension that .venv imports (yarn_vllm/_C*.so) is never replaced.
# 3. ops:   every torch.ops.yarn_vllm op with its CPU / CUDA / Meta kernels, checked
#           against the schemas in csrc/bindings.cpp (cuda_interface_check.py ops).
# 4. vllm:  plugin registration, get_rope, CudaPlatform backend selection and the
#           backend's GPU-model-runner interface (cuda_interface_check.py vllm).
#
# Logs and JSON land in $OUT (default bench_results/cuda_build). Exit status 0 only
# when every step passed. Environment: YARN_VLLM_CUDA_VENV (the side env),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${YARN_VLLM_CUDA_VENV:-$ROOT/.venv-cuda}"
OUT="${OUT:-$ROOT/bench_results/cuda_build}"
PY="$VENV/bin/python"
VLLM_VERSION=0.32.0
mode="${1:-all}"
mkdir -p "$OUT"
log() { echo "== $*"; }

# pip as PyPI serves it. This machine's pip configuration (/etc/pip.conf,
# /etc/xdg/pip: a torch<=2.14.1 constraint; PIP_FIND_LINKS=/opt/wheels, which holds
# torch-2.13.0+cpu) would make `torch==2.13.0` resolve to the CPU build: a local
# version label satisfies the pin and sorts above the plain release.
clean_pip() {
  env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p' | grep -v -e PIP_CERT -e PIP_DEFAULT_TIMEOUT) \
    PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip "$@"
}

env_ready() {
  [[ -x "$PY" ]] && "$PY" - "$VLLM_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import torch
sys.exit(0 if torch.version.cuda and version("vllm") == sys.argv[1] else 1)
EOF
}

make_env() {
  if env_ready; then
    log "side env $VENV is ready"
  else
    log "side env $VENV: installing vllm==$VLLM_VERSION and its CUDA torch (several GB)"
    local start=$SECONDS
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    clean_pip install -q --upgrade pip "setuptools<81" wheel
    clean_pip install "vllm==$VLLM_VERSION"
    log "side env installed in $((SECONDS - start)) s"
  fi
  "$PY" - <<'EOF' | tee "$OUT/env.txt"
from importlib.metadata import version
import torch
assert torch.version.cuda is not None, f"torch {torch.__version__} in the side env is a CPU build"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {version('vllm')}, "
      f"cuda available: {torch.cuda.is_available()}")
EOF
}

# nvcc must share torch's CUDA major version (torch.utils.cpp_extension refuses
# otherwise): /usr/local/cuda when it does, else the nvidia-cuda-nvcc wheel vLLM pulls in.
pick_cuda_home() {
  local want have home
  want="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
  for home in "${CUDA_HOME:-}" /usr/local/cuda \
      "$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu'"$want"'"))' 2>/dev/null)"; do
    [[ -n "$home" && -x "$home/bin/nvcc" ]] || continue
    have="$("$home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    [[ "$have" == "$want" ]] && { echo "$home"; return; }
  done
  echo "no nvcc with CUDA major $want (torch's) in \$CUDA_HOME, /usr/local/cuda or the wheel" >&2
  return 1
}

so_digest() { sha256sum "$ROOT"/yarn_vllm/_C*.so 2>/dev/null || echo "no CPU extension"; }

# The build runs in a copy of the working tree (tracked and untracked files alike, as
# another helper may be adding kernels), so the CPU build in yarn_vllm/ stays in place.
# The copy is refreshed on every run; the compile is skipped while setup.py, csrc/, the
# architectures and torch are what the last successful build saw (--rebuild forces it).
build_ext() {
  local tree="$OUT/tree" before status=0 digest
  before="$(so_digest)"
  digest="$( (cd "$ROOT" && cat setup.py csrc/* 2>/dev/null; echo "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}";
              "$PY" -c 'import torch; print(torch.__version__)') | sha256sum | cut -c1-16)"
  local keep=""
  if [[ "$mode" != --rebuild && -f "$OUT/build.digest" && "$(cat "$OUT/build.digest")" == "$digest" ]]; then
    keep="$(ls "$tree"/yarn_vllm/_C*.so 2>/dev/null | head -1)"
    [[ -n "$keep" ]] && cp "$keep" "$OUT/_C.so.keep"
  fi
  rm -rf "$tree" "$OUT/build.digest" && mkdir -p "$tree"
  tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' \
    -cf - setup.py pyproject.toml README.md csrc yarn_vllm | tar -C "$tree" -xf -
  export CUDA_HOME; CUDA_HOME="$(pick_cuda_home)"
  local start=$SECONDS
  if [[ -n "$keep" ]]; then
    mv "$OUT/_C.so.keep" "$keep"
    log "build: setup.py and csrc/ unchanged since the last build ($digest); reusing its extension"
    (cd "$tree" && YARN_VLLM_SKIP_EXT=1 "$PY" setup.py -q egg_info) >/dev/null 2>&1 || status=$?
  else
    log "build: nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p') at $CUDA_HOME," \
        "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}, in $tree (log: $OUT/build.log)"
    # egg_info: the copy's entry points (vllm.general_plugins) become visible on PYTHONPATH.
    (cd "$tree" && YARN_VLLM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
      PATH="$CUDA_HOME/bin:$PATH" "$PY" setup.py build_ext --inplace egg_info) >"$OUT/build.log" 2>&1 || status=$?
    echo "build: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/build.log"
    [[ $status == 0 ]] && echo "$digest" >"$OUT/build.digest"
  fi
  [[ -n "$keep" && $status == 0 ]] && echo "$digest" >"$OUT/build.digest"
  summarize_build "$tree" || status=1
  # The build writes only under $tree; a change here is another build in the working tree.
  [[ "$(so_digest)" == "$before" ]] || echo "build: note: $ROOT/yarn_vllm/_C*.so changed" \
    "during this run (not by this script, which built in $tree)"
  grep -q "$ROOT/yarn_vllm/_C" "$OUT/build.log" && { echo "build: wrote into $ROOT/yarn_vllm"; status=1; }
  return $status
}

# The compile and link lines (include paths dropped), and every CUDA source in csrc/
# (*.cu, *_cuda.cpp) compiled and linked into the extension.
summarize_build() {
  local tree="$1" ok=0 src link
  grep -E '^(\S*/)?(nvcc|g\+\+|c\+\+|gcc) ' "$OUT/build.log" \
    | sed -E 's/ -(I|isystem) ?[^ ]+//g' >"$OUT/compile_lines.txt" || true
  sed -nE 's#^(\S*/)?(\S+) .*-c (\S+) .*#build: compile: \2 \3#p' "$OUT/compile_lines.txt"
  link="$(grep -E ' -shared ' "$OUT/compile_lines.txt" | tail -1)"
  [[ -n "$link" ]] && echo "build: link: $(sed -E 's/ \S+\.o\b//g' <<<"$link")"
  grep -E -A3 'error' "$OUT/build.log" | head -60 || true
  for src in "$tree"/csrc/*.cu "$tree"/csrc/*_cuda.cpp; do
    src="csrc/$(basename "$src")"
    grep -qE -- "-c $src " "$OUT/compile_lines.txt" && grep -qF "/${src%.*}.o" <<<"$link" \
      || { echo "build: $src was not compiled and linked (is it in setup.py's sources?)"; ok=1; }
  done
  ls "$tree"/yarn_vllm/_C*.so >/dev/null 2>&1 || { echo "build: no extension in $tree"; ok=1; }
  return $ok
}

# vLLM's CUDA extensions link libcuda.so.1, the NVIDIA driver, which a machine without a
# GPU lacks; importing vllm.platforms.cuda then fails. This stand-in exports the driver
# symbols they reference, each failing with CUDA_ERROR_NO_DEVICE (100); it is put on
# LD_LIBRARY_PATH only for the interface check, and never where a driver exists.
driver_stub() {
  local dir="$OUT/driver-stub" site
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$dir"
  {
    echo '/* Generated by benchmarks/cuda_build_check.sh: no NVIDIA driver on this machine. */'
    echo 'int cuGetErrorString(int e, const char **s) { (void)e; *s = "no NVIDIA driver (stub)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }'
    find "$site/vllm" -name '*.so' | while read -r lib; do
      readelf -d "$lib" 2>/dev/null | grep -q 'libcuda\.so\.1' && nm -D --undefined-only "$lib"
    done | awk '{print $2}' | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u \
      | grep -vx -e cuGetErrorString -e cuGetErrorName | sed 's/.*/int &(void) { return 100; }/'
  } >"$dir/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so.1" "$dir/stub.c"
  echo "$dir"
}

interface_check() {
  local part="$1" extra=()
  [[ "$part" == vllm ]] && ! ldconfig -p | grep -q 'libcuda\.so\.1' \
    && extra=(LD_LIBRARY_PATH="$(driver_stub)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  log "$part: benchmarks/cuda_interface_check.py $part (log: $OUT/$part.log)"
  # Run from $OUT: the repository root on sys.path would shadow the tree's yarn_vllm.
  # CUDA_VISIBLE_DEVICES="": nothing here may touch a GPU, even where one exists.
  (cd "$OUT" && env "${extra[@]}" PYTHONPATH="$OUT/tree" CUDA_VISIBLE_DEVICES="" \
    "$PY" "$ROOT/benchmarks/cuda_interface_check.py" "$part" --out "$OUT/$part.json") \
    >"$OUT/$part.log" 2>&1
  local status=$?
  grep -E '^(PASS|FAIL|registered|platform|  skip)|: [0-9]+ passed' "$OUT/$part.log"
  return $status
}

make_env
[[ "$mode" == --env-only ]] && exit 0
failed=()
build_ext || failed+=(build)
ls "$OUT"/tree/yarn_vllm/_C*.so 2>/dev/null | sed 's/^/build: extension /'
if ls "$OUT"/tree/yarn_vllm/_C*.so >/dev/null 2>&1; then
  interface_check ops || failed+=(ops)
fi
interface_check vllm || failed+=(vllm)
if (( ${#failed[@]} )); then
  log "FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
log "all passed (logs in $OUT)"
