"""The `yarn-vllm` command line (vLLM-style subcommands, kebab-case flags).

  yarn-vllm generate   offline batch generation with YaRN (the main job)
  yarn-vllm serve      vLLM's OpenAI server with YaRN (other flags go to vLLM)
  yarn-vllm prepare    convert the default model once
  yarn-vllm inspect    print the hf_overrides a YaRN setting gives a model
  yarn-vllm eval       long-context quality per RoPE method: perplexity, passkey, the suite
  yarn-vllm bench      throughput per RoPE method: offline, online TTFT/TPOT, Ray sweeps

Flags this CLI does not know are passed to vLLM's `LLM(...)` as keyword
arguments: `--max-num-seqs 4` becomes `max_num_seqs=4`. One module per
subcommand; `args` holds what they share. A user error (yarn_vllm.errors.UserError,
or a missing file) ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from yarn_vllm.tools.cli.args import passthrough_kwargs, yarn_config_from_args  # noqa: F401
from yarn_vllm.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other user error (exit status 2)."""

    def error(self, message: str):
        source = self.prog.partition(" ")[2] or "command line"  # "bench offline"
        field, problem = "arguments", message
        if m := re.match(r"argument ([^:]+): (.*)", message, re.S):
            field, problem = m.group(1).split("/")[0], m.group(2)
            if t := re.match(r"invalid (\w+) value: (.*)", problem):  # argparse's type=int
                problem = f"is {t.group(2)}, not {'an' if t.group(1)[0] in 'aeiou' else 'a'} " \
                          f"{t.group(1)}"
        elif m := re.match(r"the following arguments are required: (.*)", message):
            field, problem = m.group(1), "is required"
        err = UserError(field, problem.replace("\n", " "), f"see {self.prog} --help",
                        source=source)
        self.exit(2, f"yarn-vllm: {err}\n")


def build_parser() -> argparse.ArgumentParser:
    from yarn_vllm.tools.cli import bench, eval as eval_command, generate, inspect, prepare, serve

    ap = OneLineParser(prog="yarn-vllm", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (generate, eval_command, serve, prepare, inspect, bench):
        command.add_parser(sub)
    return ap


def normalise_argv(argv: list[str]) -> list[str]:
    """`serve MODEL ...` -> `serve --model MODEL ...`; `bench ...` -> `bench offline ...`.

    An optional positional would swallow the value of an unknown pass-through
    flag (`serve --port 8000` would serve a model named "8000").
    """
    from yarn_vllm.tools.cli.bench import default_to_offline

    argv = list(argv)
    if len(argv) > 1 and argv[0] == "serve" and not argv[1].startswith("-"):
        argv[1:2] = ["--model", argv[1]]
    return default_to_offline(argv)


def main(argv=None) -> int:
    argv = normalise_argv(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    try:
        return args.func(args, unknown)
    except (UserError, OSError) as e:  # OSError: a missing model folder or file
        print(f"yarn-vllm: {e}", file=sys.stderr)
        return 2
