"""vLLM 0.32's CUDA build with yarn-vllm's plugin, on a machine without a GPU.

The `vllm` part of cuda_interface_check.py: entry point, get_rope, CudaPlatform's backend
selection for AttentionBackendEnum.CUSTOM, the config hook on a dynamic model, and the
backend's interface to the GPU model runner (KV-cache layout and views, block size,
builder, CUDA graphs, impl). vLLM detects no platform here (no NVML), so `run` installs
vLLM's real CudaPlatform class as the current platform before anything reads it, with
only its device query answering a chosen compute capability.
"""

from __future__ import annotations

import json
from pathlib import Path

from cuda_check_report import check

ROTARY_OP_NAME = "YaRNScalingRotaryEmbedding"  # vLLM's CustomOp name for its YaRN layer
BACKEND_PATH = "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"


def install_cuda_platform(capability: str):
    """Make vLLM's CudaPlatform the current platform, as platform detection does on a GPU.

    The class is vLLM's own; only its device query answers `capability` (say "9.0"), since
    vLLM modules ask for it at import time (vllm/kernels/oink_ops.py) and no device answers.
    """
    import vllm.platforms as platforms
    from vllm.platforms.interface import DeviceCapability

    detected = platforms.resolve_current_platform_cls_qualname()
    from vllm.platforms.cuda import CudaPlatform

    assert platforms._current_platform is None, "current_platform was read before the swap"
    major, minor = (int(x) for x in capability.split("."))
    CudaPlatform.get_device_capability = classmethod(
        lambda cls, device_id=0: DeviceCapability(major, minor))
    platforms._current_platform = CudaPlatform()
    print(f"platform: vLLM detects {detected} here; using {CudaPlatform.__qualname__} "
          f"({', '.join(c.__name__ for c in CudaPlatform.__mro__[:-1])}) as sm_{major}{minor}")
    return CudaPlatform


TINY_DYNAMIC_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                        "original_max_position_embeddings": 2048, "yarn_mode": "dynamic"}}


def run(tree: Path, capability: str) -> None:
    platform_cls = install_cuda_platform(capability)
    import tempfile

    import torch
    import vllm.plugins
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    check("current_platform is CUDA", current_platform.is_cuda() and
          current_platform.device_type == "cuda", type(current_platform).__name__)
    _check_imports()
    from yarn_vllm.ops import extension_supports
    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    tmp = tempfile.TemporaryDirectory(prefix="yarn_vllm_cuda_check_")  # removed at exit
    models = Path(tmp.name)
    for name, rope in (("plain", {"rope_type": "default", "rope_theta": 1e4}),
                       ("dynamic", TINY_DYNAMIC_LLAMA["rope_parameters"]),
                       ("request", dict(TINY_DYNAMIC_LLAMA["rope_parameters"],
                                        yarn_mode="request"))):
        (models / name).mkdir()
        (models / name / "config.json").write_text(
            json.dumps(dict(TINY_DYNAMIC_LLAMA, rope_parameters=rope)))
    native = _vllm_choices(torch, platform_cls, models / "plain")
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()  # finds yarn_vllm through the tree's egg-info
    check("with the plugin, vLLM chooses as before for a model without YaRN",
          _vllm_choices(torch, platform_cls, models / "plain") == native, str(native))
    has_cuda_kernel = extension_supports(torch.device("cuda"))
    ours = op_registry_oot.get(ROTARY_OP_NAME) is YarnRotaryEmbedding
    # plugin.py: our layer serves when the extension has a kernel for the platform's device,
    # and vLLM's own YaRN layer otherwise.
    check("entry point registered the rotary layer as plugin.py documents",
          ours == has_cuda_kernel, f"CUDA rotary kernel: {has_cuda_kernel}; path: "
          f"{'YarnRotaryEmbedding' if ours else 'vLLM YaRNScalingRotaryEmbedding'}")
    check("entry point wrapped CudaPlatform's hooks",
          getattr(platform_cls.check_and_update_config, "_yarn_vllm", False))
    path = AttentionBackendEnum.CUSTOM.get_path() if (
        AttentionBackendEnum.CUSTOM.is_overridden()) else None
    check("entry point registered AttentionBackendEnum.CUSTOM", path == BACKEND_PATH, str(path))

    with set_current_vllm_config(VllmConfig()):
        _check_get_rope(torch, YarnRotaryEmbedding if ours else None, "static")
        backend = _check_selection(torch, platform_cls)
    if ours:
        _check_request_mode(torch, models / "request", native)
    vllm_config = _check_dynamic_config(str(models / "dynamic"), ours)
    if vllm_config is None:
        return
    with set_current_vllm_config(vllm_config):
        _check_get_rope(torch, YarnRotaryEmbedding, "dynamic")
        _check_runner_interface(torch, backend, vllm_config)


