"""Pick a job's training precision and torch threads by timing the real training step, once per job.

CPU flags do not predict speed: bf16 autocast is faster than fp32 on some CPUs with native bf16,
slower on others that have it, and far slower where it is emulated (docs/BENCHMARKS.md has the
measurements). So the job times a few warm steps of its own model on its own data in every
candidate setting and keeps the fastest, unless that is within the margin of the simplest setting
(fp32, fewest threads), which then wins.

One decision per job: rank 0 decides (see decide()) and every worker trains in that setting, so a
job never mixes precisions and a seeded run is reproducible. The decision is cached on the shared
storage per (CPU, torch version, batch size, threads): a repeated job skips the timing and trains
exactly as the last one did (`--recalibrate` times again; `python -m training.calibration --clear`
drops the cache).

Two stages keep the timing short:
1. a screen at a tiny batch drops candidates several times slower than the fastest (emulated bf16
   can cost a second per full step, so it must not get one); the reference (fp32) always stays;
2. the survivors take warm steps at the real batch size, interleaved, so a burst of contention hits
   every candidate alike, and are compared by their medians: one slow sample cannot flip the choice.
"""
import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

SCREEN_BATCH = 8
SCREEN_STEPS = 3    # per candidate, interleaved; the fastest counts
SCREEN_DROP = 3.0   # screened out if this many times slower than the fastest candidate (emulated bf16: ~9x)
TIMED_STEPS = 5     # per surviving candidate at the real batch, after one warm-up step
MARGIN = 0.10       # a later candidate's median must beat the current choice's by more than this fraction
CACHE_VERSION = 2   # bump when the rule changes, so older decisions are not reused


def setting_name(precision: str, threads: int) -> str:
    return f"{precision}x{threads}"


def candidates(requested_precision: str, max_threads: int, threads: int | None = None) -> list[tuple[str, int]]:
    """(precision, threads) settings to try, simplest first: fp32 before bf16, fewer threads first.
    `threads` pins the thread count (--threads)."""
    precisions = ("fp32", "bf16") if requested_precision == "auto" else (requested_precision,)
    counts = [threads] if threads else sorted({1, max(1, max_threads)})
    return [(p, t) for p in precisions for t in counts]


def choose_setting(timings: dict[tuple[str, int], list[float]], margin: float = MARGIN) -> tuple[str, int]:
    """The setting to train in, from step times per candidate (seconds; any order of samples).

    Candidates are considered simplest first (fp32 before bf16, fewer threads first); a later one
    replaces the current choice only if its median step beats the choice's median by more than
    `margin`. Medians of interleaved samples: contention in one sample moves neither. A pure function."""
    order = sorted(timings, key=lambda s: (s[0] != "fp32", s[1]))
    chosen = order[0]
    for candidate in order[1:]:
        if statistics.median(timings[candidate]) < statistics.median(timings[chosen]) * (1 - margin):
            chosen = candidate
    return chosen


def calibrate(step: Callable[[str, int], None], settings: list[tuple[str, int]], batch_size: int,
              set_threads: Callable[[int], None], clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time `step(precision, batch)` in each setting and choose one. `set_threads` switches torch's
    intra-op threads. Returns the choice and every timing in ms (for the metadata)."""
    started = clock()

    def timed(setting, batch):
        set_threads(setting[1])
        begin = clock()
        step(setting[0], batch)
        return clock() - begin

    screen, timings = {}, {}
    if len(settings) > 1:
        for setting in settings:
            timed(setting, SCREEN_BATCH)  # warm-up
        samples = {s: [] for s in settings}
        for _ in range(SCREEN_STEPS):
            for setting in settings:
                samples[setting].append(timed(setting, SCREEN_BATCH))
        screen = {s: min(ts) for s, ts in samples.items()}
        fastest = min(screen.values())
        settings = [settings[0]] + [s for s in settings[1:] if screen[s] <= SCREEN_DROP * fastest]  # keep fp32
    if len(settings) > 1:
        for setting in settings:
            timed(setting, batch_size)  # warm-up at the real shapes (oneDNN builds its primitives)
        timings = {s: [] for s in settings}
        for _ in range(TIMED_STEPS):
            for setting in settings:  # interleaved: contention hits every candidate alike
                timings[setting].append(timed(setting, batch_size))
        chosen = choose_setting(timings)
    else:
        chosen = settings[0]
    set_threads(chosen[1])
    return {"precision": chosen[0], "threads": chosen[1],
            "screen_ms": {setting_name(*s): round(1000 * t, 2) for s, t in screen.items()},
            "step_ms": {setting_name(*s): [round(1000 * t, 2) for t in ts] for s, ts in timings.items()},
            "batch_size": batch_size, "seconds": round(clock() - started, 3)}


# ---------------------------------------------------------------- the cache on shared storage

def cpu_model() -> str:
    """The CPU's model name and a digest of the flags that decide bf16's speed: a VM may call both
    a Zen 4 with AVX512_BF16 and an AVX2-only guest just "AMD EPYC"."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(f for f in value.split() if f.startswith(("avx", "amx"))))
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} [{hashlib.sha256(flags.encode()).hexdigest()[:8]}]"


