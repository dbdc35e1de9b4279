"""YarnConfig: construction, hf_overrides for vLLM 0.32, and one clear error per bad input."""

from __future__ import annotations

import pytest

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError

LLAMA = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "head_dim": 64,
         "max_position_embeddings": 8192, "rope_theta": 100000.0}


def test_hf_overrides_scale_max_position():
    o = YarnConfig(factor=4.0).hf_overrides(LLAMA)
    assert o["max_position_embeddings"] == 32768
    assert o["rope_parameters"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_theta": 100000.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
        "yarn_mode": "static"}


def test_target_context_derives_factor():
    cfg = YarnConfig(target_context=16384).resolve(LLAMA)
    assert cfg.factor == 2.0 and cfg.original_max_position == 8192


def test_overrides_load_in_vllm_model_config(tiny_llama):
    """vLLM accepts the overrides and then allows max_model_len = factor x original."""
    from vllm.config import ModelConfig

    import json, os
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    overrides = YarnConfig(factor=4.0).hf_overrides(hf)
    mc = ModelConfig(model=tiny_llama, hf_overrides=overrides, max_model_len=4096,
                     skip_tokenizer_init=True)
    assert mc.max_model_len == 4096
    assert mc.hf_config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(Exception, match="max_model_len|max_position"):
        ModelConfig(model=tiny_llama, max_model_len=4096, skip_tokenizer_init=True)


def test_from_yaml(tmp_path):
    p = tmp_path / "yarn.yaml"
    p.write_text("yarn:\n  factor: 2.0\n  mode: static\n  beta_fast: 16\n")
    cfg = YarnConfig.from_yaml(str(p))
    assert (cfg.factor, cfg.mode, cfg.beta_fast) == (2.0, "static", 16)


