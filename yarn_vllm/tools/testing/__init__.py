"""Helpers for tests and examples, not used by the plugin or the CLI: a tiny random Llama
(`tiny_model`) and a `yarn-vllm serve` process on loopback (`server_process`)."""
