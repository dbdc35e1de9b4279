"""Every vLLM name yarn-vllm relies on beyond vLLM's documented plugin API, checked once.

vLLM's internals change between releases, and a renamed method must not turn into wrong
outputs. `register()` (vllm_seam.plugin) calls `problems()` once per process before it
hooks anything. On a mismatch nothing is hooked: models without YaRN are left to vLLM
untouched (one warning says why), and a YaRN model is refused at start-up in one line
naming the missing name and the supported vLLM versions (`refusal`).

Each entry is a `module:attr.attr` path, why the project needs it, what would happen
without it, and (for callables) the parameters it must accept. Attributes that only
exist on instances at run time are listed in RUNTIME_ATTRIBUTES: they cannot be checked
before an engine exists, and the code that reads them does so without a default, so a
rename is an AttributeError at the first step, never a silently different result.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

from yarn_vllm.errors import UserError

# The vLLM releases this code was written and tested against (lowest allowed, first refused).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")


@dataclasses.dataclass(frozen=True)
class VllmName:
    path: str  # "module:attr.attr"
    why: str
    if_missing: str
    params: tuple[str, ...] = ()  # parameter names a callable must accept


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_V1 = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_V2 = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
_PLATFORM = "vllm.platforms.interface:Platform"
_NO_MODES = "request and dynamic mode could not run"

NAMES: tuple[VllmName, ...] = (
    VllmName(f"{_PLATFORM}.check_and_update_config", "validates every YaRN config and applies "
             "each mode's engine settings (engine_settings)", "YaRN settings go unchecked and "
             "the per-sequence modes unconfigured", ("vllm_config",)),
    VllmName(f"{_PLATFORM}.get_attn_backend_cls", "answers our pre-RoPE backend for "
             "AttentionBackendEnum.CUSTOM (dynamic mode)", "dynamic mode gets vLLM's backend, "
             "which reads keys without RoPE", ("selected_backend",)),
    VllmName("vllm.v1.attention.backends.registry:AttentionBackendEnum.CUSTOM", "the slot our "
             "dynamic backend registers in", "dynamic mode has no backend"),
    VllmName("vllm.v1.attention.backends.registry:register_backend", "registers that backend",
             "dynamic mode has no backend", ("backend",)),
    VllmName("vllm.model_executor.custom_op:CustomOp.register_oot", "hands out our rotary "
             "layer for rope_type 'yarn'", "vLLM's own YaRN layer serves every mode as static",
             ("name",)),
    VllmName("vllm.model_executor.custom_op:op_registry_oot", "tells whether another plugin "
             "owns the rotary op", "the rotary layer cannot be registered safely"),
    VllmName("vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope:"
             "YaRNScalingRotaryEmbedding", "the in-tree layer ours subclasses",
             "the rotary layer cannot be built"),
    VllmName("vllm.config:get_current_vllm_config", "the rotary layer reads the served "
             "model's YaRN settings", "the rotary layer cannot tell its mode"),
    VllmName("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "admission: a "
             "request's scale is fixed as it enters the engine (admission)", "request mode "
             "has no scale for its requests", ("request_id", "prompt", "params", "resumable")),
    VllmName("vllm.exceptions:VLLMValidationError", "a bad yarn_factor is the client's 400",
             "bad requests are answered 500 with an empty message"),
    VllmName("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest."
             "to_sampling_params", "tells an open-ended chat request (no max_tokens) from one "
             "vLLM filled in", "every chat request without max_tokens gets the largest scale",
             ("max_tokens",)),
    VllmName("vllm.entrypoints.launchers.api_server.entry:build_app", "adds the middleware "
             "that refuses a boolean yarn_factor", "`\"yarn_factor\": true` is served as s = 1"),
    VllmName(f"{_SCHED}.schedule", "escalation runs before each step; scales go out with it",
             _NO_MODES),
    VllmName(f"{_SCHED}.add_request", "each request's scale key is set as it arrives",
             _NO_MODES, ("request",)),
    VllmName(f"{_SCHED}._preempt_request", "escalation preempts and recomputes the way vLLM "
             "does", "no escalation", ("request", "timestamp", "drop_stale_output")),
    VllmName(f"{_SCHED}._free_request", "forgets a finished request's scale", "scales leak",
             ("request",)),
    VllmName("vllm.v1.core.sched.async_scheduler:AsyncScheduler", "the base of our scheduler "
             "under async scheduling (the GPU default)", _NO_MODES),
    VllmName("vllm.config.scheduler:SchedulerConfig.scheduler_cls", "names our scheduler",
             _NO_MODES),
    VllmName("vllm.v1.core.sched.output:SchedulerOutput", "carries each step's request scales "
             "to the model runners (a dataclass, pickled to workers)", _NO_MODES),
    VllmName("vllm.v1.core.kv_cache_utils:generate_block_hash_extra_keys", "the extra keys our "
             "scale-keyed block hasher adds the scale to", "blocks would be shared across "
             "scales", ("request", "start_token_idx", "end_token_idx", "start_mm_idx")),
    VllmName("vllm.v1.core.kv_cache_utils:hash_block_tokens", "hashes a block as vLLM does",
             "blocks would be shared across scales",
             ("hash_function", "parent_block_hash", "curr_block_token_ids", "extra_keys")),
    VllmName("vllm.utils.hashing:get_hash_fn_by_name", "the engine's block hash function",
             "blocks would be shared across scales", ("hash_fn_name",)),
    VllmName("vllm.v1.request:Request.update_block_hashes", "rebuilds a request's block "
             "hashes after a scale change", "an escalated request would hit its old KV"),
    VllmName(f"{_V1}._update_states", "the V1 runner's step: each scheduled request's scale",
             _NO_MODES, ("scheduler_output",)),
    VllmName(f"{_V1}._prepare_inputs", "the V1 runner's batch order", _NO_MODES,
             ("scheduler_output", "num_scheduled_tokens")),
    VllmName(f"{_V2}.add_requests", "the V2 runner's step: each scheduled request's scale",
             _NO_MODES, ("scheduler_output",)),
    VllmName(f"{_V2}.prepare_inputs", "the V2 runner's batch order", _NO_MODES,
             ("scheduler_output",)),
    VllmName("vllm.config.parallel:ParallelConfig.prefill_context_parallel_size", "refused in "
             "the per-sequence modes (it reorders a prefill's tokens)", "the refusal is lost"),
    VllmName("vllm.config.model:ModelConfig.use_mla", "MLA models are refused in the "
             "per-sequence modes", "the refusal is lost"),
    VllmName("vllm.config.vllm:VllmConfig.kv_transfer_config", "disaggregated prefill is "
             "refused in the per-sequence modes", "the refusal is lost"),
)

# Read on live objects only; each read has no default (see the module docstring).
RUNTIME_ATTRIBUTES = {
    "GPUModelRunner (V1).attn_groups": "dynamic mode's metadata builders",
    "GPUModelRunner (V1).input_batch.req_ids, .num_reqs, .num_prompt_tokens": "V1 batch order",
    "V2 InputBatch.req_ids, .num_scheduled_tokens, .prefill_len_np": "V2 batch order",
    "Request._block_hasher, .block_hashes, .num_output_placeholders": "scale keys, escalation",
    "Scheduler.running, .requests, .hash_block_size, .cache_config": "escalation, scale keys",
    "SchedulerOutput.num_scheduled_tokens": "which requests a step schedules",
    "ModelConfig.runner_type": "pooling models are refused in the per-sequence modes",
    "engine-core request id = '<caller's id>-<8 hex>'": "tools map escalations to outputs",
}


def resolve(path: str):
    """The object at `module:attr.attr`; raises AttributeError or ImportError naming it."""
    module_name, _, attrs = path.partition(":")
    obj = importlib.import_module(module_name)
    for attr in attrs.split("."):
        if attr in getattr(obj, "__dict__", {}) or hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif attr in getattr(obj, "__dataclass_fields__", {}) or attr in getattr(
                obj, "model_fields", {}):
            obj = None  # a config field without a class-level default
        else:
            raise AttributeError(f"{path}: no {attr!r}")
    return obj


def missing(entry: VllmName) -> str | None:
    """Why `entry` does not hold in the running vLLM, or None."""
    try:
        obj = resolve(entry.path)
    except (ImportError, AttributeError):
        return f"vLLM has no {entry.path}"
    if getattr(obj, "__isabstractmethod__", False):  # only an interface's declaration is left
        return f"vLLM has no {entry.path} (only an abstract declaration)"
    if entry.params:
        try:
            accepted = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return f"{entry.path} is not callable"
        absent = [p for p in entry.params if p not in accepted]
        if absent:
            return f"{entry.path} takes no {', '.join(absent)}"
    return None


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def _release(version: str) -> tuple[int, ...]:
    head = version.split("+")[0].split("-")[0]
    parts = []
    for part in head.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def problems() -> list[str]:
    """Everything the running vLLM lacks of what we rely on; empty when all holds."""
    found = []
    version = vllm_version()
    low, high = SUPPORTED_VLLM
    if not _release(low) <= _release(version) < _release(high):
        found.append(f"vLLM {version} is outside the supported range")
    found += [why for entry in NAMES if (why := missing(entry)) is not None]
    return found


def refusal(found: list[str]) -> UserError:
    """The one-line error a YaRN model is refused with."""
    low, high = SUPPORTED_VLLM
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return UserError("vllm", f"{found[0]}{more}; it supports vLLM >= {low}, < {high} (this is "
                     f"{vllm_version()})", "install a supported vLLM, or serve without the "
                     "plugin (VLLM_PLUGINS='') to use vLLM's own static YaRN",
                     source="yarn-vllm")
