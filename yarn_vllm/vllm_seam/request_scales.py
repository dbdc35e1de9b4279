"""Request mode in the model runner: each scheduled token's row of the rotary frequency table.

A request's scale is fixed at admission (yarn_vllm.vllm_seam.admission) and may grow by
escalation in the engine core's scheduler (yarn_vllm.vllm_seam.scheduler), which hands
every step's scales to the runners. Before every forward the runner
(yarn_vllm.vllm_seam.step) has `RequestScaleFeeder` write each scheduled token's row
into the rotary layers' persistent `scale_index` buffer; the rotary forward then only
indexes device memory: no host sync, the same buffers every step (CUDA-graph safe).
"""

from __future__ import annotations

import numpy as np
import torch

from yarn_vllm.yarn.scale_policy import ScalePolicy


class RequestScaleFeeder:
    """A model runner's request-mode state: which row of the rotary layers' frequency
    tables serves each scale.

    The listed scales own rows 0..n-1 for good; a request's own `yarn_factor` takes one of
    the spare rows (the layers size them to max_num_seqs, so a batch always fits),
    reusing the least recently used one not needed by the batch at hand.
    """

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.policy: ScalePolicy = layers[0].policy
        listed = self.policy.scales_on_offer()
        self.row_of: dict[float, int] = {s: i for i, s in enumerate(listed)}
        self.spare = list(range(len(listed), layers[0].inv_freq.shape[0]))  # LRU first

    def write(self, step) -> None:
        """Fill scale_index for a step (a StepBatch): request i's row, once per token it runs."""
        try:
            factors = [step.scales[r] for r in step.req_ids]
        except KeyError as e:
            raise RuntimeError(f"yarn_vllm: request {e.args[0]} is in the model runner's batch "
                               "without a scale from yarn-vllm's scheduler") from None
        needed = set(factors)
        rows = np.array([self._row(s, needed) for s in factors], dtype=np.int32)
        index = torch.from_numpy(np.repeat(rows, step.num_scheduled_tokens))
        for layer in self.layers:
            layer.scale_index[: index.shape[0]].copy_(index, non_blocking=True)

    def _row(self, s: float, needed: set[float]) -> int:
        row = self.row_of.get(s)
        if row is not None:
            if row in self.spare:  # most recently used last
                self.spare.remove(row)
                self.spare.append(row)
            return row
        row = next(r for r in self.spare if self._scale_at(r) not in needed)
        old = self._scale_at(row)
        if old is not None:
            del self.row_of[old]
        self.row_of[s] = row
        self.spare.remove(row)
        self.spare.append(row)
        inv_freq, mscale = self.policy.inv_freq(s), self.policy.mscale(s)
        for layer in self.layers:  # stream-ordered after any forward still reading the row
            layer.inv_freq[row].copy_(inv_freq, non_blocking=True)
            layer.mscales[row] = mscale
        return row

    def _scale_at(self, row: int) -> float | None:
        return next((s for s, r in self.row_of.items() if r == row), None)
