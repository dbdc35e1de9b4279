"""The rotary op: the compiled kernels, their PyTorch fallback and the fp32 reference.

`rotary_embedding_` is what the rest of yarn-vllm calls. It runs
`torch.ops.yarn_vllm.rotary_embedding` (csrc/) when the extension is built for
the tensors' device, and the pure-PyTorch path otherwise, so the package works
without a compiler. The fake (meta) twin lets torch.compile trace the op.
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


def _has_kernel(dispatch_key: str) -> bool:
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "yarn_vllm::rotary_embedding", dispatch_key)


# Decided once at import, as a plain dict: the lookup sits on the hot path and
# inside torch.compile'd graphs, where a torch._C query cannot be traced.
_SUPPORTED_DEVICE_TYPES = {"cpu": _has_kernel("CPU"), "cuda": _has_kernel("CUDA")}


def extension_supports(device: torch.device) -> bool:
    """True if the compiled rotary op has a kernel for `device`."""
    return _SUPPORTED_DEVICE_TYPES.get(device.type, False)


if HAS_EXTENSION:
    @torch.library.register_fake("yarn_vllm::rotary_embedding")
    def _rotary_embedding_fake(positions, query, key, inv_freq, cos_sin_table, mscale,
                               head_size, is_neox):
        return None

    @torch.library.register_fake("yarn_vllm::paged_attention")
    def _paged_attention_fake(out, query, key_cache, value_cache, block_table, seq_lens,
                              query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start,
                              is_neox):
        return None


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     mscale: float = 1.0, is_neox: bool = True,
                     angle_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE with `inv_freq` and magnitude `mscale`, in fp32: the reference for every kernel.

    x: [num_tokens, num_heads, head_size]; positions: [num_tokens] (int);
    inv_freq: [rotary_dim // 2]. Channels past rotary_dim pass through
    unscaled (as in vLLM and HF). NeoX pairs channel i with i + rotary_dim/2;
    GPT-J pairs 2i with 2i + 1. Angles are formed in `angle_dtype` (fp32, as HF
    and vLLM do; float64 for an exact reference). Returns fp32 [num_tokens, num_heads, head_size].
    """
    rotary_dim = 2 * inv_freq.shape[-1]
    x = x.to(torch.float32)
    angles = torch.outer(positions.to(angle_dtype), inv_freq.to(angle_dtype))  # [T, d/2]
    cos = (angles.cos() * mscale).to(torch.float32)[:, None, :]
    sin = (angles.sin() * mscale).to(torch.float32)[:, None, :]
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
                            key: torch.Tensor | None, inv_freq: torch.Tensor, mscale: float,
                            head_size: int, is_neox: bool) -> None:
    """The op in plain PyTorch (fp32 maths, written back in place)."""
    positions = positions.flatten()
    for x in (query, key):
        if x is not None:
            view = _heads(x, head_size)
            view.copy_(rotary_reference(view, positions, inv_freq, mscale, is_neox))


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                      inv_freq: torch.Tensor, mscale: float, head_size: int, is_neox: bool,
                      cos_sin_table: torch.Tensor | None = None) -> None:
    """Rotate query and key in place with YaRN frequencies and magnitude.

    positions: [T] int; query: [T, H_q * head_size] or [T, H_q, head_size]
    (the token stride is free, channels contiguous); key: likewise with H_k,
    or None; inv_freq: [rotary_dim // 2] fp32 (yarn_math.yarn_inv_freq);
    cos_sin_table: optional [max_position, rotary_dim] fp32 (cos | sin), read
    instead of computing cos/sin on the fly.
    """
    if extension_supports(query.device):
        if positions.dim() != 1 or positions.dtype != torch.int64:
            positions = positions.flatten().to(torch.int64)
        torch.ops.yarn_vllm.rotary_embedding(positions, query, key, inv_freq, cos_sin_table,
                                             float(mscale), head_size, is_neox)
    else:
        rotary_embedding_torch_(positions, query, key, inv_freq, mscale, head_size, is_neox)
