"""The seam to vLLM: everything that touches vLLM's internals, and what runs inside vLLM.

  vllm_names       every private vLLM name, method and signature the project relies on,
                   and the supported vLLM versions; checked once by register()
  plugin           register(): the `vllm.general_plugins` entry
  patching         the one way a vLLM method is hooked
  engine_settings  what each YaRN mode changes in vLLM's engine configuration
  admission        a request's scale, fixed as it enters the engine
  scheduler        request mode's escalation: a request that outgrows its scale is recomputed
  step             the one per-step description the model runners hand us
  request_scales   request mode in the model runner: each token's rotary row
  rotary           the rotary layer vLLM's factory hands out for rope_type "yarn"
  introspect       questions asked of a loaded model (for tools and tests)
  logs             our log lines in vLLM's log
"""
