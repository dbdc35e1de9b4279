"""vLLM attention backend for Dynamic YaRN: keys cached before RoPE, rotated per sequence.

In dynamic mode our rotary layer passes q and k through unrotated, so the
paged KV cache holds pre-RoPE keys. Each engine step, the metadata builder
takes every sequence's scale from the model's ScalePolicy (read from the
vllm_config it is given): s(P) for a sequence still in its prompt's prefill,
whether in one step or in chunks (the runner hands it the prompt lengths), and
s(l) = max(1, l / L) once it decodes; then it builds the YaRN frequencies,
attention scale mscale(s)^2 and angle table once for all layers. RoPE is
NeoX-style (the rotary layer refuses the rest). Attention then rotates queries and cached
keys with those angles:

  * on the CPU, every batch in one call of the C++ op per layer, straight on vLLM's
    combined KV tensor (two views) into the flat output: keys rotated as they are
    loaded, decode split along the keys, prefill tiled along the queries (vectorised
    over query rows, with bf16 dot products where the CPU has AVX512-BF16); no
    gathered or re-rotated prefix, no repeated K/V for GQA.

On a GPU, all-decode batches go to the CUDA kernel (csrc/paged_attention_cuda*)
and every other batch to the Triton kernel (triton_paged.py), through the one
wrapper attention.paged.paged_attention. The routing runs on this CPU with
Triton's interpreter (tests); no GPU has run it inside an engine yet.

The cache layout is vLLM's CPU one ([num_blocks, H_kv, block_size, 2 * D] with
the K and V halves of each (block, head)); only our code reads or writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from yarn_vllm.attention.angles import AngleTables
from yarn_vllm.attention.paged import cpu_op, paged_attention
from yarn_vllm.errors import UserError
from yarn_vllm.yarn.scale_policy import ScalePolicy

IS_NEOX = True  # dynamic mode's rotary layer refuses GPT-J-style RoPE


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, H_kv, block_size, 2 * D] -> key and value views [num_blocks, H_kv, block_size, D]."""
    num_blocks, heads, block_size, two_d = kv_cache.shape
    # unbind: both views in one op (it runs every layer; indexing costs twice as much)
    return kv_cache.view(num_blocks, heads, 2, block_size, two_d // 2).unbind(2)


def gather_tokens(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's rows of a [num_blocks, H, block_size, D] cache: [seq_len, H, D] (checks
    of the cache's contents; attention never gathers)."""
    block_size = cache.shape[2]
    used = blocks[: (seq_len + block_size - 1) // block_size].long()
    return cache[used].transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


class YarnDynamicAttentionBackend(CPUAttentionBackend):
    """Registered as AttentionBackendEnum.CUSTOM; chosen when rope_parameters say yarn_mode dynamic."""

    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type["YarnDynamicAttentionImpl"]:
        return YarnDynamicAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["YarnDynamicMetadataBuilder"]:
        return YarnDynamicMetadataBuilder


@dataclass
class YarnDynamicMetadata:
    """One step's batch. B sequences, T tokens.

    On the host: query_start_loc [B + 1] and seq_lens [B] int32; inv_freq
    [B, rotary_dim / 2] and attention_scale [B] fp32 (mscale(s)^2); angles /
    angle_start, the CPU kernel's angle table (attention.angles.angle_table; None on a
    GPU). block_table [B, max_blocks] int32 and device_args (seq_lens,
    query_start_loc, inv_freq, attention_scale) are on the KV cache's device.
    logit_scale [B] fp32 is attention_scale x softmax_scale, where the builder knows the
    layers' softmax scale (else None). cpu_op is the compiled CPU op on a CPU batch (it
    serves every query), else None.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens: list[int]
    seq_lens_list: list[int]
    inv_freq: torch.Tensor
    attention_scale: torch.Tensor
    angles: torch.Tensor
    angle_start: torch.Tensor
    device_args: tuple
    softmax_scale: float | None = None
    logit_scale: torch.Tensor | None = None
    cpu_op: object = None


class YarnDynamicMetadataBuilder(AttentionMetadataBuilder[YarnDynamicMetadata]):
    # The build reads sequence lengths on the host (each sequence's scale and, on the CPU,
    # its angle table), so the attention cannot be captured in a CUDA graph; vLLM then
    # runs dynamic mode with piecewise graphs around it. Request mode keeps full graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        policy = ScalePolicy.from_vllm_config(vllm_config)
        if policy is None or policy.mode != "dynamic":
            raise RuntimeError("yarn_vllm: the dynamic attention backend was selected for a "
                               "model whose rope_parameters do not say yarn_mode 'dynamic'. "
                               "Fix: drop --attention-backend CUSTOM, or set yarn_mode "
                               "'dynamic' with rope_type 'yarn'")
        self._start(policy, _shared_softmax_scale(vllm_config, layer_names))

    @classmethod
    def detached(cls, policy: ScalePolicy, softmax_scale: float | None = None
                 ) -> "YarnDynamicMetadataBuilder":
        """A builder for `policy` without an engine's vllm_config (tests, benchmarks)."""
        builder = cls.__new__(cls)
        builder._start(policy, softmax_scale)
        return builder

    def _start(self, policy: ScalePolicy, softmax_scale: float | None) -> None:
        self.policy = policy
        # The coming step (a vllm_seam.step.StepBatch: each request's prompt length in batch
        # order), handed over by the model runner before every build: a prefill chunk runs
        # at s(P). None in runs without a step (vLLM's dummy and profiling runs).
        self.step = None
        self.angle_tables = AngleTables()  # kept across steps
        self.softmax_scale = softmax_scale  # the layers' shared one, or None

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> YarnDynamicMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        qsl = _leading_int32(m.query_start_loc_cpu, num_reqs + 1)
        seq_lens = _leading_int32(m.seq_lens, num_reqs)
        if seq_lens.device.type != "cpu":
            seq_lens = seq_lens.cpu()
        seq_list = seq_lens.tolist()
        starts = qsl.tolist()
        query_lens = [end - start for start, end in zip(starts, starts[1:])]
        step, self.step = self.step, None  # this step's, used once
        prompt_lens = None if step is None else step.prompt_lens
        if prompt_lens is not None and len(prompt_lens) != num_reqs:
            raise RuntimeError(f"yarn_vllm: the step's batch holds {len(prompt_lens)} requests, "
                               f"the attention metadata {num_reqs}; vLLM's runner changed how "
                               "it builds a step (yarn_vllm.vllm_seam.vllm_names)")
        inv_freq, attention_scale = self.policy.per_sequence(seq_list, prompt_lens)
        device = m.block_table_tensor.device
        on_cpu = device.type == "cpu"
        # the GPU kernels form angles themselves; the CPU kernel reads a table built once here
        angles, start = self.angle_tables(seq_list, inv_freq) if on_cpu else (None, None)
        device_args = (seq_lens, qsl, inv_freq, attention_scale)
        if not on_cpu:
            device_args = tuple(t.to(device, non_blocking=True) for t in device_args)
        softmax_scale = self.softmax_scale
        return YarnDynamicMetadata(
            num_actual_tokens=m.num_actual_tokens, query_start_loc=qsl, seq_lens=seq_lens,
            block_table=_leading_int32(m.block_table_tensor, num_reqs),
            slot_mapping=m.slot_mapping, query_lens=query_lens, seq_lens_list=seq_list,
            inv_freq=inv_freq, attention_scale=attention_scale, angles=angles, angle_start=start,
            device_args=device_args, softmax_scale=softmax_scale,
            logit_scale=None if softmax_scale is None else attention_scale * softmax_scale,
            cpu_op=cpu_op() if on_cpu else None)


def _leading_int32(t: torch.Tensor, n: int) -> torch.Tensor:
    """t[:n] as int32, with no torch call where the slice or the cast would change nothing:
    the build runs between layers that stream the KV cache through L2, and each call there
    costs tens of microseconds."""
    if t.shape[0] != n:
        t = t[:n]
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _shared_softmax_scale(vllm_config, layer_names) -> float | None:
    """The softmax scale of the builder's attention layers if they share one, else None
    (the per-layer parameter vLLM's own builders read for their plans)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    scales = {getattr(getattr(layer, "impl", None), "scale", None) for layer in layers.values()}
    return float(scales.pop()) if len(scales) == 1 and None not in scales else None


def _refuse(field: str, value) -> None:
    shown = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
             else repr(value))
    raise UserError(field, f"is {shown}, which the dynamic attention backend does not support",
                    "serve this model with yarn_mode 'static' (rope_parameters.yarn_mode, via "
                    "config.json or --hf-overrides)", source="yarn_vllm dynamic attention")


class YarnDynamicAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **_) -> None:
        for field, value, ok in (("alibi_slopes", alibi_slopes, alibi_slopes is None),
                                 ("sliding_window", sliding_window, sliding_window is None),
                                 ("logits_soft_cap", logits_soft_cap, not logits_soft_cap),
                                 ("kv_cache_dtype", kv_cache_dtype, kv_cache_dtype == "auto"),
                                 ("attn_type", attn_type, attn_type == AttentionType.DECODER),
                                 ("sinks", sinks, sinks is None)):
            if not ok:
                _refuse(field, value)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key, value: [T, H_kv, D] before RoPE; slot_mapping: [T'] (-1 pads).

        It runs every layer of every step: on the CPU one call of the C++ op (no Python per
        token, no host sync), as vLLM's CPU_ATTN writes its cache.
        """
        if kv_cache.device.type == "cpu":
            torch.ops.yarn_vllm.kv_cache_write(key.to(kv_cache.dtype), value.to(kv_cache.dtype),
                                               kv_cache, slot_mapping)
            return
        num_tokens, heads, head_size = key.shape
        num_blocks, _, block_size, _ = kv_cache.shape
        cache = kv_cache.view(num_blocks, heads, 2, block_size, head_size)  # K | V per head
        slots = slot_mapping[:num_tokens].long()
        key, value = key[: slots.shape[0]], value[: slots.shape[0]]
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        blocks, rows = slots // block_size, slots % block_size
        cache[blocks, :, 0, rows] = key.to(cache.dtype)
        cache[blocks, :, 1, rows] = value.to(cache.dtype)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: YarnDynamicMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query: [T, H_q, D] before RoPE; output: [T, H_q * D] or [T, H_q, D]."""
        if output_scale is not None or output_block_scale is not None:
            _refuse("output_scale" if output_scale is not None else "output_block_scale",
                    output_scale if output_scale is not None else output_block_scale)
        if attn_metadata is None:  # profiling run
            return output
        meta = attn_metadata
        key_cache, value_cache = split_kv_cache(kv_cache)
        if meta.cpu_op is not None:  # a CPU batch: one call, prefill and decode alike
            # padded rows past the batch's tokens are neither read nor written
            q = query if query.dim() == 3 else query.view(-1, self.num_heads, self.head_size)
            out = output if output.dim() == 3 else output.view(-1, self.num_heads, self.head_size)
            meta.cpu_op(out, q, key_cache, value_cache, meta.block_table, meta.seq_lens,
                        meta.query_start_loc, meta.inv_freq, self._logit_scale(meta),
                        meta.angles, meta.angle_start, IS_NEOX)
            return output
        n = meta.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        self._gpu(meta, q, out, key_cache, value_cache, IS_NEOX)
        return output

    def _logit_scale(self, meta: YarnDynamicMetadata) -> torch.Tensor:
        """[B] fp32 on the host: the step's, when the builder formed it for this scale."""
        if meta.softmax_scale == self.scale:
            return meta.logit_scale
        return meta.attention_scale * self.scale

    def _gpu(self, meta: YarnDynamicMetadata, q, out, key_cache, value_cache,
             is_neox: bool, kernel: str = "auto") -> None:
        """The whole batch in one call: the CUDA decode op for all-decode batches, else Triton
        (attention.paged.choose_kernel; `kernel="triton"` forces it, e.g. on CPU tensors)."""
        seq_lens, qsl, inv_freq, attention_scale = meta.device_args
        paged_attention(out, q, key_cache, value_cache, meta.block_table, seq_lens, qsl, inv_freq,
                        attention_scale * self.scale, is_neox,
                        max_query_len=max(meta.query_lens), kernel=kernel)