def _vllm_choices(torch, platform_cls, model: Path) -> dict:
    """What vLLM decides for `model` on this platform: the backend it selects when none is
    asked for, and the engine settings the platform's config hook leaves."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.selector import AttentionSelectorConfig

    cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                  block_size=None)
    with set_current_vllm_config(VllmConfig()):
        backend = platform_cls.get_attn_backend_cls(None, attn_selector_config=cfg)
    config = EngineArgs(model=str(model), skip_tokenizer_init=True).create_engine_config()
    return {"backend": backend.rsplit(".", 1)[-1],
            "attention_config.backend": str(config.attention_config.backend),
            "chunked_prefill": config.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "prefix_caching": config.cache_config.enable_prefix_caching,
            "cudagraph_mode": str(config.compilation_config.cudagraph_mode)}


def _check_imports() -> None:
    """Import every yarn_vllm module: vLLM's CUDA build may differ from the CPU one here."""
    import importlib
    import pkgutil

    import yarn_vllm

    failed = {}
    for mod in pkgutil.walk_packages(yarn_vllm.__path__, "yarn_vllm."):
        if mod.name.endswith(".__main__"):  # running it is what importing it does
            continue
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as e:  # optional extras (eval, ray) are not in the side env
            if e.name and e.name.split(".")[0] in ("vllm", "torch", "yarn_vllm"):
                failed[mod.name] = f"{type(e).__name__}: {e}"
            else:
                print(f"  skip {mod.name}: optional dependency {e.name} not installed")
        except Exception as e:  # noqa: BLE001
            failed[mod.name] = f"{type(e).__name__}: {e}"
    check("every yarn_vllm module imports under vLLM's CUDA build", not failed,
          json.dumps(failed))


def _check_get_rope(torch, ours_cls, mode: str) -> None:
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
        YaRNScalingRotaryEmbedding)

    _ROPE_DICT.clear()
    params = dict(TINY_DYNAMIC_LLAMA["rope_parameters"], yarn_mode=mode)
    rope = get_rope(64, 8192, True, params, torch.bfloat16)
    _ROPE_DICT.clear()
    expected = ours_cls or YaRNScalingRotaryEmbedding
    check(f"get_rope ({mode}) hands out the class plugin.py promises", type(rope) is expected,
          f"{type(rope).__module__}.{type(rope).__qualname__}, CustomOp enabled: "
          f"{rope.enabled()} (forward_cuda when enabled, else forward_native)")


def _check_selection(torch, platform_cls):
    from vllm.config import get_current_vllm_config
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig, get_attn_backend

    cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                  block_size=None)
    path = platform_cls.get_attn_backend_cls(AttentionBackendEnum.CUSTOM,
                                             attn_selector_config=cfg)
    check("CudaPlatform.get_attn_backend_cls(CUSTOM) answers our backend",
          path == BACKEND_PATH, path)
    get_current_vllm_config().attention_config.backend = AttentionBackendEnum.CUSTOM
    backend = get_attn_backend(128, torch.bfloat16, "auto")
    check("vLLM's selector resolves CUSTOM to our class",
          f"{backend.__module__}.{backend.__qualname__}" == BACKEND_PATH, backend.__qualname__)
    check("backend name maps back to CUSTOM (as the Attention layer does)",
          AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM)
    # What CudaPlatform would ask of a selected backend without the plugin's short cut.
    for cap in (DeviceCapability(8, 0), DeviceCapability(9, 0)):
        reasons = backend.validate_configuration(device_capability=cap, **cfg._asdict())
        check(f"validate_configuration on sm_{cap.major}{cap.minor}, bf16, head 128",
              not reasons, "; ".join(reasons))
    return backend


