"""Passkey retrieval (YaRN paper, Section 4.3; Mohtashami & Jaggi 2023).

A random 5-digit key is hidden at a chosen depth inside repeated filler
text; the model must repeat it. The prompt is token-exact in length, so a
grid over lengths and depths means what it says.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize them. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    token_ids: list[int]
    key: str
    depth: float  # where the needle sits, as a fraction of the filler

    def is_found(self, completion: str) -> bool:
        """True if the first number in the completion is the key."""
        m = re.search(r"\d+", completion)
        return m is not None and m.group(0) == self.key


def make_passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens with the key at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    intro, needle, question, filler = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is too short for a passkey prompt "
                         f"(needs > {length - budget} tokens)")
    body = (filler * (budget // len(filler) + 1))[:budget]
    cut = int(round(depth * budget))
    ids = intro + body[:cut] + needle + body[cut:] + question
    assert len(ids) == length
    return PasskeyPrompt(ids, key, depth)
