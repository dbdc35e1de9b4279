"""yarn-vllm's CUDA build against vLLM's CUDA build, on a machine without a GPU (issue 15).

Run by benchmarks/cuda_build_check.sh in the side environment (.venv-cuda), with
PYTHONPATH at the copy of the tree that holds the CUDA-built extension:

  ops   every torch.ops.yarn_vllm op: its schema against the m.def() calls in csrc/ and
        its CPU, CUDA and Meta (fake) kernels; the CPU rotary kernel against the fp32
        reference.
  vllm  vLLM 0.32's CUDA platform with our plugin (cuda_vllm_check.py). Importing
        vllm.platforms.cuda needs libcuda.so.1, which the shell script supplies as a stub
        driver where none is installed.

Nothing runs on a GPU. Each check prints one line; the JSON report goes to --out.
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cuda_check_report import RESULTS, check, guarded

DISPATCH_KEYS = ("CPU", "CUDA", "Meta")


def declared_schemas(csrc: Path) -> dict[str, tuple[str, str]]:
    """{op name: (schema, file)} from every m.def("...") in csrc (adjacent literals joined)."""
    schemas = {}
    for source in sorted(csrc.glob("*.c*")):
        text = re.sub(r"//[^\n]*", "", source.read_text())
        for call in re.finditer(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', text):
            schema = " ".join("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call.group(1))).split())
            schemas[schema.split("(", 1)[0].strip()] = (schema, source.name)
    return schemas


def check_ops(tree: Path) -> None:
    """bindings.cpp's ops need CPU, CUDA and Meta (fake) kernels; ops that a CUDA launcher
    declares itself (TORCH_LIBRARY_FRAGMENT) need CUDA, and the rest is reported."""
    import torch

    import yarn_vllm
    import yarn_vllm._C as ext
    import yarn_vllm.ops  # noqa: F401 - registers any Python fakes
    from torch._library import simple_registry

    check("extension comes from the CUDA build tree", Path(ext.__file__).is_relative_to(tree)
          and Path(yarn_vllm.__file__).is_relative_to(tree), ext.__file__)
    declared = declared_schemas(tree / "csrc")
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names()
                        if n.startswith("yarn_vllm::"))
    check("every schema declared in csrc/ is registered, and no other",
          sorted(f"yarn_vllm::{n}" for n in declared) == registered,
          f"declared {sorted(declared)}, registered {registered}")
    for qualname in registered:
        name = qualname.split("::", 1)[1]
        expected, source = declared.get(name, ("?", "?"))
        schema = str(getattr(torch.ops.yarn_vllm, name).default._schema)
        check(f"{name}: schema matches {source}", schema == f"yarn_vllm::{expected}", schema)
        dump = torch._C._dispatch_dump(qualname)
        fake = simple_registry.singleton.find(qualname).fake_impl.kernel
        required = DISPATCH_KEYS if source == "bindings.cpp" else ("CUDA",)
        for key in DISPATCH_KEYS:
            # "computed": a CompositeExplicitAutograd kernel serves every backend key too.
            has = torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, key)
            where = re.search(rf"^({key}|Composite\w+\[alias\]): registered at (\S+)", dump,
                              re.M)
            detail = (where.group(2) + ("" if where.group(1) == key else f" ({where.group(1)})")
                      if where else "MISSING")
            if key == "Meta" and fake is not None:
                detail = f"Python fake at {Path(fake.source).relative_to(tree)}"
            if key not in required and not has:
                detail += f" (not required: {source} declares a CUDA-only op)"
            check(f"{name}: {key} kernel", has or key not in required, detail)
    _check_cpu_rotary(torch)


def _check_cpu_rotary(torch) -> None:
    """The CUDA build's CPU rotary kernel (same flags as a CPU-only build) against the fp32
    reference, through yarn_vllm.ops; with two scales and a row per token where the wrapper
    takes scale_index (request mode, issue 15 item 4)."""
    import inspect

    from yarn_vllm.yarn import yarn_math
    from yarn_vllm.ops import extension_supports, rotary_embedding_, rotary_reference

    assert extension_supports(torch.device("cpu")), "no CPU rotary kernel"
    gen = torch.Generator().manual_seed(0)
    tokens, heads, head_size = 19, 3, 64
    inv_freq = torch.stack([yarn_math.yarn_inv_freq(head_size, 1e4, s, 2048, 32.0, 1.0, True)
                            for s in (2.0, 4.0)])
    mscale = torch.tensor([1.07, 1.14])
    pos = torch.randint(0, 8192, (tokens,), generator=gen)
    rows = torch.randint(0, 2, (tokens,), generator=gen, dtype=torch.int32)
    per_token = "scale_index" in inspect.signature(rotary_embedding_).parameters
    if not per_token:
        rows.zero_()
    q = torch.randn(tokens, heads * head_size, generator=gen)
    ref = torch.empty(tokens, heads, head_size)
    for r in (0, 1):
        sel = rows == r
        ref[sel] = rotary_reference(q.view(tokens, heads, head_size)[sel], pos[sel], inv_freq[r],
                                    float(mscale[r]))
    if per_token:
        rotary_embedding_(pos, q, None, inv_freq, mscale, head_size, True, scale_index=rows)
    else:
        rotary_embedding_(pos, q, None, inv_freq[0], float(mscale[0]), head_size, True)
    err = (q.view(tokens, heads, head_size) - ref).abs().max().item()
    check("rotary_embedding on CPU matches the fp32 reference", err < 1e-5,
          f"max err {err:.1e}; {'a scale per token' if per_token else 'one scale'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("ops", "vllm"))
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--capability", default="9.0",
                        help="compute capability the CUDA platform reports (vllm part)")
    args = parser.parse_args()
    import yarn_vllm

    tree = Path(yarn_vllm.__file__).resolve().parent.parent
    if args.part == "ops":
        guarded("ops", check_ops, tree)
    else:
        import cuda_vllm_check

        guarded("vllm", cuda_vllm_check.run, tree, args.capability)
    failed = [r for r in RESULTS if not r["ok"]]
    args.out.write_text(json.dumps({"part": args.part, "tree": str(tree), "checks": RESULTS},
                                   indent=1))
    print(f"{args.part}: {len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
