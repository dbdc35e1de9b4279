"""The YaRN maths and settings: pure, with no vLLM import.

  yarn_math     the paper's equations (fp32 functions of s, L, beta)
  config        YarnConfig, the one reader of YaRN settings
  hf_config     what a model's HF config says about its RoPE
  scale_policy  which scale s serves a sequence in each mode, and what s means
"""
