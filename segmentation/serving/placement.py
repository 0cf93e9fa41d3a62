"""Where a new picture goes: rendezvous hashing of its digest over the replicas, with bounded load.

No Ray here (the router in `router.py` and the simulation in benchmarks/scaling_sim.py both use it).

* Rendezvous (highest random weight) hashing ranks the replicas for each picture by a hash of
  (picture, replica): every router of the cluster ranks them the same way without talking to the others,
  and adding or removing a replica moves only the pictures it ranks first.
* Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018): a
  replica already encoding more than its share of the new pictures in flight is passed over for the next
  one in the picture's ranking. Pictures that arrive together therefore spread over the replicas at once,
  before any replica has reported what it holds: with `load_factor` 1, no replica gets more than
  ceil(N / replicas) of N simultaneous new pictures.
* Among the replicas under the bound, the one holding the fewest pictures goes first (Ray's own criterion
  for new ids), so pictures arriving one at a time spread too; the ranking breaks ties.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

R = TypeVar("R", bound=Hashable)


def rendezvous_order(picture: str, replicas: Iterable[R], name=str) -> list[R]:
    """The replicas ranked for `picture`, best first (the same order in every process)."""

    def weight(replica: R) -> bytes:
        return hashlib.blake2b(f"{picture}\0{name(replica)}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


def bounded_order(
    picture: str,
    replicas: Iterable[R],
    loads: Mapping[R, int],
    load_factor: float = 1.0,
    name=str,
    held: Mapping[R, int] | None = None,
) -> list[R]:
    """The replicas in the order to try for a new picture: those under the load bound first, fewest pictures
    `held` first among them, then the picture's rendezvous ranking. `loads` counts the new pictures each
    replica is encoding now (from this router's view); the bound is ceil(load_factor × (in flight + 1) /
    replicas), the share each would have with this one."""
    ranked = rendezvous_order(picture, replicas, name)
    if not ranked:
        return []
    held = held or {}
    bound = math.ceil(load_factor * (sum(loads.get(r, 0) for r in ranked) + 1) / len(ranked))
    return sorted(ranked, key=lambda r: (loads.get(r, 0) >= bound, held.get(r, 0)))  # stable: ranking breaks ties
