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

Routing: `random` sends every click to a uniformly chosen replica (what a load balancer without affinity
does). `digest` is what Ray Serve's multiplexed routing does with the picture's digest as the model id: a
replica that holds the id, else the replica holding the fewest ids (ties at random); a replica holds the
ids of its last `cache` pictures (LRU, `max_num_models_per_replica`).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field

CPU = {"encode": 9.65 - 0.087, "click": 0.087}  # docs/PERFORMANCE.md, measured (ViT-B, 2 cores, float32)
GPU = {"encode": 0.025, "click": 0.008}  # estimate: see docs/SCALING.md


@dataclass
class Replica:
    capacity: int
    free_at: float = 0.0
    pictures: OrderedDict = field(default_factory=OrderedDict)

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
    mean_latency: float
    p95_latency: float
    throughput: float  # clicks answered per second of simulated time


def zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


def simulate(replicas: int, routing: str, args: argparse.Namespace, costs: dict[str, float]) -> Result:
    rng = random.Random(args.seed)  # the same people, pictures and think times for every configuration
    route_rng = random.Random(args.seed + 1)
    servers = [Replica(args.cache) for _ in range(replicas)]
    weights = zipf_weights(args.pool, args.zipf)
    plans = [[rng.choices(range(args.pool), weights)[0] for _ in range(args.sessions)] for _ in range(args.users)]
    thinks = [[rng.expovariate(1 / args.think) for _ in range(args.sessions * args.clicks)] for _ in range(args.users)]
    events = [(rng.uniform(0, args.think), user, 0) for user in range(args.users)]  # (time, user, click index)
    heapq.heapify(events)
    latencies, hits, end = [], 0, 0.0
    while events:
        now, user, index = heapq.heappop(events)
        picture = plans[user][index // args.clicks]
        if routing == "random":
            server = servers[route_rng.randrange(replicas)]
        else:
            holders = [s for s in servers if picture in s.pictures]
            if not holders:
                fewest = min(len(s.pictures) for s in servers)
                holders = [s for s in servers if len(s.pictures) == fewest]
            server = route_rng.choice(holders)
        hit = server.serve(picture)
        hits += hit
        start = max(now, server.free_at)
        server.free_at = start + costs["click"] + (0.0 if hit else costs["encode"])
        latencies.append(server.free_at - now)
        end = max(end, server.free_at)
        if index + 1 < args.sessions * args.clicks:
            heapq.heappush(events, (server.free_at + thinks[user][index], user, index + 1))
    latencies.sort()
    return Result(
        replicas=replicas,
        routing=routing,
        clicks=len(latencies),
        hit_rate=hits / len(latencies),
        mean_latency=statistics.fmean(latencies),
        p95_latency=latencies[int(0.95 * (len(latencies) - 1))],
        throughput=len(latencies) / end,
    )


def table(results: list[Result]) -> str:
    rows = [
        "| replicas | routing | cache hit rate | mean click latency | p95 click latency | clicks/s served |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.replicas} | {r.routing} | {100 * r.hit_rate:.1f} % | {fmt(r.mean_latency)} | "
            f"{fmt(r.p95_latency)} | {r.throughput:.2f} |"
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    costs = GPU if args.gpu else CPU
    results = [simulate(n, routing, args, costs) for n in args.replicas for routing in ("random", "digest")]
    device = "GPU (estimate)" if args.gpu else "CPU (docs/PERFORMANCE.md)"
    print(
        f"{device}: encode {fmt(costs['encode'])}, warm click {fmt(costs['click'])}; {args.users} users x "
        f"{args.sessions} pictures x {args.clicks} clicks, think {args.think} s, pool {args.pool} (Zipf {args.zipf}), "
        f"cache {args.cache} pictures per replica\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
