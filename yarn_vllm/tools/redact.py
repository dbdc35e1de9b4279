"""Secrets out of what we print: flags whose name says key, token or secret.

A flag is secret when its last word is `key`, `keys` or `token` (`--api-key`,
`--hf-token`, `--aws-secret-access-key`) or any word is `secret` or `password`.
Words, not substrings, so that `--max-num-batched-tokens 2048` and `--ssl-keyfile
PATH` stay readable. vLLM's `--api-key` takes several values (nargs "+"), so every
value up to the next flag is hidden.
"""

from __future__ import annotations

HIDDEN = "***"
_LAST_WORDS = ("key", "keys", "token")
_ANY_WORDS = ("secret", "password")


def is_secret(name: str) -> bool:
    """'--api-key', 'hf_token', '--client-secret=x' -> True; '--max-num-batched-tokens' -> False."""
    words = name.lstrip("-").split("=", 1)[0].replace("_", "-").lower().split("-")
    return words[-1] in _LAST_WORDS or any(w in _ANY_WORDS for w in words)


def redact_argv(argv: list[str]) -> list[str]:
    """`argv` with the value(s) of every secret flag replaced by ***."""
    out, hiding = [], False
    for arg in argv:
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            hiding = is_secret(arg)
            if hiding and "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + HIDDEN)
                hiding = False
                continue
            out.append(arg)
        else:
            out.append(HIDDEN if hiding else arg)
    return out


def redact_kwargs(kwargs: dict) -> dict:
    """A copy of `kwargs` (engine arguments) with secret values replaced by ***."""
    return {k: HIDDEN if is_secret(k) and v is not None else v for k, v in kwargs.items()}


def _is_number(arg: str) -> bool:  # "-1" is a value, not a flag
    try:
        float(arg)
        return True
    except ValueError:
        return False
