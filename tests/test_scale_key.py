"""The scale key in prefix-cache block hashes: no client salt reaches another scale's blocks.

Before, admission appended `yarn_factor=<s>` to the client's own `cache_salt`, so a client
at s = 1 sending `cache_salt: "yarn_factor=2.0"` wrote blocks under the hash chain of a
salt-less request at s = 2 (measured: 896 tokens of a 300-token attacker's shared prefix
hit by the next honest s = 2 request, its output 6.9 nats off). Now the engine core's
scheduler adds the scale as its own extra key of the first block (vllm_seam.scheduler).
These tests hash real vLLM Requests with vLLM's own hasher and ours, over every forged
spelling we could think of; the engine-level check is in test_request_escalation.py.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from yarn_vllm.vllm_seam.scheduler import SCALE_KEY, _ScaleMixin

BLOCK = 16
PROMPT = list(range(2, 2 + 3 * BLOCK + 5))  # three full blocks and a partial one
SCALES = (1.0, 2.0, 3.0, 4.0)


def _forgeries(s: float) -> list[str]:
    """Salts a client might send to land on the hashes of scale s."""
    return [f"yarn_factor={s!r}", f"yarn_factor={s:g}", f"|yarn_factor={s!r}",
            f"tenant|yarn_factor={s!r}", f"yarn_factor={s!r}|", SCALE_KEY, f"{SCALE_KEY}={s!r}",
            repr((SCALE_KEY, s)), repr(((SCALE_KEY, s),)), repr(s), f"{s:g}",
            f"('cache_salt', 'tenant'), ('{SCALE_KEY}', {s!r})", f"{s!r}\x00"]


SALTS = [None, "tenant"] + sorted({f for s in SCALES for f in _forgeries(s)})


@pytest.fixture(scope="module")
def hashing():
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return hash_fn, get_request_block_hasher(BLOCK, hash_fn)


def _request(hashing, scale: float, salt: str | None, prompt=PROMPT):
    """A vLLM Request hashed as our scheduler hashes it at `scale` (vLLM's hasher first, as
    the engine core builds it, then the scheduler's `_set_scale`)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    hash_fn, vllm_hasher = hashing
    request = Request("r", list(prompt), SamplingParams(max_tokens=8), None, cache_salt=salt,
                      block_hasher=vllm_hasher)
    scheduler = SimpleNamespace(yarn_scale={}, hash_block_size=BLOCK, _yarn_hash_fn=hash_fn)
    _ScaleMixin._set_scale(scheduler, request, scale)
    return request


def test_the_hash_chain_names_scale_and_salt_and_nothing_else(hashing):
    """Every (scale, salt) pair hashes apart: equal first blocks only for equal pairs."""
    firsts = {}
    for s, salt in itertools.product(SCALES, SALTS):
        request = _request(hashing, s, salt)
        assert len(request.block_hashes) == 3
        firsts.setdefault(request.block_hashes[0], []).append((s, salt))
    collisions = [pairs for pairs in firsts.values() if len(pairs) > 1]
    assert not collisions
    assert len(firsts) == len(SCALES) * len(SALTS)


@pytest.mark.parametrize("salt", [None, "tenant", "yarn_factor=2.0"])
def test_scale_1_hashes_exactly_as_plain_vllm(hashing, salt):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    plain = Request("p", list(PROMPT), SamplingParams(max_tokens=8), None, cache_salt=salt,
                    block_hasher=hashing[1])
    assert _request(hashing, 1.0, salt).block_hashes == plain.block_hashes
    # the contrast: the same request at s = 2 shares none of them
    assert not set(_request(hashing, 2.0, salt).block_hashes) & set(plain.block_hashes)


def test_blocks_hashed_after_a_scale_change_use_the_new_key_for_the_whole_chain(hashing):
    """An escalated request's hashes are rebuilt from its first block, and the blocks it adds
    while decoding chain from them: they equal a fresh request's at the new scale."""
    grown = _request(hashing, 1.0, None)
    grown.append_output_token_ids(list(range(100, 100 + BLOCK)))  # a fourth full block
    scheduler = SimpleNamespace(yarn_scale={}, hash_block_size=BLOCK, _yarn_hash_fn=hashing[0])
    _ScaleMixin._set_scale(scheduler, grown, 2.0)
    grown.append_output_token_ids(list(range(200, 200 + BLOCK)))  # a fifth, hashed as it fills
    fresh = _request(hashing, 2.0, None, PROMPT + list(range(100, 100 + BLOCK))
                     + list(range(200, 200 + BLOCK)))
    assert len(grown.block_hashes) == 5 and grown.block_hashes == fresh.block_hashes[:5]
    assert not set(grown.block_hashes) & set(_request(hashing, 1.0, None).block_hashes)
