"""Throughput benchmarks: offline (prefill/decode/end-to-end per RoPE method), online (TTFT/TPOT
against a server) and Ray sweeps over a grid of engine configurations."""
