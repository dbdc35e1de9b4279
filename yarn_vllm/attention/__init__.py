"""Pre-RoPE paged attention for Dynamic YaRN.

Keys sit in the paged KV cache *before* RoPE; attention rotates queries and
keys with the YaRN frequencies of each sequence's current scale
s = max(1, len / original_max_position) and multiplies the logits by
mscale(s)**2. `reference.py` is the fp32 definition every kernel is tested
against.
"""
