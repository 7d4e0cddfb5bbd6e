"""The server's response cache: what is cacheable, the size bound, the TTL (the server's use: tests/test_serve.py)."""

import time

from llmops.serving.engine import Sampling
from llmops.serving.cache import Answer, ResponseCache


def test_the_response_cache_is_bounded_and_expires():
    cache = ResponseCache(max_entries=2, ttl_s=0.5)
    greedy = Sampling(max_tokens=4, temperature=0)
    keys = [cache.key("alice", "model@v1.0.0", [1, 2, i], greedy, []) for i in range(3)]
    assert cache.key("alice", "model@v1.0.0", [1], Sampling(max_tokens=4, temperature=0.7), []) is None
    assert cache.key("alice", "model@v2.0.0", [1, 2, 0], greedy, []) != keys[0]  # another version: another entry
    # another caller: another entry (a hit would tell bob what alice asked, and answer him from her prompt)
    assert cache.key("bob", "model@v1.0.0", [1, 2, 0], greedy, []) != keys[0]
    for i, key in enumerate(keys):
        cache.put(key, Answer(f"answer {i}", "length", 4))
    assert cache.get(keys[0]) is None and cache.get(keys[2]).text == "answer 2"  # the oldest made room
    time.sleep(0.6)
    assert cache.get(keys[2]) is None  # expired
    cache.put(keys[0], Answer("answer 0", "length", 4))
    cache.clear()  # a reload (an erasure sends one)
    assert cache.get(keys[0]) is None
    assert ResponseCache(0, 60).key("alice", "model", [1], greedy, []) is None  # 0 entries: no cache
