"""YaRN maths: the fp32 reference that every other part of yarn-vllm calls.

Equation numbers refer to "YaRN: Efficient Context Window Extension of Large
Language Models" (Peng, Quesnelle, Fan, Shippole; arXiv 2309.00071).

Notation (the same names are used everywhere in yarn-vllm):
  d                      rotary_dim, the number of rotated channels per head
  b                      rope_theta, RoPE's base
  s                      factor, the context extension ratio L' / L
  L                      original_max_position, the trained context length
  beta_fast, beta_slow   the ramp bounds, in rotations over L (alpha/beta of Eq. 18)
  mscale                 sqrt(1/t) of Eq. 22, applied to both q and k
  attention_scale        mscale**2, the multiplier on the attention logits

Everything here is a pure function of its arguments; tensors are fp32 on CPU
unless a device is given.
"""

from __future__ import annotations

import math

import torch


def _wavelength_over_2pi(rotary_dim: int, rope_theta: float, device=None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return rope_theta ** exponents


def rope_inv_freq(rotary_dim: int, rope_theta: float, device=None) -> torch.Tensor:
    """RoPE's theta_j = b^(-2j/d) (paper Eq. 3-4). Shape [rotary_dim // 2], fp32."""
    return 1.0 / _wavelength_over_2pi(rotary_dim, rope_theta, device)


def correction_dim(num_rotations: float, rotary_dim: int, rope_theta: float,
                   original_max_position: int) -> float:
    """The dimension index j whose wavelength fits `num_rotations` times into L.

    From r_j = L / lambda_j (Eq. 16) with lambda_j = 2 pi b^(2j/d) (Eq. 13),
    solved for j: j = d ln(L / (2 pi r)) / (2 ln b).
    """
    return (rotary_dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (
        2 * math.log(rope_theta))


def correction_range(beta_fast: float, beta_slow: float, rotary_dim: int, rope_theta: float,
                     original_max_position: int, truncate: bool = True) -> tuple[float, float]:
    """The [low, high] band of dimension indices over which the ramp of Eq. 18 runs.

    Below `low` (more than beta_fast rotations over L) frequencies are kept;
    above `high` (fewer than beta_slow rotations) they are fully interpolated.
    With `truncate` the bounds are rounded outwards to whole indices, as the
    reference implementation and most released checkpoints assume.
    """
    low = correction_dim(beta_fast, rotary_dim, rope_theta, original_max_position)
    high = correction_dim(beta_slow, rotary_dim, rope_theta, original_max_position)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def linear_ramp(low: float, high: float, n: int, device=None) -> torch.Tensor:
    """The ramp of Eq. 18 over indices 0..n-1: 0 at or below `low`, 1 at or above `high`.

    A zero-width band is widened by 1e-3 so that the division is defined; the
    ramp is then a step at `low`. Shape [n], fp32.
    """
    if low == high:
        high += 0.001
    idx = torch.arange(n, dtype=torch.float32, device=device)
    return ((idx - low) / (high - low)).clamp(0.0, 1.0)


def yarn_inv_freq(rotary_dim: int, rope_theta: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                  device=None) -> torch.Tensor:
    """NTK-by-parts inverse frequencies h(theta_j) (Eq. 17-19). Shape [rotary_dim // 2], fp32.

    Each band blends the extrapolated frequency theta_j with the interpolated
    theta_j / s, weighted by gamma(r_j): gamma = 1 keeps theta_j (high
    frequencies, many rotations), gamma = 0 gives theta_j / s.
    """
    base = _wavelength_over_2pi(rotary_dim, rope_theta, device)
    extrapolated = 1.0 / base
    # No shortcut at s = 1: the blend below rounds like HF's and vLLM's, bit for bit.
    # 1 / (s b^(2j/d)) rather than theta_j / s: the same rounding as HF and vLLM,
    # which matters at large positions where one ulp of theta_j moves the angle.
    interpolated = 1.0 / (factor * base)
    low, high = correction_range(beta_fast, beta_slow, rotary_dim, rope_theta,
                                 original_max_position, truncate)
    # gamma(r_j) of Eq. 18, written as 1 - ramp over the index j: r_j falls as j rises.
    gamma = 1.0 - linear_ramp(low, high, rotary_dim // 2, device)
    return interpolated * (1.0 - gamma) + extrapolated * gamma


def get_mscale(factor: float, mscale: float = 1.0) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (Eq. 22), generalised by DeepSeek's `mscale` coefficient.

    It is 1 for s <= 1: scaling only ever sharpens attention after extension.
    """
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_mscale(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None,
                attention_factor: float | None = None) -> float:
    """The magnitude scale applied to both q and k (so the logits get its square).

    Priority: an explicit `attention_factor` wins; else DeepSeek-V2's ratio
    get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set;
    else Eq. 22.
    """
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def attention_scale(mscale: float) -> float:
    """The multiplier on q.k^T implied by scaling q and k each by `mscale` (1/t of Eq. 21)."""
    return mscale * mscale


def dynamic_factor(seq_len: int | torch.Tensor, original_max_position: int,
                   headroom: float = 1.0, factor: float = 1.0):
    """Dynamic scaling's s(l) = max(1, l / L) (paper Section 3.3, Eq. 24).

    `headroom` c >= 1 is our extension: s = max(1, min(c l / L, max(factor, l / L))).
    The scale runs ahead of the length by c but stops at the configured `factor`
    (unless the length itself needs more); c = 1 is the paper's rule exactly.
    Accepts an int (returns float) or an integer tensor of lengths (returns fp32).
    """
    if isinstance(seq_len, torch.Tensor):
        ratio = seq_len.to(torch.float32) / original_max_position
        return torch.minimum(headroom * ratio, ratio.clamp_min(factor)).clamp_min(1.0)
    ratio = seq_len / original_max_position
    return max(1.0, min(headroom * ratio, max(factor, ratio)))
