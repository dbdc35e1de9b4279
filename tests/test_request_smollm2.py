"""Request mode on the real default model, SmolLM2-135M (trained to 8,192 tokens), slow tier.

One request-mode engine (factor 2, scales 1 and 2) serves a short and a long prompt in one
batch; vLLM with our plugin off is the reference for each: the model as trained for the
short one (s = 1), vLLM's own static YaRN at s = 2 for the long one. fp32 throughout.
"""

from __future__ import annotations

import pytest

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_engine

pytestmark = pytest.mark.slow  # three SmolLM2 engines and two 9k-token prefills on a CPU

NEW, LOGPROB_TOL = 16, 1e-3  # 30 fp32 layers; a wrong scale moves logprobs by > 0.1


@pytest.fixture(scope="module")
def runs(smol_model):
    from transformers import AutoConfig, AutoTokenizer

    from yarn_vllm.tools.eval.run import default_text

    hf = AutoConfig.from_pretrained(smol_model).to_dict()
    ids = AutoTokenizer.from_pretrained(smol_model).encode(default_text(),
                                                           add_special_tokens=False)
    short, long_ = ids[:500], ids[1000:10000]  # 516 and 9,016 positions: s = 1 and s = 2
    base = {"dtype": "float32", "max_model_len": 16384, "enable_prefix_caching": False}
    sampling = {"max_tokens": NEW, "logprobs": 1, "prompt_logprobs": 1, "detokenize": False}

    def run(prompts, overrides, plugins):
        return run_engine({"model": smol_model, "prompts": prompts, "sampling": sampling,
                           "llm_kwargs": dict(base, hf_overrides=overrides)},
                          plugins=plugins, timeout=3600)["outputs"]

    request = run([short, long_], YarnConfig(factor=2.0, mode="request").hf_overrides(hf), True)
    trained = run([short, long_], {"max_position_embeddings": 16384}, False)
    static2 = run([short, long_], YarnConfig(factor=2.0).hf_overrides(hf), False)
    return {"short": (request[0], trained[0]), "long": (request[1], static2[1]),
            "long_as_trained": trained[1], "short_at_2": static2[0]}


def _gaps(a, b, key):
    return [abs(x[k] - y[k]) for x, y in zip(a[key], b[key]) if x and y for k in x if k in y]


@pytest.mark.parametrize("name", ["short", "long"])
def test_each_request_equals_vllm_at_its_scale(runs, name):
    ours, reference = runs[name]
    assert ours["token_ids"] == reference["token_ids"]
    assert max(_gaps(ours, reference, "prompt_logprobs")) < LOGPROB_TOL
    assert max(_gaps(ours, reference, "logprobs")) < LOGPROB_TOL


@pytest.mark.parametrize("name,neighbour", [("long", "long_as_trained"), ("short", "short_at_2")])
def test_each_request_is_far_from_the_neighbouring_scale(runs, name, neighbour):
    """The contrast: the long prompt at s = 1, the short one at s = 2, would be far outside
    the tolerance."""
    ours, _ = runs[name]
    assert max(_gaps(ours, runs[neighbour], "prompt_logprobs")) > 100 * LOGPROB_TOL