def test_from_hf_config_reads_legacy_rope_scaling():
    hf = dict(LLAMA, rope_scaling={"type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32768})
    cfg = YarnConfig.from_hf_config(hf)
    assert (cfg.factor, cfg.original_max_position, cfg.mode) == (4.0, 32768, "static")
    assert YarnConfig.from_hf_config(LLAMA) is None


def test_from_hf_config_reads_yarn_mode():
    params = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
              "original_max_position_embeddings": 4096}
    hf = dict(LLAMA, rope_parameters=dict(params, yarn_mode="static"))
    assert YarnConfig.from_hf_config(hf).mode == "static"
    dynamic = YarnConfig.from_hf_config(dict(LLAMA, rope_parameters=dict(params,
                                                                         yarn_mode="dynamic")))
    assert dynamic.mode == "dynamic"
    # the stable interface: the same key comes back out for vLLM's --hf-overrides
    assert dynamic.hf_overrides(LLAMA)["rope_parameters"]["yarn_mode"] == "dynamic"


def test_dynamic_headroom_round_trips_and_static_overrides_do_not_carry_it(tmp_path):
    from yarn_vllm.tools.cli import build_parser, yarn_config_from_args

    args, _ = build_parser().parse_known_args(
        ["generate", "--factor", "4", "--yarn-mode", "dynamic", "--dynamic-headroom", "2"])
    cfg = yarn_config_from_args(args)
    params = cfg.hf_overrides(LLAMA)["rope_parameters"]
    assert params["yarn_dynamic_headroom"] == 2.0
    assert YarnConfig.from_hf_config(dict(LLAMA, rope_parameters=params)).dynamic_headroom == 2.0
    assert "yarn_dynamic_headroom" not in YarnConfig(factor=4.0).hf_overrides(LLAMA)[
        "rope_parameters"]


def test_target_context_is_exact():
    """factor = target / original must not round max_position below the target."""
    cfg = YarnConfig(target_context=3211).resolve(dict(LLAMA, max_position_embeddings=1217))
    assert cfg.max_position == 3211
    assert YarnConfig(target_context=3211).hf_overrides(
        dict(LLAMA, max_position_embeddings=1217))["max_position_embeddings"] == 3211


def test_cli_length_flag_replaces_yaml_length(tmp_path):
    from yarn_vllm.tools.cli import build_parser, yarn_config_from_args

    p = tmp_path / "y.yaml"
    p.write_text("factor: 4.0\nbeta_fast: 16\n")
    args, _ = build_parser().parse_known_args(
        ["generate", "--yarn-config", str(p), "--target-context", "16384"])
    cfg = yarn_config_from_args(args)
    assert (cfg.factor, cfg.target_context, cfg.beta_fast) == (None, 16384, 16.0)


@pytest.mark.parametrize("make,field,fix", [
    (lambda: YarnConfig(factor=0.0), "factor", ">= 1"),
    (lambda: YarnConfig(factor=-2.0), "factor", ">= 1"),
    # issue 14: each of these exited 0 from `inspect` and gave NaN/inf frequencies
    (lambda: YarnConfig(factor=1e-300), "factor", ">= 1"),
    (lambda: YarnConfig(factor=0.5), "factor", ">= 1"),
    (lambda: YarnConfig(factor=1e30).resolve(LLAMA), "factor", "smaller factor"),
    (lambda: YarnConfig(factor=float("nan")), "factor", "finite"),
    (lambda: YarnConfig(factor=float("inf")), "factor", "finite"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "attention_factor": float("nan")}),
     "attention_factor", "finite"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "attention_factor": -1.0}),
     "attention_factor", "finite positive"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "mscale": float("nan")}), "mscale", "finite"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "mscale_all_dim": float("inf")}),
     "mscale_all_dim", "finite"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "original_max_position": float("inf")}),
     "original_max_position", "plain int"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "beta_fast": float("inf")}), "beta_fast",
     "finite"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "beta_slow": float("nan")}), "beta_slow",
     "finite"),
    (lambda: YarnConfig.from_dict({"factor": [4]}), "factor", "plain float"),
    (lambda: YarnConfig.from_dict({"factor": True}), "factor", "plain float"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "mode": 3}), "mode", "static, dynamic"),
    (lambda: YarnConfig.from_dict({1: 2.0}), "1", "use only"),
    (lambda: YarnConfig.from_dict({"yarn": 4}), "yarn", "not a mapping"),
    (lambda: YarnConfig.from_dict([4]), "yarn", "not a mapping"),
    (lambda: YarnConfig.from_hf_config(dict(LLAMA, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "yarn_mode": "dynamc"})), "mode", "request"),
    (lambda: YarnConfig(factor=8.0, mode="request", request_factors=[1, 4, 2]),
     "request_factors", "ascending"),
    (lambda: YarnConfig(factor=8.0, mode="request", request_factors=[0.5, 2]),
     "request_factors", "below 1"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_factors=[1, 2, 8]),
     "request_factors", "ending at 8 where factor is 4"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_factors=[1, 2]),
     "request_factors", "ending at 2 where factor is 4"),
    (lambda: YarnConfig(target_context=16384, mode="request", request_factors=[1, 4]
                        ).resolve(LLAMA), "request_factors", "where factor is"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_reserve=-1), "request_reserve",
     ">= 0"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_reserve=1.5), "request_reserve",
     "not an int"),
    (lambda: YarnConfig(factor=4.0, request_reserve=100), "request_reserve", "mode: request"),
    (lambda: YarnConfig(factor=4.0, mode="dynamic", request_escalate=False), "request_escalate",
     "mode: request"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_escalate="no"), "request_escalate",
     "true or false"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_factors="1,x"), "request_factors",
     "plain float"),
    (lambda: YarnConfig(factor=4.0, mode="request", request_factors=[]), "request_factors",
     "list of scales"),
    (lambda: YarnConfig(factor=4.0, request_factors=[1, 2]), "request_factors", "mode: request"),
    (lambda: YarnConfig(target_context=4096).resolve(LLAMA), "target_context", "at least 8192"),
    (lambda: YarnConfig(factor=2.0).resolve({"hidden_size": 64, "num_attention_heads": 2,
                                             "max_position_embeddings": 512}),
     "rope_theta", "RoPE models"),
    (lambda: YarnConfig(factor=2.0).resolve(dict(LLAMA, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4})), "rope_type", "'default' or 'yarn'"),
    (lambda: YarnConfig.from_hf_config(dict(LLAMA, rope_scaling={"type": "dynamic",
                                                                 "factor": 2.0})),
     "rope_type", "serves rope_type 'yarn'"),
    (lambda: YarnConfig(factor=2.0).resolve(dict(LLAMA, head_dim=64, partial_rotary_factor=33 / 64)),
     "rotary_dim", "even rotary_dim"),
    (lambda: YarnConfig(factor=2.0).resolve(dict(LLAMA, partial_rotary_factor=1.5)),
     "rotary_dim", "rotary_dim <= head_size"),
    (lambda: YarnConfig(factor=2.0, mode="sometimes"), "mode", "static, dynamic, request"),
    (lambda: YarnConfig(factor=2.0, beta_fast=1, beta_slow=32), "beta_fast", "beta_fast > beta_slow"),
    (lambda: YarnConfig.from_dict({"factr": 2.0}), "factr", "use only"),
    (lambda: YarnConfig().resolve(LLAMA), "factor", "--factor"),
    (lambda: YarnConfig(factor=2.0, target_context=16384), "target_context", "only one"),
    (lambda: YarnConfig.from_dict({"factor": "4x"}), "factor", "plain float"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "beta_fast": None}), "beta_fast", "drop the key"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "truncate": "maybe"}), "truncate", "true or false"),
    (lambda: YarnConfig.from_dict({"factor": 2.0, "original_max_position": 10.5}),
     "original_max_position", "plain int"),
    (lambda: YarnConfig(factor=2.0, mode="dynamic", dynamic_headroom=0.5), "dynamic_headroom",
     "number >= 1"),
    (lambda: YarnConfig(factor=2.0, mode="dynamic", dynamic_headroom=float("nan")),
     "dynamic_headroom", "finite"),
    (lambda: YarnConfig(factor=2.0, dynamic_headroom=2.0), "dynamic_headroom", "mode: dynamic"),
])


