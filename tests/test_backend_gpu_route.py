"""The backend's GPU branch (`_gpu`) on this CPU: the metadata the builder makes, routed to
the Triton kernel under TRITON_INTERPRET=1 on CPU tensors, over a mixed batch (decode,
a prefill chunk after a cached prefix, a whole prompt) at three scales, against the fp32
reference with the scales written out from the paper. Routing and argument shapes, not
speed (issue 15). The interpreter must be set before triton is imported, so the case runs
in a subprocess: this file is also its script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

L, HEAD, BLOCK = 256, 64, 32
SEQ_LENS, Q_LENS = [900, 300, 100], [1, 40, 100]  # s = 900/256, 300/256, 1


def run_case() -> dict:
    from yarn_vllm.yarn import yarn_math
    from yarn_vllm.attention.backend import (YarnDynamicAttentionImpl,
                                             YarnDynamicMetadataBuilder)
    from yarn_vllm.attention.reference import paged_attention_reference
    from yarn_vllm.yarn.config import YarnConfig
    from yarn_vllm.yarn.scale_policy import ScalePolicy

    g = torch.Generator().manual_seed(3)
    blocks = [(n + BLOCK - 1) // BLOCK for n in SEQ_LENS]
    kv = torch.randn(sum(blocks) + 3, 2, 2 * BLOCK, HEAD, generator=g)
    table = torch.zeros(len(SEQ_LENS), max(blocks), dtype=torch.int32)
    perm, used = torch.randperm(kv.shape[0], generator=g).to(torch.int32), 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n
    table[0, blocks[0]:] = 10 ** 6  # junk past the used blocks must never be read
    qsl = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(Q_LENS), 4, HEAD, generator=g)
    policy = ScalePolicy(YarnConfig(factor=4.0, original_max_position=L, mode="dynamic"),
                         HEAD, 10000.0)
    common = SimpleNamespace(num_reqs=3, num_actual_tokens=sum(Q_LENS), query_start_loc_cpu=qsl,
                             seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32),
                             block_table_tensor=table, slot_mapping=torch.arange(sum(Q_LENS)))
    meta = YarnDynamicMetadataBuilder.detached(policy).build(0, common)
    impl = YarnDynamicAttentionImpl(4, HEAD, HEAD ** -0.5, 2, None, None, "auto")
    out = torch.zeros_like(query)
    impl._gpu(meta, query, out, kv[:, :, :BLOCK], kv[:, :, BLOCK:], True, kernel="triton")
    scales = [max(1.0, n / L) for n in SEQ_LENS]
    inv = torch.stack([yarn_math.rope_inv_freq(HEAD, 10000.0) if s == 1.0
                       else yarn_math.yarn_inv_freq(HEAD, 10000.0, s, L) for s in scales])
    logit = torch.tensor([(0.1 * math.log(s) + 1.0) ** 2 * HEAD ** -0.5 for s in scales])
    table[0, blocks[0]:] = 0
    ref = paged_attention_reference(query, kv[:, :, :BLOCK], kv[:, :, BLOCK:], table,
                                    common.seq_lens, qsl, inv, logit, True)
    # the contrast: every sequence at s = 1 (as if the scales were lost on the way)
    flat = paged_attention_reference(query, kv[:, :, :BLOCK], kv[:, :, BLOCK:], table,
                                     common.seq_lens, qsl, inv[2:3].expand(3, -1).contiguous(),
                                     torch.full((3,), HEAD ** -0.5), True)
    return {"error": (out - ref).abs().max().item(), "contrast": (out - flat).abs().max().item(),
            "device_args": [list(t.shape) for t in meta.device_args]}


def test_gpu_branch_routes_a_mixed_batch_through_triton():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device_args"] == [[3], [4], [3, HEAD // 2], [3]]
    assert result["error"] < 1e-4
    assert result["contrast"] > 100 * result["error"] + 1e-3


if __name__ == "__main__":
    print(json.dumps(run_case()))
