"""The main job of `yarn-vllm generate`: one batch holding a short and a long passkey prompt.

The short prompt fits well inside the trained context L (L/8 tokens), the long one runs
past it (1.5 L: 12,288 tokens on SmolLM2's 8,192; no longer, since the attention of a CPU
prefill grows with the square of the length and the job should take minutes, not ten).
Each hides a 5-digit key. In request mode each request is served at its own YaRN scale, chosen at admission:
s = 1 for the short one, which then must equal the model as trained, and s = 2 for the
long one, which must still find its key. `as_trained_reference` is that first check, made
independently of vLLM: HF transformers runs the model from its own config (RoPE as
trained) greedily over the same prompt, before the engine starts, and vLLM's tokens must
be the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from yarn_vllm.tools.tasks.passkey import PasskeyPrompt, make_passkey_prompt
from yarn_vllm.yarn.config import YarnConfig

SHORT_FRACTION = 8  # short prompt: L / 8 tokens
LONG_MULTIPLE = 1.5  # long prompt: 1.5 L tokens
SHORT_MAX_TOKENS = 16  # enough to compare with the model as trained past the key itself
LONG_MAX_TOKENS = 8  # the key and a little more; every decode step attends to 12k keys


@dataclass
class JobPrompt:
    name: str  # "short" or "long"
    task: PasskeyPrompt
    max_tokens: int

    @property
    def length(self) -> int:
        return len(self.task.token_ids)


def job_lengths(trained: int, long_length: int | None = None) -> tuple[int, int]:
    """(short, long) prompt lengths in tokens for a model trained to `trained` tokens."""
    return trained // SHORT_FRACTION, long_length or int(LONG_MULTIPLE * trained)


def make_job(tokenizer, trained: int, long_length: int | None = None,
             depths: list[float] = (0.5,), max_tokens: int | None = None) -> list[JobPrompt]:
    """One short prompt (key at depth 0.5), then one long prompt per depth; distinct keys.
    `max_tokens` caps each prompt's own (16 short, 8 long)."""
    short, long = job_lengths(trained, long_length)
    cap = max_tokens or SHORT_MAX_TOKENS
    job = [JobPrompt("short", make_passkey_prompt(tokenizer, short, 0.5, seed=100),
                     min(cap, SHORT_MAX_TOKENS))]
    job += [JobPrompt("long", make_passkey_prompt(tokenizer, long, d, seed=i),
                      min(cap, LONG_MAX_TOKENS)) for i, d in enumerate(depths)]
    return job


def served_scale(policy, prompt_tokens: int, max_tokens: int) -> float:
    """The YaRN scale s a request is served at, by the rule the engine applies
    (yarn_vllm.yarn.scale_policy); 1 without YaRN. Dynamic mode: s at the end of the prefill."""
    if policy is None:
        return 1.0
    if policy.mode == "request":
        return policy.admission_factor(prompt_tokens, max_tokens)
    if policy.mode == "dynamic":
        return float(policy.dynamic_factor(prompt_tokens))
    return policy.factor


def as_trained_greedy(model_path: str, prompts: list[list[int]], n_tokens: list[int],
                      dtype: str) -> list[list[int]]:
    """HF transformers' greedy tokens for each prompt, `n_tokens[i]` of them, with the model
    loaded from its own config (RoPE as trained), in `dtype` (e.g. "bfloat16").

    Runs on one thread: beside other work on 2 cores, two OpenMP threads ran a 1k-token
    forward of SmolLM2 5x slower than one (20 s against 4 s at load average 10).
    """
    import torch
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path,
                                                     dtype=getattr(torch, dtype)).eval()
        out = []
        with torch.inference_mode():
            for ids, n in zip(prompts, n_tokens):
                x, past, tokens = torch.tensor([ids]), None, []
                for _ in range(n):  # not generate(): its config could stop early or reweigh
                    step = model(input_ids=x, past_key_values=past, use_cache=True)
                    past, token = step.past_key_values, int(step.logits[0, -1].argmax())
                    tokens.append(token)
                    x = torch.tensor([[token]])
                out.append(tokens)
        return out
    finally:
        torch.set_num_threads(threads)


