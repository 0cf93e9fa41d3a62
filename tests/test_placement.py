"""Where a new picture goes (segmentation/serving/placement.py, what the Ray router runs): no Ray needed."""

from __future__ import annotations

import math
from collections import Counter

from segmentation.serving.placement import bounded_order, rendezvous_order

REPLICAS = [f"replica-{i}" for i in range(5)]


def test_pictures_arriving_together_spread_evenly_in_hash_order():
    for replicas in (REPLICAS[:2], REPLICAS[:3], REPLICAS):
        for n in (1, 4, 7, 16, 33):
            loads: Counter = Counter()
            for i in range(n):  # each counted as in flight before the next one is placed
                loads[bounded_order(f"picture-{n}-{i}", replicas, loads)[0]] += 1
            assert max(loads.values()) <= math.ceil(n / len(replicas)), (replicas, n, loads)


def test_the_first_choice_is_the_hash_choice_when_nothing_is_in_flight():
    for i in range(50):
        picture = f"p{i}"
        assert bounded_order(picture, REPLICAS, {}) == rendezvous_order(picture, REPLICAS)
        assert rendezvous_order(picture, REPLICAS) == rendezvous_order(picture, list(reversed(REPLICAS)))


def test_losing_a_replica_moves_only_its_own_pictures():
    pictures = [f"p{i}" for i in range(400)]
    before = {p: rendezvous_order(p, REPLICAS)[0] for p in pictures}
    after = {p: rendezvous_order(p, REPLICAS[:-1])[0] for p in pictures}
    moved = [p for p in pictures if before[p] != after[p]]
    assert moved and all(before[p] == REPLICAS[-1] for p in moved)
    assert 40 < len(moved) < 120, "about a fifth of the pictures lived there"


def test_a_replica_over_its_share_is_passed_over_for_the_next_in_the_ranking():
    ranked = rendezvous_order("picture", REPLICAS)
    order = bounded_order("picture", REPLICAS, {ranked[0]: 3, ranked[1]: 0})
    assert order[0] == ranked[1] and order[-1] == ranked[0]
