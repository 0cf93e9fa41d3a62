"""Simulated cache hit rate and click latency for random vs digest routing over N replicas (docs/SCALING.md).

    python benchmarks/scaling_sim.py                       # the table in docs/SCALING.md
    python benchmarks/scaling_sim.py --users 64 --think 1

Arrival model (closed loop, seeded): `users` people work at once. Each annotates `sessions` pictures one
after the other, `clicks` clicks per picture; after each answer they look at the mask for an exponential
think time (mean `think` s) before the next click. Each new picture is drawn from a pool of `pool`
pictures with Zipf(`zipf`) popularity, so some pictures are shared between people (a team's data set, a
Space's examples).

Replicas: each a FIFO server with one worker (one model), an LRU embedding cache of `cache` pictures.
A click costs `click` seconds on a cached picture, `encode` + `click` otherwise. Service times default to
docs/PERFORMANCE.md's CPU figures (ViT-B, 2 cores: cold click 9.65 s, warm click over HTTP 87 ms); `--gpu`
uses the GPU estimate of docs/SCALING.md (not measured).

Arrivals together (`--together K`): people come in groups of K that start at the same instant (a link shared
in a class, a demo shown to a room), so K new pictures reach the router at once; a group's next pictures
come close together too. K = 1 is the closed loop above with independent starts.

Routing: `random` sends every click to a uniformly chosen replica (what a load balancer without affinity
does). `multiplex` is Ray Serve's default multiplexed routing with the picture's digest as the model id: a
replica that has REPORTED the id (a replica reports a new id `report` s after its request arrives, 0.1 s
in Ray 2.60), else the replicas holding the fewest reported ids; pictures that arrive within the report's
delay see the same counts and go to the same replica (as observed with 4 simultaneous first clicks on 2
replicas: all on one). `picture` is our router (segmentation/serving/router.py): a replica that reported
the picture or that this router sent it to, else bounded load (`placement.bounded_order`, counting the
encodes in flight per replica), the fewest pictures held, then the picture's rendezvous ranking. A replica holds the ids of its
last `cache` pictures (LRU, `max_num_models_per_replica`).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

try:
    from segmentation.serving.placement import bounded_order
except ImportError:  # run as `python benchmarks/scaling_sim.py` from the repository root
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from segmentation.serving.placement import bounded_order

CPU = {"encode": 9.65 - 0.087, "click": 0.087}  # docs/PERFORMANCE.md, measured (ViT-B, 2 cores, float32)
GPU = {"encode": 0.025, "click": 0.008}  # estimate: see docs/SCALING.md


@dataclass
class Replica:
    capacity: int
    name: str = ""
    free_at: float = 0.0
    pictures: OrderedDict = field(default_factory=OrderedDict)
    reported: dict = field(default_factory=dict)  # picture -> when the router learns this replica holds it
    encodes: list = field(default_factory=list)  # when each encode sent here ends (the router's load count)

    def serve(self, picture: int) -> bool:
        """Records a click on `picture`; returns whether its embedding was cached."""
        hit = picture in self.pictures
        self.pictures[picture] = True
        self.pictures.move_to_end(picture)
        while len(self.pictures) > self.capacity:
            self.pictures.popitem(last=False)
        return hit


@dataclass(frozen=True)
class Result:
    replicas: int
    routing: str
    clicks: int
    hit_rate: float
    first_latency: float  # mean latency of a picture's first click (its encode, and the wait for it)
    mean_latency: float
    p95_latency: float
    throughput: float  # clicks answered per second of simulated time


def zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


def simulate(replicas: int, routing: str, args: argparse.Namespace, costs: dict[str, float]) -> Result:
    rng = random.Random(args.seed)  # the same people, pictures and think times for every configuration
    route_rng = random.Random(args.seed + 1)
    servers = [Replica(args.cache, name=f"replica-{i}") for i in range(replicas)]
    weights = zipf_weights(args.pool, args.zipf)
    plans = [[rng.choices(range(args.pool), weights)[0] for _ in range(args.sessions)] for _ in range(args.users)]
    thinks = [[rng.expovariate(1 / args.think) for _ in range(args.sessions * args.clicks)] for _ in range(args.users)]
    starts = [rng.uniform(0, args.think * args.together) for _ in range(0, args.users, args.together)]
    events = [(starts[user // args.together], user, 0) for user in range(args.users)]  # (time, user, click index)
    heapq.heapify(events)
    sent: dict[int, Replica] = {}  # the `picture` router's own memory: where it sent each picture
    latencies, firsts, hits, end = [], [], 0, 0.0
    while events:
        now, user, index = heapq.heappop(events)
        picture = plans[user][index // args.clicks]
        server = route(routing, picture, now, servers, sent, route_rng, args)
        hit = server.serve(picture)
        hits += hit
        start = max(now, server.free_at)
        server.free_at = start + costs["click"] + (0.0 if hit else costs["encode"])
        if not hit:
            server.encodes.append(server.free_at)
        server.reported.setdefault(picture, now + args.report)
        latencies.append(server.free_at - now)
        if index % args.clicks == 0:
            firsts.append(server.free_at - now)
        end = max(end, server.free_at)
        if index + 1 < args.sessions * args.clicks:
            heapq.heappush(events, (server.free_at + thinks[user][index], user, index + 1))
    latencies.sort()
    return Result(
        replicas=replicas,
        routing=routing,
        clicks=len(latencies),
        hit_rate=hits / len(latencies),
        first_latency=statistics.fmean(firsts),
        mean_latency=statistics.fmean(latencies),
        p95_latency=latencies[int(0.95 * (len(latencies) - 1))],
        throughput=len(latencies) / end,
    )


def route(
    routing: str, picture: int, now: float, servers: list[Replica], sent: dict, rng: random.Random, args
) -> Replica:
    if routing == "random":
        return servers[rng.randrange(len(servers))]
    for s in servers:  # forget what a replica's LRU dropped
        if picture in s.reported and picture not in s.pictures:
            del s.reported[picture]
    holders = [s for s in servers if s.reported.get(picture, float("inf")) <= now]
    if routing == "multiplex":
        if holders:
            return rng.choice(holders)
        counts = [sum(1 for t in s.reported.values() if t <= now) for s in servers]
        fewest = min(counts)
        return servers[counts.index(fewest)]  # the same one for everything that arrives before a report
    if not holders and picture in sent and picture in sent[picture].pictures:
        holders = [sent[picture]]
    if holders:
        return rng.choice(holders)
    loads = {s.name: sum(1 for t in s.encodes if t > now) for s in servers}
    held = {s.name: sum(1 for t in s.reported.values() if t <= now) + loads[s.name] for s in servers}
    by_name = {s.name: s for s in servers}
    chosen = by_name[bounded_order(str(picture), list(by_name), loads, held=held)[0]]
    sent[picture] = chosen
    return chosen


def table(results: list[Result]) -> str:
    rows = [
        "| replicas | routing | cache hit rate | mean first click | mean click latency | p95 click latency | "
        "clicks/s served |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.replicas} | {r.routing} | {100 * r.hit_rate:.1f} % | {fmt(r.first_latency)} | "
            f"{fmt(r.mean_latency)} | {fmt(r.p95_latency)} | {r.throughput:.2f} |"
        )
    return "\n".join(rows)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32, help="people working at once (default 32)")
    parser.add_argument("--sessions", type=int, default=5, help="pictures each person annotates (default 5)")
    parser.add_argument("--clicks", type=int, default=20, help="clicks per picture (default 20)")
    parser.add_argument("--think", type=float, default=2.0, help="mean think time between clicks, s (default 2)")
    parser.add_argument("--pool", type=int, default=1000, help="pictures to choose from (default 1000)")
    parser.add_argument("--zipf", type=float, default=0.6, help="popularity exponent of the pool (default 0.6)")
    parser.add_argument("--cache", type=int, default=56, help="pictures per replica cache (1024 MB / 18 MB)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--gpu", action="store_true", help="GPU service times (an estimate) instead of CPU")
    parser.add_argument("--together", type=int, default=1, help="people who start at the same instant (default 1)")
    parser.add_argument("--report", type=float, default=0.1, help="s until a replica's new picture is known (0.1)")
    parser.add_argument("--routing", nargs="+", default=["random", "multiplex", "picture"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    costs = GPU if args.gpu else CPU
    results = [simulate(n, routing, args, costs) for n in args.replicas for routing in args.routing]
    device = "GPU (estimate)" if args.gpu else "CPU (docs/PERFORMANCE.md)"
    print(
        f"{device}: encode {fmt(costs['encode'])}, warm click {fmt(costs['click'])}; {args.users} users x "
        f"{args.sessions} pictures x {args.clicks} clicks, think {args.think} s, pool {args.pool} (Zipf {args.zipf}), "
        f"cache {args.cache} pictures per replica, {args.together} at a time, report after {args.report} s\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