def as_trained_reference(model_path: str, job: list[JobPrompt], dtype: str
                         ) -> dict[int, list[int]]:
    """{index of each short prompt in `job`: HF's greedy tokens as trained, max_tokens of them}."""
    short = [i for i, p in enumerate(job) if p.name == "short"]
    tokens = as_trained_greedy(model_path, [job[i].task.token_ids for i in short],
                               [job[i].max_tokens for i in short], dtype)
    return dict(zip(short, tokens))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where a and b differ (or where one ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check(prompt: JobPrompt, scale: float, text: str, tokens: list[int],
          reference: list[int] | None = None) -> dict:
    """A prompt's row: name, length, scale, whether the key was found and, for a short
    prompt, whether its greedy `tokens` equal the model as trained (`reference`, HF's; None:
    not compared), with the table's `result` in words."""
    found = prompt.task.is_found(text)
    result = f"key {prompt.task.key} {'found' if found else 'missed'}"
    if not found:
        result += f" (answered {text.strip()[:20]!r})"
    row = {"name": prompt.name, "prompt_tokens": prompt.length, "yarn_scale": scale,
           "key": prompt.task.key, "depth": prompt.task.depth, "found": found}
    if prompt.name == "short":
        n = len(tokens)
        # vLLM stops at EOS, HF's loop does not: compare as many tokens as vLLM gave
        diff = None if reference is None else first_difference(tokens, reference[:n])
        row["equals_as_trained"] = None if reference is None else diff is None
        if reference is None:
            same = "not compared with the model as trained"
        elif diff is None:
            same = f"equals the model as trained ({n}/{n} greedy tokens = HF transformers)"
        else:
            same = f"differs from the model as trained from token {diff + 1} of {n}"
        result = f"{same}; {result}"
    row["result"] = result
    return row


def table(rows: list[dict]) -> str:
    """check() rows as aligned text: prompt, tokens, scale, result."""
    lines = [f"  {'prompt':<7} {'tokens':>7}  {'scale':<6} result"]
    lines += [f"  {r['name']:<7} {r['prompt_tokens']:>7,}  s={r['yarn_scale']:<4g} {r['result']}"
              for r in rows]
    return "\n".join(lines)


def main_job_yarn(yarn: YarnConfig | None, args, trained: int, longest: int) -> YarnConfig | None:
    """The main job's YaRN: request mode unless a mode was chosen (--yarn-mode, --static,
    --yarn-config), and the default factor unless a length was given."""
    from yarn_vllm.tools.methods import default_factor

    if args.no_yarn:
        return None
    yarn = yarn or YarnConfig()
    if yarn.factor is None and yarn.target_context is None:
        yarn = replace(yarn, factor=default_factor(trained, longest))
    if not (args.yarn_mode or args.yarn_config):
        yarn = replace(yarn, mode="request")
    return yarn


def job_prompts(args, model: str, trained: int, yarn: YarnConfig | None,
                limit: int) -> list[dict]:
    """The main job's prompt rows (the ones vLLM's max_model_len `limit` admits), announced."""
    from transformers import AutoTokenizer

    job = make_job(AutoTokenizer.from_pretrained(model), trained, args.passkey_length,
                   args.passkey_depths, args.max_tokens)
    served = describe(yarn) if yarn else "off (--no-yarn): RoPE as trained"
    print(f"yarn-vllm: the main job: one batch of {len(job)} prompts hiding a 5-digit key, "
          f"{', '.join(f'{p.length:,}' for p in job)} tokens long; the model was trained "
          f"to {trained:,}. YaRN: {served}", flush=True)
    rows = []
    for p in job:
        if p.length + p.max_tokens <= limit:
            rows.append({"prompt_token_ids": p.task.token_ids, "max_tokens": p.max_tokens,
                         "job": p})
        else:  # vLLM would refuse the whole batch
            print(f"  the {p.name} prompt ({p.length:,} tokens) is left out: vLLM refuses a "
                  f"prompt past max_model_len {limit:,} (YaRN raises it)")
    return rows


def describe(yarn: YarnConfig) -> str:
    factor = f"factor {yarn.factor:g}" if yarn.factor else f"target {yarn.target_context:,}"
    if yarn.mode == "request":
        return (f"request mode, {factor}: each request gets the smallest scale on offer whose "
                "s x trained length holds its prompt and answer (or a reserve when it sets no "
                "max_tokens), and moves up if it outgrows it")
    if yarn.mode == "dynamic":
        return f"dynamic mode, {factor}: s follows each sequence's length"
    return f"static mode, {factor}: every request at the same s, as vLLM serves YaRN"


def job_rows(prompts: list[dict], results, policy, reference: dict[int, list[int]],
             used: list[float | None] | None = None) -> list[dict]:
    """The main job's per-prompt rows: length, scale served at (the engine's, where its
    scheduler says; else by the rule it applies), and each prompt's check."""
    from yarn_vllm.tools.tasks.main_job import check

    rows = []
    for i, (p, r) in enumerate(zip(prompts, results)):
        job, c = p["job"], r.outputs[0]
        scale = used[i] if used and used[i] is not None else served_scale(
            policy, job.length, job.max_tokens)
        rows.append(check(job, scale, c.text, list(c.token_ids), reference.get(i)))
    return rows


def engine_dtype_before_start(model: str, kwargs: dict) -> str:
    """The dtype vLLM will run `LLM(model, **kwargs)` in ("auto" resolved), without starting it."""
    from vllm.engine.arg_utils import EngineArgs

    return str(EngineArgs(model=model, **kwargs).create_model_config().dtype).removeprefix(
        "torch.")


def job_reference(model: str, kwargs: dict, prompts: list[dict]) -> tuple[dict, str]:
    """HF's as-trained greedy tokens for the main job's short prompts, made before the engine
    starts (on one free thread, not beside vLLM's bound ones), in the engine's dtype."""
    from yarn_vllm.tools.tasks.main_job import as_trained_reference

    dtype = engine_dtype_before_start(model, kwargs)
    t0 = time.perf_counter()
    reference = as_trained_reference(model, [p["job"] for p in prompts], dtype)
    print(f"yarn-vllm: the model as trained (HF transformers, {dtype}, greedy) answered the "
          f"short prompt in {time.perf_counter() - t0:.0f} s, for the check below", flush=True)
    return reference, dtype