def _check_request_mode(torch, model: Path, native: dict) -> None:
    """Request mode leaves vLLM's engine choices as they are for a plain model (its attention
    backend, chunked prefill, prefix caching, CUDA graphs), and its rotary layer hooks both
    GPU model runners: V1, and V2 (vLLM 0.32's default on GPUs with Triton)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    config = EngineArgs(model=str(model), skip_tokenizer_init=True).create_engine_config()
    chosen = {"attention_config.backend": str(config.attention_config.backend),
              "chunked_prefill": config.scheduler_config.enable_chunked_prefill,
              "prefix_caching": config.cache_config.enable_prefix_caching,
              "cudagraph_mode": str(config.compilation_config.cudagraph_mode)}
    check("request mode on CUDA: vLLM's own choices (backend, chunked prefill, APC, graphs)",
          all(native[k] == v for k, v in chosen.items()), str(chosen))
    with set_current_vllm_config(config):
        layer = YarnRotaryEmbedding(64, 64, 2048, 1e4, True, 4.0, torch.bfloat16)
    check("request-mode rotary layer: rows per scale, a token index sized to the budget",
          layer.yarn_mode == "request" and tuple(layer.inv_freq.shape[1:]) == (32,)
          and layer.scale_index.shape[0] == config.scheduler_config.max_num_batched_tokens,
          f"inv_freq {tuple(layer.inv_freq.shape)}, scale_index {tuple(layer.scale_index.shape)}")
    hooked = {f"{cls.__module__}.{name}": getattr(getattr(cls, name), "_yarn_vllm", False)
              for cls, names in ((V1Runner, ("_update_states", "_prepare_inputs")),
                                 (V2Runner, ("add_requests", "prepare_inputs")))
              for name in names}
    check("request mode hooks both GPU model runners (V1 and V2)", all(hooked.values()),
          str(hooked))


def _check_dynamic_config(model: str, ours: bool):
    """EngineArgs -> VllmConfig runs CudaPlatform.check_and_update_config, which the plugin wraps."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    args = EngineArgs(model=model, skip_tokenizer_init=True, max_model_len=8192)
    if not ours:  # plugin.py: dynamic mode needs our rotary layer, and says so
        try:
            args.create_engine_config()
        except Exception as e:  # noqa: BLE001
            check("dynamic mode without the CUDA kernel is refused", "yarn_mode" in str(e),
                  f"{type(e).__name__}: {e}")
        else:
            check("dynamic mode without the CUDA kernel is refused", False, "it was accepted")
        return None
    config = args.create_engine_config()
    sched, cache = config.scheduler_config, config.cache_config
    check("dynamic model on CUDA: config hook selects CUSTOM, keeps chunked prefill and APC",
          config.attention_config.backend is AttentionBackendEnum.CUSTOM
          and sched.enable_chunked_prefill and cache.enable_prefix_caching,
          f"backend {config.attention_config.backend}, chunked prefill "
          f"{sched.enable_chunked_prefill}, max_num_batched_tokens "
          f"{sched.max_num_batched_tokens}, prefix caching {cache.enable_prefix_caching}, "
          f"worker {config.parallel_config.worker_cls}")
    return config


