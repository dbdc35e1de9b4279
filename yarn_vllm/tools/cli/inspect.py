"""`yarn-vllm inspect`: the YaRN settings and hf_overrides a setting gives a model."""

from __future__ import annotations

import json

from yarn_vllm.tools.cli.args import add_model_flag, add_yarn_flags, yarn_config_from_args
from yarn_vllm.yarn.config import YarnConfig


def run(args, unknown) -> int:
    from transformers import AutoConfig

    from yarn_vllm.tools.models import resolve_model

    hf = AutoConfig.from_pretrained(resolve_model(args.model)).to_dict()
    yarn = yarn_config_from_args(args) or YarnConfig.from_hf_config(hf)
    if yarn is None:
        print("the model uses plain RoPE; pass --factor or --target-context to extend it")
        return 0
    print(json.dumps({"yarn": yarn.resolve(hf).__dict__, "hf_overrides": yarn.hf_overrides(hf)},
                     indent=2))
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show the YaRN settings and hf_overrides for a model")
    add_model_flag(i)
    add_yarn_flags(i)
    i.set_defaults(func=run)