def cache_key(requested: str, batch_size: int, max_threads: int, threads: int | None) -> dict:
    import torch

    return {"cpu": cpu_model(), "torch": torch.__version__, "batch_size": batch_size,
            "requested": requested, "max_threads": max_threads, "threads": threads, "rule": CACHE_VERSION}


def cache_dir(storage: Path) -> Path:
    return Path(storage) / "calibration"


def cache_path(storage: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(storage) / f"{digest}.json"


def cached_decision(storage: Path, key: dict) -> dict | None:
    """The cached decision for exactly this key; None if absent or unreadable (then time again)."""
    try:
        entry = json.loads(cache_path(storage, key).read_text())
    except (OSError, ValueError):
        return None
    return entry.get("decision") if entry.get("key") == key else None


def save_decision(storage: Path, key: dict, decision: dict) -> None:
    from training.storage import atomic_write_json

    atomic_write_json(cache_path(storage, key), {"key": key, "decision": decision})


def clear_cache(storage: Path) -> int:
    """Drop every cached decision; the number dropped."""
    folder = cache_dir(storage)
    count = len(list(folder.glob("*.json"))) if folder.is_dir() else 0
    shutil.rmtree(folder, ignore_errors=True)
    return count


def decide(storage: Path, run_decision: Path, requested: str, batch_size: int, max_threads: int,
           threads: int | None, recalibrate: bool, measure: Callable[[list[tuple[str, int]]], dict]) -> dict:
    """The job's one setting: the run's own earlier decision (a restarted worker group trains as
    before), else a fixed request (--precision and --threads given: nothing to time), else the cache
    (unless `recalibrate`), else `measure(candidates)`, which is then cached. Saved for the run."""
    from training.storage import atomic_write_json

    if run_decision.exists():
        return json.loads(run_decision.read_text())
    settings = candidates(requested, max_threads, threads)
    key = cache_key(requested, batch_size, max_threads, threads)
    if len(settings) == 1:
        decision = {"precision": settings[0][0], "threads": settings[0][1], "source": "requested"}
    elif not recalibrate and (hit := cached_decision(storage, key)):
        decision = {**hit, "source": f"cache {cache_path(storage, key).name}"}
    else:
        decision = {**measure(settings), "source": "measured", "cpu": key["cpu"], "torch": key["torch"]}
        save_decision(storage, key, {k: v for k, v in decision.items() if k != "source"})
    atomic_write_json(run_decision, decision)
    return decision


def main(argv=None) -> int:
    from training.storage import resolve_storage

    parser = argparse.ArgumentParser(description="The training precision decisions cached in <storage>/calibration.")
    parser.add_argument("--storage", help="storage root (default $MNIST_STORAGE or ./storage)")
    parser.add_argument("--clear", action="store_true", help="drop every cached decision: the next job times again")
    args = parser.parse_args(argv)
    storage = resolve_storage(args.storage)
    if args.clear:
        print(f"dropped {clear_cache(storage)} cached decision(s) from {cache_dir(storage)}")
        return 0
    for path in sorted(cache_dir(storage).glob("*.json")):
        entry = json.loads(path.read_text())
        print(f"{path.name}: {entry['decision']['precision']} x{entry['decision']['threads']}  {entry['key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
