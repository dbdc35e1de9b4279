"""The tools around the library: CLI, evaluation, benchmarks, the main job, replicas.

The library (yarn, vllm_seam, attention, ops) never imports from here.
"""
