"""Pure arithmetic of the training benchmark's cost measurements (no Ray, no torch).

- The epoch sweep: wall time against epochs, fitted by a line per scheme: its intercept is the
  fixed cost, its slope the marginal cost of one more epoch.
- Where federated averaging pays: a model of the wall time against the round-trip time (RTT)
  between nodes, for Ray Train's DDP recipe (an all-reduce of the gradients every step) and for
  this project's job (a round through the aggregator and the shared storage every half epoch).
  It is a model fitted to the measured walls at RTT ~0 (one machine, loopback), not a measurement
  between nodes: wall(RTT) = measured wall + synchronisations x (hops x RTT / 2 + bytes / bandwidth).
"""
import math
import statistics
from dataclasses import asdict, dataclass


def line_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = intercept + slope * x (at least two distinct x)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"a line fit needs at least two distinct x values, got {list(xs)}")
    slope, intercept = statistics.linear_regression(xs, ys)
    return {"intercept": intercept, "slope": slope}


def epoch_costs(points: dict[str, dict[int, float]]) -> dict:
    """Per scheme ({epochs: seconds}): the fixed cost (intercept) and the marginal cost per epoch
    (slope) of a line fit, where a scheme has two or more epoch counts; and the issue's ratio of
    the job's growth to the plain anchor's, between the fewest and the most epochs both ran:
    (job@max - job@min) / (plain@max - plain@min)."""
    fits = {scheme: line_fit(sorted(by_epochs), [by_epochs[e] for e in sorted(by_epochs)])
            for scheme, by_epochs in points.items() if len(by_epochs) >= 2}
    summary = {"fits": fits}
    job, plain = points.get("job", {}), points.get("net_plain", {})
    common = sorted(set(job) & set(plain))
    if len(common) >= 2:
        low, high = common[0], common[-1]
        summary["growth_ratio"] = {"from_epochs": low, "to_epochs": high,
                                   "job_seconds": job[high] - job[low], "plain_seconds": plain[high] - plain[low],
                                   "ratio": (job[high] - job[low]) / (plain[high] - plain[low])}
    return summary


# ---------------------------------------------------------------- wall time against RTT

BITS = 8


@dataclass(frozen=True)
class Sync:
    """What one scheme sends over the network in a whole run: `count` synchronisations, each of
    `hops` one-way messages in sequence (each costs RTT/2) and `bytes_per_sync` over the busiest
    link; plus `extra_hops` one-way messages over the whole run."""
    count: int
    hops: float
    bytes_per_sync: float
    extra_hops: float = 0.0

    def seconds(self, rtt_s: float, bandwidth_bit_s: float) -> float:
        per_sync = self.hops * rtt_s / 2 + self.bytes_per_sync * BITS / bandwidth_bit_s
        return self.count * per_sync + self.extra_hops * rtt_s / 2


def ddp_sync(steps: int, epochs: int, workers: int, gradient_bytes: int, buffer_bytes: int) -> Sync:
    """Ray Train's DDP recipe (gloo): every step, one all-reduce of the gradients (one bucket:
    `Net`'s 0.7 MB fit DDP's first 25 MB bucket, and it is ready only when backward ends, so
    nothing overlaps it) as gloo's ring: 2(n-1) sequential hops, each node sending 2(n-1)/n of the
    bytes; and DDP's broadcast of the BatchNorm buffers from rank 0 before every forward (gloo's
    binomial tree: ceil(log2 n) hops). Every epoch a `ray.train.report` (a barrier through the
    controller: one round trip)."""
    if workers < 2:
        return Sync(count=0, hops=0, bytes_per_sync=0, extra_hops=2 * epochs)
    ring_hops = 2 * (workers - 1)
    broadcast_hops = math.ceil(math.log2(workers))
    sent = 2 * (workers - 1) / workers * gradient_bytes
    return Sync(count=steps, hops=ring_hops + broadcast_hops, bytes_per_sync=sent + buffer_bytes,
                extra_hops=2 * epochs)


def job_round_trips(partial_saves: int) -> int:
    """Round trips in one round of the job, counting every file operation on the shared storage
    (NFS) and every call as one, in the order a worker meets them (training/worker.py, with the
    weights through Ray's object store, issue 28): save its state atomically (create, write,
    rename: 3), drop its partial file (1), send its weights to the aggregator and wait for its
    answer (1), which comes once the last worker's weights are in and the average is saved as the
    round's checkpoint (3); fetch the average from the object store (1); the report's barrier
    through Ray Train's controller (1). Each mid-round checkpoint (--checkpoint-steps) is another
    atomic write (3). A deliberately generous count."""
    return 3 + 1 + 1 + 3 + 1 + 1 + 3 * partial_saves


def job_sync(rounds: int, workers: int, weight_bytes: int, state_bytes: int, partial_saves_per_round: int) -> Sync:
    """This project's job: `rounds` rounds of `job_round_trips` round trips each, and every byte of a
    round counted over one link (as if the storage server and the aggregator shared a node and every
    worker sat elsewhere): n worker states saved (`state_bytes`: weights, Adam's moments, the
    schedule) at the round's end and at each mid-round checkpoint, n weights to the aggregator and
    the average back to n workers, and the average saved once."""
    saves = 1 + partial_saves_per_round
    moved = workers * (saves * state_bytes + 2 * weight_bytes) + weight_bytes
    return Sync(count=rounds, hops=2 * job_round_trips(partial_saves_per_round), bytes_per_sync=moved)


def rtt_model(job_wall: float, job: Sync, ddp_wall: float, ddp: Sync, bandwidth_bit_s: float,
              rtts_ms: list[float]) -> dict:
    """Wall time of both schemes against the RTT, and the RTT from which the job is faster.
    Both walls are linear in the RTT, wall = a + b x RTT, so the crossing is (a_job - a_ddp) /
    (b_ddp - b_job): 0 where the job is already faster on loopback, None where it never is."""
    def wall(base, sync, rtt_ms):
        return base + sync.seconds(rtt_ms / 1000, bandwidth_bit_s)

    a_job, a_ddp = wall(job_wall, job, 0), wall(ddp_wall, ddp, 0)
    b_job, b_ddp = wall(job_wall, job, 1) - a_job, wall(ddp_wall, ddp, 1) - a_ddp  # seconds per ms
    if a_job <= a_ddp:
        crossing = 0.0
    elif b_ddp > b_job:
        crossing = (a_job - a_ddp) / (b_ddp - b_job)
    else:
        crossing = None
    return {"bandwidth_bit_s": bandwidth_bit_s, "job_sync": asdict(job), "ddp_sync": asdict(ddp),
            "rtt_ms": list(rtts_ms), "job_seconds": [wall(job_wall, job, r) for r in rtts_ms],
            "ddp_seconds": [wall(ddp_wall, ddp, r) for r in rtts_ms], "job_faster_from_rtt_ms": crossing}
