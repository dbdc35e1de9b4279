"""`yarn-vllm prepare`: convert the default model (SmolLM2-135M) to an HF folder once."""

from __future__ import annotations


def run(args, unknown) -> int:
    from yarn_vllm.tools.models import prepare_default_model

    print(prepare_default_model())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="convert the default model (SmolLM2-135M) once")
    p.set_defaults(func=run)