def test_bad_input_names_field_and_fix(make, field, fix):
    with pytest.raises(UserError) as e:
        make()
    assert e.value.field == field
    assert f"`{field}`" in str(e.value) and "Fix:" in str(e.value) and fix in str(e.value)


def test_empty_and_broken_yaml(tmp_path):
    empty, broken = tmp_path / "empty.yaml", tmp_path / "broken.yaml"
    empty.write_text("yarn:\n")
    broken.write_text("factor: [4\n")
    assert YarnConfig.from_yaml(str(empty)).factor is None
    with pytest.raises(UserError, match="not valid YAML"):
        YarnConfig.from_yaml(str(broken))


@pytest.mark.parametrize("factor,listed,expected", [
    (8.0, None, (1.0, 2.0, 4.0, 8.0)), (6.0, None, (1.0, 2.0, 4.0, 6.0)),
    (1.0, None, (1.0,)), (2.0, None, (1.0, 2.0)), (4.0, "1,3,4", (1.0, 3.0, 4.0)),
    (4.0, [1, 1.5, 4], (1.0, 1.5, 4.0))])
def test_request_factors_default_and_listed(factor, listed, expected):
    cfg = YarnConfig(factor=factor, mode="request", request_factors=listed).resolve(LLAMA)
    assert cfg.scales_on_offer() == expected
    params = cfg.hf_overrides(LLAMA)["rope_parameters"]
    assert params["yarn_mode"] == "request" and params["yarn_request_factors"] == list(expected)
    # the engine reads the same list back out of rope_parameters
    again = YarnConfig.from_hf_config(dict(LLAMA, rope_parameters=params))
    assert again.scales_on_offer() == expected and again.mode == "request"


def test_request_factors_from_yaml(tmp_path):
    p = tmp_path / "y.yaml"
    p.write_text("factor: 8\nmode: request\nrequest_factors: [1, 2, 8]\n")
    assert YarnConfig.from_yaml(str(p)).resolve(LLAMA).scales_on_offer() == (1.0, 2.0, 8.0)
