"""Pick a worker's training precision and torch threads by timing the real training step.

CPU flags do not predict speed: on an Intel Xeon with AVX512_BF16 (no AMX) a bf16-autocast step
of Net took 84 ms against 66-71 ms in fp32; on an AMD EPYC Zen 4 bf16 was ~1.7x faster; on an
AMD EPYC VM that exposes only AVX2, bf16 was ~9x slower. So each worker times a few warm steps
of its own model on its own data in every candidate setting and keeps the fastest, unless that
is within noise of the simplest setting (fp32, fewest threads), which then wins.

Two stages keep the cost low (well under a second where the candidates are close):
1. a screen at a tiny batch drops candidates that are clearly slower than the fastest
   (emulated bf16 can cost a second per full step, so it must not get one); the simplest
   setting, the reference, always stays;
2. the survivors take warm steps at the real batch size, interleaved, so a burst of contention
   from other processes hits every candidate alike.
"""
import time
from typing import Callable

SCREEN_BATCH = 8
SCREEN_DROP = 1.5   # screened out if this many times slower than the fastest candidate
TIMED_STEPS = 2     # per surviving candidate at the real batch, after one warm-up step
NOISE_FLOOR = 0.10  # a faster candidate must beat the simpler one by more than this fraction


def setting_name(precision: str, threads: int) -> str:
    return f"{precision}x{threads}"


def candidates(requested_precision: str, max_threads: int) -> list[tuple[str, int]]:
    """(precision, threads) settings to try, simplest first: fp32 before bf16, fewer threads first."""
    precisions = ("fp32", "bf16") if requested_precision == "auto" else (requested_precision,)
    threads = sorted({1, max(1, max_threads)})
    return [(p, t) for p in precisions for t in threads]


def relative_spread(samples: list[float]) -> float:
    """How far a setting's samples spread above their best: (median - min) / min."""
    ordered = sorted(samples)
    return (ordered[len(ordered) // 2] - ordered[0]) / ordered[0]


def choose_setting(timings: dict[tuple[str, int], list[float]],
                   noise_floor: float = NOISE_FLOOR) -> tuple[str, int]:
    """The setting to train in, from step times per candidate (seconds; any order of samples).

    Candidates are considered simplest first (fp32 before bf16, fewer threads first); a later one
    replaces the current choice only if its best step beats the choice's best by more than the
    noise: the larger of `noise_floor` and the spread of either's samples. A pure function."""
    order = sorted(timings, key=lambda s: (s[0] != "fp32", s[1]))
    chosen = order[0]
    for candidate in order[1:]:
        noise = max(noise_floor, relative_spread(timings[chosen]), relative_spread(timings[candidate]))
        if min(timings[candidate]) < min(timings[chosen]) * (1 - noise):
            chosen = candidate
    return chosen


def calibrate(step: Callable[[str, int], None], settings: list[tuple[str, int]], batch_size: int,
              set_threads: Callable[[int], None], clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time `step(precision, batch)` in each setting and choose one. `set_threads` switches torch's
    intra-op threads. Returns the choice and every timing in ms (for the worker files and metadata)."""
    started = clock()

    def timed(setting, batch):
        set_threads(setting[1])
        begin = clock()
        step(setting[0], batch)
        return clock() - begin

    screen, timings = {}, {}
    if len(settings) > 1:
        for setting in settings:  # warm-up, then the screened step
            timed(setting, SCREEN_BATCH)
            screen[setting] = timed(setting, SCREEN_BATCH)
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
