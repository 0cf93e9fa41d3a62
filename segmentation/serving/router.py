"""`PictureRouter`: Ray Serve's pluggable request router for the Segmenter replicas (Ray >= 2.45 API).

Ray's default router (`PowerOfTwoChoicesRequestRouter` with `MultiplexMixin`) learns which replica holds a
picture only when that replica reports its multiplexed ids to the controller (every 0.1 s) and the
controller pushes them to the routers. Until then a new picture goes to "the replicas with the fewest ids",
and pictures that arrive together all see the same counts and land on the same replica while another
idles. This router decides at once:

1. A picture a replica has reported (Ray's multiplexed ids), or that this router sent somewhere and that
   replica has not reported yet: that replica. If it stays full (`max_ongoing_requests`) for the
   matching timeout (1–2 s, `RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`, as Ray's), the others
   are tried too: the request is served with a re-encode rather than waiting on.
2. A new picture: the replicas with bounded load (`placement.bounded_order`), counting the new pictures
   this router has in flight on each; among those under the bound, the one holding the fewest pictures
   (reported, plus in flight), then the picture's rendezvous ranking; the first replica in that order that
   accepts (not full, still alive), else the next.

A replica that dies is dropped by Ray's router base class (`on_replica_actor_died`); its pictures are then
new pictures again. Requests without a multiplexed id (`stats`) go to any replica, least loaded first.

Configured in `ray_app.build` with `RequestRouterConfig(request_router_class=...)`; this module imports
only Ray (the ingress processes, where routers run, need no torch for it).
"""

from __future__ import annotations

import random
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve._private.constants import RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S
from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from .placement import bounded_order

REMEMBERED = 65536  # pictures this router remembers sending somewhere (until their replica reports them)
STALE_S = 600.0  # a new-picture request never reported complete stops counting as load after this


@dataclass
class _InFlight:
    picture: str
    replica: ReplicaID
    request: PendingRequest
    since: float


class PictureRouter(MultiplexMixin, RequestRouter):
    """Held pictures to their replica; new pictures spread at once by rendezvous hashing with bounded load."""

    def initialize_state(self, load_factor: float = 1.0, **kwargs) -> None:
        self.load_factor = float(load_factor)
        self._sent: OrderedDict[str, ReplicaID] = OrderedDict()  # picture -> replica, until it reports it
        self._new: dict[str, _InFlight] = {}  # internal request id -> a new picture's request in flight

    # ---- the routing decision ------------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not hasattr(self, "_sent"):  # initialize_state is called by Ray; be safe if it was not
            self.initialize_state()
        picture = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not picture:
            replicas = list(self._replicas.values())
            random.shuffle(replicas)  # the base class picks the shortest queue among them
            return [replicas] if replicas else []
        pending_request.routing_context.should_backoff = True  # back off between rounds, as Ray's routers do
        holders = self._holders(picture)
        if holders:
            if time.time() - pending_request.created_at < self._matching_timeout(pending_request):
                return [holders]
            rest = [r for r in self._new_picture_order(picture) if r not in holders]
            return [holders, *([r] for r in rest)]
        order = self._new_picture_order(picture)
        if not order:
            return []
        self._note_new(pending_request, picture, order[0].replica_id)  # counted at once: the next one sees it
        return [[replica] for replica in order]

    def _holders(self, picture: str) -> list[RunningReplica]:
        """Replicas that reported the picture, else the one this router last sent it to (if alive)."""
        reported = self._multiplexed_model_id_to_replica_ids.get(picture, set())
        holders = [self._replicas[r] for r in reported if r in self._replicas]
        if holders:
            self._sent.pop(picture, None)  # Ray knows now; our note only bridged the report's delay
            return holders
        sent = self._sent.get(picture)
        if sent is not None and sent in self._replicas:
            return [self._replicas[sent]]
        return []

    def _new_picture_order(self, picture: str) -> list[RunningReplica]:
        loads = self._new_picture_loads()
        held = {r: len(replica.multiplexed_model_ids) + loads.get(r, 0) for r, replica in self._replicas.items()}
        ids = bounded_order(picture, self._replicas, loads, self.load_factor, name=lambda r: r.unique_id, held=held)
        return [self._replicas[r] for r in ids]

    def _new_picture_loads(self) -> dict[ReplicaID, int]:
        now = time.time()
        loads: dict[ReplicaID, int] = {}
        for key, item in list(self._new.items()):
            if item.request.future.cancelled() or now - item.since > STALE_S or item.replica not in self._replicas:
                del self._new[key]
                continue
            loads[item.replica] = loads.get(item.replica, 0) + 1
        return loads

    @staticmethod
    def _matching_timeout(pending_request: PendingRequest) -> float:
        """How long to wait for a busy holder: Ray's multiplex timeout, 1 to 2 times it (jittered per
        request, as Ray's, so requests that waited together do not all give up together)."""
        jitter = zlib.crc32(pending_request.metadata.internal_request_id.encode()) / 2**32
        return RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S * (1 + jitter)

    # ---- bookkeeping: what this router sent where ----------------------------------------------

    def _note_new(self, request: PendingRequest, picture: str, replica: ReplicaID) -> None:
        self._new[request.metadata.internal_request_id] = _InFlight(picture, replica, request, time.time())
        self._remember(picture, replica)

    def _remember(self, picture: str, replica: ReplicaID) -> None:
        self._sent[picture] = replica
        self._sent.move_to_end(picture)
        while len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """The replica accepted the request: that is where its picture lives now (until it reports)."""
        picture = pending_request.metadata.multiplexed_model_id
        if not picture or not hasattr(self, "_sent"):
            return
        item = self._new.get(pending_request.metadata.internal_request_id)
        if item is not None:
            item.replica = replica_id
        if not self._multiplexed_model_id_to_replica_ids.get(picture):
            self._remember(picture, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if hasattr(self, "_new"):
            self._new.pop(internal_request_id, None)
