"""Talk to a YaRN-extended model served by `yarn-vllm serve`, with the `openai` client.

Either start a server yourself and point this script at it:

    yarn-vllm serve smollm2-135m --factor 2 --port 8000     # listens on 127.0.0.1 only
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

or let the script start one on a free loopback port and stop it at the end:

    python examples/openai_client.py --factor 2
"""

from __future__ import annotations

import argparse
import contextlib
import time

import openai


def demo(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="The three primary colours are",
                                  max_tokens=32, temperature=0)
    print(f"completion: {r.choices[0].text!r}")

    r = client.chat.completions.create(
        model=model, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "In one sentence, what does YaRN do?"}])
    print(f"chat: {r.choices[0].message.content!r}")

    print("streamed: ", end="", flush=True)
    for chunk in client.chat.completions.create(
            model=model, max_tokens=64, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Write a haiku about long documents."}]):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # A long prompt, past the model's trained 8k positions (the server was started with
    # YaRN s=2, so it takes up to 16k): the usage shows how many tokens were read.
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 1100 + "\nSummary:"
    t0 = time.perf_counter()
    r = client.completions.create(model=model, prompt=long_prompt, max_tokens=16, temperature=0)
    print(f"long prompt: {r.usage.prompt_tokens} tokens in, {r.choices[0].text!r} "
          f"({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running server's /v1 address (default: start one)")
    ap.add_argument("--model", default="smollm2-135m", help="model to start (without --base-url)")
    ap.add_argument("--factor", default="2", help="YaRN factor for the server this script starts")
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if base_url is None:
            from yarn_vllm.tools.models import resolve_model
            from yarn_vllm.tools.testing.server_process import LocalServer

            print("starting yarn-vllm serve (about a minute on a CPU)...", flush=True)
            server = stack.enter_context(
                LocalServer(resolve_model(args.model), ["--factor", args.factor]))
            base_url = server.base_url
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id  # whatever the server serves
        print(f"server {base_url} serves {model}")
        demo(client, model)


if __name__ == "__main__":
    main()
