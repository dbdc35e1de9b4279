"""The rotary op: the compiled kernels, their PyTorch fallback and the fp32 reference.

`rotary_embedding_` is what the rest of yarn-vllm calls. It runs
`torch.ops.yarn_vllm.rotary_embedding` (csrc/) when the extension is built for
the tensors' device, and the pure-PyTorch path otherwise, so the package works
without a compiler. The ops' Meta twins (csrc/bindings.cpp) run the launchers'
own argument checks, so torch.compile traces only calls the kernels accept.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    from yarn_vllm import _C  # noqa: F401  (registers torch.ops.yarn_vllm.*)
    HAS_EXTENSION = True
except ImportError as e:  # pragma: no cover - exercised by YARN_VLLM_SKIP_EXT builds
    HAS_EXTENSION = False
    logger.info("yarn_vllm._C is not built (%s); using the PyTorch rotary path", e)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if the extension registers a `dispatch_key` kernel for yarn_vllm::`op`."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"yarn_vllm::{op}", dispatch_key)


# Decided once at import, as a plain dict: the lookup sits on the hot path and
# inside torch.compile'd graphs, where a torch._C query cannot be traced.
_SUPPORTED_DEVICE_TYPES = {"cpu": has_kernel("rotary_embedding", "CPU"),
                           "cuda": has_kernel("rotary_embedding", "CUDA")}
# Resolved once: torch.ops' namespace lookups cost a microsecond a call.
_ROTARY_OP = torch.ops.yarn_vllm.rotary_embedding.default if HAS_EXTENSION else None


def extension_supports(device: torch.device) -> bool:
    """True if the compiled rotary op has a kernel for `device`."""
    return _SUPPORTED_DEVICE_TYPES.get(device.type, False)


def _serves(x: torch.Tensor) -> bool:
    """extension_supports(x.device) without reading `device.type`, which costs more than
    a small op's kernel (about 1.5 us)."""
    if x.is_cpu:
        return _SUPPORTED_DEVICE_TYPES["cpu"]
    return x.is_cuda and _SUPPORTED_DEVICE_TYPES["cuda"]


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     mscale: float | torch.Tensor = 1.0, is_neox: bool = True,
                     angle_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE with frequencies `inv_freq` and magnitude `mscale`, in fp32: every kernel's reference.

    x: [T, H, D]; positions: [T] (int); inv_freq: [rotary_dim // 2], or [T, rotary_dim // 2]
    for a row per token; mscale: a float, or [T] per token. Token t's pair j turns by
    theta = position_t * inv_freq[t, j] and is scaled by mscale_t (YaRN Eq. 17-22, mscale on
    q and k as vLLM and HF fold it). Channels past rotary_dim pass through unscaled. NeoX
    pairs channel j with j + rotary_dim/2; GPT-J pairs 2j with 2j + 1. Angles are formed
    in `angle_dtype` (fp32, as HF and vLLM do; float64 for an exact reference).
    Returns fp32 [T, H, D].
    """
    rotary_dim = 2 * inv_freq.shape[-1]
    x = x.to(torch.float32)
    angles = positions.to(angle_dtype)[:, None] * inv_freq.to(angle_dtype)  # [T, d/2]
    if isinstance(mscale, torch.Tensor):
        mscale = mscale.to(torch.float32)[:, None]
    cos = (angles.cos().to(torch.float32) * mscale)[:, None, :]
    sin = (angles.sin().to(torch.float32) * mscale)[:, None, :]
    rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, tail), dim=-1)


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """[T, H*D] or [T, H, D] -> a [T, H, D] view of the same storage."""
    return x.unflatten(-1, (-1, head_size)) if x.dim() == 2 else x


def rotary_embedding_torch_(positions: torch.Tensor, query: torch.Tensor,
                            key: torch.Tensor | None, inv_freq: torch.Tensor,
                            mscale: torch.Tensor, head_size: int, is_neox: bool,
                            scale_index: torch.Tensor | None = None) -> None:
    """The op in plain PyTorch (fp32 maths, written back in place); arguments as the op's."""
    positions = positions.flatten()
    rows = (torch.zeros_like(positions) if scale_index is None else scale_index).long()
    for x in (query, key):
        if x is not None:
            view = _heads(x, head_size)
            view.copy_(rotary_reference(view, positions, inv_freq[rows], mscale[rows], is_neox))


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                      inv_freq: torch.Tensor, mscale: float | torch.Tensor, head_size: int,
                      is_neox: bool, scale_index: torch.Tensor | None = None) -> None:
    """Rotate query and key in place with YaRN frequencies and magnitude.

    positions: any shape holding T ids (flattened); query: [T, H_q * head_size] or
    [T, H_q, head_size] (the token stride is free, channels contiguous); key: likewise
    with H_k, or None. inv_freq: [rotary_dim // 2] (one scale) or [S, rotary_dim // 2]
    fp32, one row per scale (yarn_math.yarn_inv_freq); mscale: a float, or [S] fp32, the
    magnitude of each row; scale_index: None (row 0 for every token) or [T] ints in [0, S),
    each token's row (request mode). No host sync on the compiled path.
    """
    if inv_freq.dim() == 1:
        inv_freq = inv_freq.unsqueeze(0)
    if not isinstance(mscale, torch.Tensor):
        mscale = torch.full((1,), float(mscale), dtype=torch.float32, device=inv_freq.device)
    elif mscale.dim() == 0:
        mscale = mscale.reshape(1)
    if positions.dim() != 1 or positions.dtype != torch.int64:
        positions = positions.flatten().to(torch.int64)
    if scale_index is not None and scale_index.dtype != torch.int32:
        scale_index = scale_index.to(torch.int32)
    if _serves(query):
        _ROTARY_OP(positions, query, key, inv_freq, mscale, scale_index, head_size, is_neox)
    else:
        rotary_embedding_torch_(positions, query, key, inv_freq, mscale, head_size, is_neox,
                                scale_index)
