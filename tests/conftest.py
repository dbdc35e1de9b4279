"""Shared fixtures. Engines are expensive (~30 s to start), so they are session-scoped."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch


# Tolerances against the fp32 reference, stated once per dtype: the kernels
# compute in fp32 and round once, so the error is half an ulp of the result
# (bf16 keeps 8 significant bits, fp16 11) plus fp32 noise (atol).
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.float16: {"rtol": 2.0 ** -11, "atol": 1e-5},
       torch.bfloat16: {"rtol": 2.0 ** -8, "atol": 1e-5}}


def run_engines(jobs: dict[str, dict], **common) -> dict[str, dict]:
    """{name: run_engine(**common, **kwargs)} for each named job, two at a time: most of an
    engine's start is single-threaded imports, so two starts overlap well on two cores."""
    from concurrent.futures import ThreadPoolExecutor

    from yarn_vllm.tools.engine_worker import run_engine

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_engine, **common, **kwargs) for name, kwargs in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama trained-length 1024 (see yarn_vllm.tools.testing.tiny_model)."""
    from yarn_vllm.tools.testing.tiny_model import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@contextlib.contextmanager
def native_vllm_ops():
    """Instantiate vLLM's own in-tree layers even while our plugin is registered."""
    from vllm.model_executor.custom_op import op_registry_oot

    saved = dict(op_registry_oot)
    op_registry_oot.clear()
    try:
        yield
    finally:
        op_registry_oot.update(saved)


@pytest.fixture(scope="session")
def vllm_config_ctx():
    """A default VllmConfig made current, which vLLM's CustomOp layers need to be built."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.fixture(scope="session")
def smol_model():
    """The real default model (SmolLM2-135M-Instruct), converted once into the user cache."""
    from yarn_vllm.tools.models import prepare_default_model

    return prepare_default_model()