def _check_runner_interface(torch, backend, vllm_config) -> None:
    """What vllm/v1/worker/gpu_model_runner.py (and kv_cache_interface.py) ask of the backend."""
    import copy

    from vllm.config import CacheConfig
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor,
                                            create_kv_cache_views)
    from vllm.v1.worker.utils import customize_attention_spec, select_common_block_size

    from yarn_vllm.attention.backend import gather_tokens, split_kv_cache

    block_size = current_platform._preferred_block_size_for_backends(
        [backend], CacheConfig.DEFAULT_BLOCK_SIZE, vllm_config)
    kernel_block = select_common_block_size(block_size, [backend])
    check("block size", block_size % kernel_block == 0,
          f"manager {block_size} (vLLM default {CacheConfig.DEFAULT_BLOCK_SIZE}), kernel "
          f"{kernel_block}, backend declares {backend.get_supported_kernel_block_sizes()}")
    layouts = get_supported_kv_cache_layouts([backend])
    # split_kv_cache reads [num_blocks, H, block_size, 2 * D] with each (block, head) contiguous.
    check("KV-cache layout is head-major with contiguous blocks",
          layouts[0].is_block_contiguous and layouts[0].is_layer_compact,
          f"{[m.name for m in layouts]}")

    heads, head_size, num_blocks, dtype = 2, 64, 5, torch.bfloat16
    spec = customize_attention_spec(backend, FullAttentionSpec(
        block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=dtype))
    page = spec.page_size_bytes
    raw = torch.zeros(page * num_blocks, dtype=torch.int8)
    tensor = KVCacheTensor(size=raw.numel(), layers=["layer.0"], layer_stride=page * num_blocks,
                           block_stride=page)
    (kv_cache,) = create_kv_cache_views(raw, spec, num_blocks, layouts[0], tensor, kernel_block)
    check("vLLM's per-layer KV view", tuple(kv_cache.shape) == (
        num_blocks * block_size // kernel_block, heads, kernel_block, 2 * head_size),
        f"{tuple(kv_cache.shape)} {kv_cache.dtype} strides {kv_cache.stride()}")

    # The Attention layer's positional arguments (vllm/model_executor/layers/attention).
    impl = backend.get_impl_cls()(4, head_size, head_size ** -0.5, heads, None, None, "auto",
                                  None, "decoder", None)
    tokens = 2 * kernel_block + 3
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(tokens, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(tokens, heads, head_size, generator=gen).to(dtype)
    blocks = torch.tensor([3, 0, 4], dtype=torch.int32)
    slots = (blocks.long()[torch.arange(tokens) // kernel_block] * kernel_block
             + torch.arange(tokens) % kernel_block)
    impl.do_kv_cache_update(None, key, value, kv_cache, slots)
    key_cache, value_cache = split_kv_cache(kv_cache)
    check("do_kv_cache_update + split_kv_cache round-trip through vLLM's KV view",
          torch.equal(gather_tokens(key_cache, blocks, tokens), key)
          and torch.equal(gather_tokens(value_cache, blocks, tokens), value))
    check("forward leaves the cache write to do_kv_cache_update (unified_kv_cache_update)",
          backend.forward_includes_kv_cache_update is False)

    builder_cls = backend.get_builder_cls()
    support = builder_cls.get_cudagraph_support(vllm_config, spec)
    compilation = copy.deepcopy(vllm_config.compilation_config)
    requested = compilation.cudagraph_mode
    mode = compilation.resolve_cudagraph_mode_and_sizes(support, backend.__name__, 1,
                                                        max_num_reqs=8)
    builder = builder_cls(spec, ["layer.0"], vllm_config, torch.device("cpu"))
    check("metadata builder and CUDA graphs", not mode.has_full_cudagraphs(),
          f"{builder_cls.__qualname__}: support {support.name}; vLLM resolves cudagraph_mode "
          f"{requested.name} to {mode.name}; reorder_batch_threshold "
          f"{builder.reorder_batch_threshold}")
    _check_builder_device_branch(torch, builder, blocks)


def _check_builder_device_branch(torch, builder, blocks) -> None:
    """The builder's non-CPU branch, with the block table on the meta device standing in for
    a GPU's: it hands the kernels (seq_lens, query_start_loc, inv_freq, attention_scale)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, 1, 41], dtype=torch.int32)  # a decode, then a 40-token chunk
    seq_lens = torch.tensor([3000, 9000], dtype=torch.int32)
    table = torch.stack([blocks, blocks]).to("meta")
    m = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=2,
        num_actual_tokens=41, max_query_len=40, max_seq_len=9000, block_table_tensor=table,
        slot_mapping=torch.zeros(41, dtype=torch.int64))
    meta = builder.build(0, m)
    args = meta.device_args or ()
    shapes = [(tuple(t.shape), str(t.dtype).removeprefix("torch."), t.device.type) for t in args]
    check("builder's GPU branch hands the kernels per-sequence tensors",
          len(args) == 4 and all(t.device.type == "meta" for t in args)
          and tuple(args[0].shape) == (2,) and tuple(args[1].shape) == (3,)
          and args[2].shape[0] == 2 and tuple(args[3].shape) == (2,), str(shapes))
