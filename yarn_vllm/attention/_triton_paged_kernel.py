"""Triton kernel of pre-RoPE paged attention. Imports triton: load it through triton_paged.py.

One program owns BLOCK_M rows of (query token, q head) pairs of one sequence,
one kv head and one split of the context: row r is token r // GROUP, q head
kv_head * GROUP + r % GROUP. Putting the GQA group into the rows makes every
key, and its rotation, serve the whole group, and gives decode (one token)
GROUP rows instead of one.

A head is split into its rotation pairs: channels `ia` and `ib` (NeoX: j and
j + rotary_dim/2; GPT-J: 2j and 2j + 1) and the unrotated tail, so
q . k = q_a . k_a + q_b . k_b + q_tail . k_tail, each a matmul, and cos/sin are
computed once per pair rather than once per channel.

Split contexts: with num_splits > 1 a program covers keys [split * split_size,
(split + 1) * split_size) only and writes its unnormalised output, running max
and sum to a workspace; `merge_splits_kernel` combines them. That gives a
decode batch of few long sequences more programs than B * H_kv.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sincos(angle):
    """cos, sin of fp32 angles of any size.

    Cody-Waite reduction to [-pi, pi] first: whether tl.cos lowers to an accurate
    libdevice call or to a hardware approximation that is only good near zero is
    the backend's choice, and angles reach 1e5 rad at long contexts. fma keeps
    k * 2pi_hi exact, so the reduced angle is as accurate as the fp32 input.
    """
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(k, -6.2831854820251465, angle)
    r = tl.fma(k, 1.7484555314695172e-07, r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _operand(x, dtype, EMULATE: tl.constexpr):
    """x rounded to the dot's operand dtype; kept in fp32 where EMULATE.

    Triton's CPU interpreter multiplies the raw bits of bf16 operands (3.9), so
    under TRITON_INTERPRET the launcher asks for the same rounding followed by an
    fp32 dot: products of bf16/fp16 values are exact in fp32, so only the
    accumulation order differs from the tensor-core dot.
    """
    if EMULATE:
        return x.to(dtype).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def paged_attention_kernel(
        # pointers
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr,
        inv_freq_ptr, logit_scale_ptr, ws_acc_ptr, ws_ml_ptr,
        # strides, in elements
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_kh, stride_kr, stride_kd, stride_vb, stride_vh, stride_vr, stride_vd,
        stride_bt, stride_inv,
        # sizes
        block_size, half, head_size, num_q_heads, num_splits, split_size,
        # Tile shapes must be constexpr (they size registers); GROUP too, so that
        # row -> (token, head) divides by a constant.
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_TAIL: tl.constexpr, IS_NEOX: tl.constexpr, PRECISION: tl.constexpr,
        EMULATE: tl.constexpr, SPLIT: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = tok < q_len
    q_pos = context + tok
    # keys past the tile's last query are masked for every row: don't load them
    hi = context + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1) + 1
    lo = split * split_size
    if lo >= hi:
        return
    hi = tl.minimum(hi, lo + split_size)

    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < half
    if IS_NEOX:
        ia = j
        ib = j + half
    else:
        ia = 2 * j
        ib = 2 * j + 1
    inv = tl.load(inv_freq_ptr + seq * stride_inv + j, mask=j_ok, other=0.0)
    scale = tl.load(logit_scale_ptr + seq) * 1.4426950408889634  # softmax in exp2

    # queries: rotate in fp32, fold in the logit scale, round to the cache dtype
    # for the tensor-core dot (fp32 accumulation)
    dot_dtype = k_cache_ptr.dtype.element_ty
    q_row = q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q_mask = row_ok[:, None] & j_ok[None, :]
    qa = tl.load(q_row + ia[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
    qb = tl.load(q_row + ib[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
    cos, sin = _sincos(q_pos.to(tl.float32)[:, None] * inv[None, :])
    qa, qb = (qa * cos - qb * sin) * scale, (qb * cos + qa * sin) * scale
    qa = _operand(qa, dot_dtype, EMULATE)
    qb = _operand(qb, dot_dtype, EMULATE)
    if HAS_TAIL:
        c = 2 * half + tl.arange(0, BLOCK_TAIL)
        c_ok = c < head_size
        qt = tl.load(q_row + c[None, :] * stride_qd, mask=row_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        qt = _operand(qt * scale, dot_dtype, EMULATE)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_size
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        blk = tl.load(block_table_ptr + seq * stride_bt + n // block_size, mask=n_ok, other=0)
        blk = blk.to(tl.int64)
        r = n % block_size
        k_tok = k_cache_ptr + blk * stride_kb + kv_head * stride_kh + r * stride_kr  # [N]
        # keys are loaded transposed, [pairs, N], ready to be the dot's right operand
        k_mask = j_ok[:, None] & n_ok[None, :]
        ka = tl.load(k_tok[None, :] + ia[:, None] * stride_kd, mask=k_mask, other=0.0)
        kb = tl.load(k_tok[None, :] + ib[:, None] * stride_kd, mask=k_mask, other=0.0)
        ka = ka.to(tl.float32)
        kb = kb.to(tl.float32)
        kcos, ksin = _sincos(inv[:, None] * n.to(tl.float32)[None, :])
        ka, kb = ka * kcos - kb * ksin, kb * kcos + ka * ksin
        s = tl.dot(qa, _operand(ka, dot_dtype, EMULATE), input_precision=PRECISION)
        s += tl.dot(qb, _operand(kb, dot_dtype, EMULATE), input_precision=PRECISION)
        if HAS_TAIL:
            kt = tl.load(k_tok[None, :] + c[:, None] * stride_kd,
                         mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            s += tl.dot(qt, _operand(kt, dot_dtype, EMULATE), input_precision=PRECISION)
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))

        # A row that sees no key yet (q_pos < lo, in a split past it) keeps m = -inf;
        # shifting by 0 instead keeps it at p = 0, l = 0 rather than NaN. The merge
        # never reads such a row's split.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_tok = v_cache_ptr + blk * stride_vb + kv_head * stride_vh + r * stride_vr
        v = tl.load(v_tok[:, None] + d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(_operand(p, dot_dtype, EMULATE),
                                            _operand(v, dot_dtype, EMULATE),
                                            input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        ws_row = ((q_start + tok).to(tl.int64) * num_q_heads + head) * num_splits + split
        tl.store(ws_acc_ptr + ws_row[:, None] * head_size + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(ws_ml_ptr + 2 * ws_row, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + 2 * ws_row + 1, l_i, mask=row_ok)
        return
    acc = acc / l_i[:, None]
    o_row = out_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(o_row + d[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def merge_splits_kernel(
        out_ptr, q_start_ptr, seq_lens_ptr, ws_acc_ptr, ws_ml_ptr,
        stride_ot, stride_oh, stride_od,
        head_size, num_q_heads, num_splits, split_size,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows as in paged_attention_kernel; row r reads the splits that hold its keys."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:
        return
    context = tl.load(seq_lens_ptr + seq) - q_len
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = tok < q_len
    used = (context + tok) // split_size + 1  # splits holding keys 0..q_pos
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_size
    ws_row0 = ((q_start + tok).to(tl.int64) * num_q_heads + head) * num_splits
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        ok = row_ok & (s < used)
        m = tl.maximum(m, tl.load(ws_ml_ptr + 2 * (ws_row0 + s), mask=ok, other=float("-inf")))
    m = tl.where(row_ok, m, 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, num_splits):
        ok = row_ok & (s < used)
        m_s = tl.load(ws_ml_ptr + 2 * (ws_row0 + s), mask=ok, other=float("-inf"))
        w = tl.where(ok, tl.exp2(m_s - m), 0.0)
        total += w * tl.load(ws_ml_ptr + 2 * (ws_row0 + s) + 1, mask=ok, other=0.0)
        part = tl.load(ws_acc_ptr + (ws_row0 + s)[:, None] * head_size + d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * part
    acc = acc / tl.where(row_ok, total, 1.0)[:, None]
    o_row = out_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(o_row + d[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
