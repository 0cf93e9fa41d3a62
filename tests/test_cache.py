"""The embedding cache: byte bound, LRU order, single-flight, counters, no crosstalk."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import make_picture
from PIL import Image

from segmentation import EmbeddingCache


@dataclass
class Blob:
    name: str
    nbytes: int


def test_lru_order_and_byte_bound_under_churn():
    cache = EmbeddingCache(max_bytes=100)
    rng = np.random.default_rng(0)
    for _ in range(500):
        key = int(rng.integers(0, 30))
        if cache.get(key) is None:
            cache.put(key, Blob(str(key), int(rng.integers(1, 40))))
        assert cache.stats().bytes <= 100
    stats = cache.stats()
    assert stats.hits + stats.misses == 500
    assert stats.evictions > 0


def test_least_recently_used_goes_first():
    cache = EmbeddingCache(max_bytes=30)
    for key in "abc":
        cache.put(key, Blob(key, 10))
    cache.get("a")  # a is now the most recent
    cache.put("d", Blob("d", 10))
    assert cache.keys() == ["c", "a", "d"]
    assert "b" not in cache
    assert cache.stats().evictions == 1


def test_value_larger_than_the_bound_is_returned_but_not_kept():
    cache = EmbeddingCache(max_bytes=10)
    value, cached = cache.get_or_compute("big", lambda: Blob("big", 11))
    assert value.name == "big" and not cached
    assert len(cache) == 0


def test_single_flight_runs_compute_once_for_concurrent_callers():
    cache = EmbeddingCache(max_bytes=1000)
    calls = []
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(5)
        return Blob("x", 10)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_compute, "k", compute) for _ in range(8)]
        time.sleep(0.2)
        gate.set()
        results = [f.result() for f in futures]
    assert len(calls) == 1
    assert sum(1 for _, cached in results if not cached) == 1
    assert all(value is results[0][0] for value, _ in results)


def test_a_failed_compute_reaches_every_waiter_and_is_not_cached():
    cache = EmbeddingCache(max_bytes=1000)
    gate = threading.Event()

    def failing():
        gate.wait(5)
        raise RuntimeError("encoder broke")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get_or_compute, "k", failing) for _ in range(4)]
        time.sleep(0.2)
        gate.set()
        for future in futures:
            with pytest.raises(RuntimeError, match="encoder broke"):
                future.result()
    value, cached = cache.get_or_compute("k", lambda: Blob("ok", 1))
    assert value.name == "ok" and not cached


def test_shed_frees_the_oldest_half():
    cache = EmbeddingCache(max_bytes=100)
    for key in "abcd":
        cache.put(key, Blob(key, 10))
    assert cache.shed(0.5) == 20
    assert cache.keys() == ["c", "d"]


def test_aliases_name_live_entries_are_bounded_and_count_only_hits():
    cache = EmbeddingCache(max_bytes=20, max_aliases=2)
    cache.put("a", Blob("a", 10))
    cache.link("file-a", "a")
    assert cache.get_by_alias("file-a").name == "a"
    assert cache.get_by_alias("never-linked") is None
    assert (cache.stats().hits, cache.stats().misses) == (1, 0)  # the caller's fallback lookup counts
    cache.put("b", Blob("b", 10))
    cache.put("c", Blob("c", 10))  # evicts a: its alias leads nowhere now
    assert cache.get_by_alias("file-a") is None
    cache.link("file-b", "b")
    cache.link("file-c", "c")  # third alias: the least recently used one (file-a) is forgotten
    assert "file-a" not in cache._aliases and len(cache._aliases) == 2
    cache.clear()
    assert cache.get_by_alias("file-b") is None and not cache._aliases


def test_the_same_encoded_bytes_skip_decoding_and_hashing(segmenter, monkeypatch):
    from segmentation import engine

    segmenter.cache.clear()
    data = io.BytesIO()
    Image.fromarray(make_picture(90, 70, seed=41)).save(data, format="PNG")
    first, cached = segmenter.embed_with_info(data.getvalue())
    assert not cached
    decodes = []
    monkeypatch.setattr(engine, "load_image", lambda *a, **k: decodes.append(1) or pytest.fail("decoded again"))
    again, cached = segmenter.embed_with_info(data.getvalue())
    assert cached and again is first and not decodes
    monkeypatch.undo()
    # other bytes of the same pixels (another encoding) decode, then find the entry by its pixels
    other = io.BytesIO()
    Image.fromarray(make_picture(90, 70, seed=41)).save(other, format="BMP")
    same_pixels, cached = segmenter.embed_with_info(other.getvalue())
    assert cached and same_pixels is first


def test_segmenter_encodes_once_for_concurrent_requests_of_one_picture(segmenter):
    picture = make_picture(96, 64, seed=11)
    segmenter.cache.clear()
    encodes = []
    original = segmenter._encode_unlocked

    def counting(rgb, key):
        encodes.append(key)
        time.sleep(0.3)
        return original(rgb, key)

    segmenter._encode_unlocked = counting
    try:
        with ThreadPoolExecutor(6) as pool:
            embeddings = list(pool.map(lambda _: segmenter.embed(picture), range(6)))
    finally:
        del segmenter._encode_unlocked
    assert len(encodes) == 1
    assert all(e is embeddings[0] for e in embeddings)


def test_no_crosstalk_between_pictures_under_threads(segmenter):
    pictures = [make_picture(80 + 8 * i, 60 + 4 * i, seed=20 + i) for i in range(5)]
    prompts = [[[[10 + i, 12]], [[30, 20 + i], [40, 25]]] for i in range(5)]
    expected = [segmenter.segment(segmenter.embed(p), q).best.labels for p, q in zip(pictures, prompts)]
    segmenter.cache = EmbeddingCache(max_bytes=3 * segmenter.embed(pictures[0]).nbytes)  # forces evictions

    def job(i):
        return i, segmenter.segment(segmenter.embed(pictures[i % 5]), prompts[i % 5]).best.labels

    with ThreadPoolExecutor(4) as pool:
        for i, labels in pool.map(job, range(30)):
            np.testing.assert_array_equal(labels, expected[i % 5])
    assert segmenter.cache.stats().evictions > 0
    assert segmenter.cache.stats().bytes <= segmenter.cache.max_bytes


@dataclass
class Placed:
    name: str
    nbytes: int
    where: str = "device"


def _two_tier(max_bytes=100, device_bytes=30):
    moves = []

    def to_host(value):
        moves.append(("host", value.name))
        return Placed(value.name, value.nbytes, "host")

    def to_device(value):
        moves.append(("device", value.name))
        return Placed(value.name, value.nbytes, "device")

    cache = EmbeddingCache(max_bytes, device_bytes=device_bytes, to_host=to_host, to_device=to_device)
    return cache, moves


def test_device_tier_spills_least_recent_to_host_and_brings_hits_back():
    cache, moves = _two_tier()
    for key in "abcd":
        cache.put(key, Placed(key, 10))
    assert moves == [("host", "a")]  # 40 bytes > 30 on device: the oldest spilled
    assert cache.stats().device_bytes == 30 and cache.stats().bytes == 40 and cache.stats().spills == 1
    value = cache.get("a")
    assert value.where == "device"
    assert moves[-2:] == [("device", "a"), ("host", "b")]
    value, cached = cache.get_or_compute("b", lambda: Placed("never", 1))
    assert cached and value.where == "device" and value.name == "b"
    assert cache.stats().device_bytes <= 30


def test_device_tier_respects_the_total_bound_and_shed():
    cache, _ = _two_tier(max_bytes=50, device_bytes=20)
    for key in "abcdefgh":
        cache.put(key, Placed(key, 10))
    stats = cache.stats()
    assert stats.bytes == 50 and stats.device_bytes == 20 and stats.evictions == 3
    cache.shed(1.0)
    assert cache.stats().bytes == 0 and cache.stats().device_bytes == 0


def test_device_tier_needs_both_moves():
    with pytest.raises(ValueError, match="to_host and to_device"):
        EmbeddingCache(10, device_bytes=5)


def test_embedding_round_trips_between_tiers_with_equal_masks(segmenter):
    picture = make_picture(72, 40, seed=31)
    embedding = segmenter.embed(picture)
    moved = embedding.to("cpu")
    assert moved.key == embedding.key and moved.nbytes == embedding.nbytes
    expected = segmenter.segment(embedding, [[[20, 20]]]).best.labels
    np.testing.assert_array_equal(segmenter.segment(moved, [[[20, 20]]]).best.labels, expected)
