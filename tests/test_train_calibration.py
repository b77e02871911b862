"""--precision auto decides by timing: the decision logic with injected timings (no torch, no Ray),
and one real calibration of Net on this CPU. The workers' allocator setting (page faults per step)."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import calibration
from training.calibration import calibrate, candidates, choose_setting

FP32, BF16 = ("fp32", 1), ("bf16", 1)


@pytest.mark.parametrize("timings, expected", [
    ({FP32: [0.070, 0.071], BF16: [0.041, 0.042]}, BF16),   # AMD EPYC Zen 4: bf16 1.7x faster
    ({FP32: [0.066, 0.071], BF16: [0.084, 0.085]}, FP32),   # Intel Xeon, AVX512_BF16 without AMX: slower
    ({FP32: [0.155, 0.160], BF16: [1.350, 1.380]}, FP32),   # AVX2 only: bf16 emulated, ~9x slower
    ({FP32: [0.070, 0.070], BF16: [0.066, 0.066]}, FP32),   # 6% faster: within the 10% noise floor
    ({FP32: [0.070, 0.070], BF16: [0.055, 0.090]}, FP32),   # 21% faster at best, but its samples spread 64%
    ({FP32: [0.070]}, FP32),                                 # one candidate (--precision fp32)
])
def test_the_faster_precision_wins_only_beyond_noise(timings, expected):
    assert choose_setting(timings) == expected


def test_threads_are_chosen_by_the_same_measurement():
    two_threads_help = {("fp32", 1): [0.070, 0.070], ("fp32", 2): [0.040, 0.041],
                        ("bf16", 1): [0.045, 0.046], ("bf16", 2): [0.030, 0.031]}
    assert choose_setting(two_threads_help) == ("bf16", 2)
    two_threads_barely_help = {("fp32", 1): [0.070, 0.070], ("fp32", 2): [0.066, 0.066]}
    assert choose_setting(two_threads_barely_help) == ("fp32", 1)  # fewer threads within noise


def test_the_order_of_samples_and_candidates_does_not_matter():
    timings = {BF16: [0.042, 0.041], FP32: [0.071, 0.070]}
    assert choose_setting(timings) == choose_setting(dict(reversed(list(timings.items())))) == BF16


@pytest.mark.parametrize("requested, max_threads, expected", [
    ("auto", 1, [FP32, BF16]),
    ("auto", 2, [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]),
    ("fp32", 1, [FP32]),
    ("bf16", 4, [("bf16", 1), ("bf16", 4)]),
])
def test_candidates_follow_the_request_and_the_workers_cpus(requested, max_threads, expected):
    assert candidates(requested, max_threads) == expected


class FakeStep:
    """A training step whose cost per image is injected per setting; a fake clock adds it up."""

    def __init__(self, seconds_per_image: dict):
        self.seconds_per_image, self.now, self.threads, self.calls = seconds_per_image, 0.0, 1, []

    def clock(self):
        return self.now

    def set_threads(self, threads):
        self.threads = threads

    def __call__(self, precision, batch):
        self.calls.append((precision, self.threads, batch))
        self.now += self.seconds_per_image[(precision, self.threads)] * batch


def test_calibrate_times_close_candidates_at_the_real_batch_and_records_it():
    fake = FakeStep({FP32: 0.0007, BF16: 0.0004})
    result = calibrate(fake, [FP32, BF16], 100, fake.set_threads, clock=fake.clock)
    assert (result["precision"], result["threads"]) == ("bf16", 1)
    assert result["step_ms"] == {"fp32x1": [70.0, 70.0], "bf16x1": [40.0, 40.0]}
    assert result["screen_ms"] == {"fp32x1": pytest.approx(5.6), "bf16x1": pytest.approx(3.2)}
    assert sum(1 for _, _, batch in fake.calls if batch == 100) == 2 * (1 + calibration.TIMED_STEPS)


def test_calibrate_screens_out_a_clearly_slower_candidate_before_any_full_step():
    fake = FakeStep({FP32: 0.0015, BF16: 0.0135})  # emulated bf16: ~1.35 s per step of 100
    result = calibrate(fake, [FP32, BF16], 100, fake.set_threads, clock=fake.clock)
    assert (result["precision"], result["threads"]) == ("fp32", 1)
    assert ("bf16", 1, 100) not in fake.calls  # never paid a full emulated step
    assert result["step_ms"] == {} and set(result["screen_ms"]) == {"fp32x1", "bf16x1"}


def test_calibrate_leaves_the_chosen_threads_set():
    fake = FakeStep({("fp32", 1): 0.0007, ("fp32", 2): 0.0004})
    result = calibrate(fake, [("fp32", 1), ("fp32", 2)], 100, fake.set_threads, clock=fake.clock)
    assert result["threads"] == fake.threads == 2


def test_a_single_candidate_costs_no_steps():
    fake = FakeStep({FP32: 0.0007})
    result = calibrate(fake, [FP32], 100, fake.set_threads, clock=fake.clock)
    assert (result["precision"], result["threads"], fake.calls) == ("fp32", 1, [])


def test_real_calibration_of_net_on_this_cpu_leaves_the_model_untouched():
    from training import worker as train  # the worker half of train.py, where calibrate_worker now lives

    torch.manual_seed(0)
    model = train.Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (100,))
    config = {"lr": 5e-3, "batch_size": 100, "precision": "auto", "threads": 1}
    threads = torch.get_num_threads()
    try:
        result = train.calibrate_worker(model, images, labels, config)
    finally:
        torch.set_num_threads(threads)
    assert result["precision"] in ("fp32", "bf16") and result["threads"] == 1
    assert set(result["screen_ms"]) == {"fp32x1", "bf16x1"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


FAULTS_PER_STEP = """
import resource, sys, torch
from training.allocator import keep_freed_memory
from training.model import Net
from training.worker import WorkerState, new_progress, train_step
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
state = WorkerState.fresh("faults", 0, Net(), lr=1e-3, total_steps=100)
images, labels = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (100,))
def step():
    train_step(state.model, state.optimizer, state.schedule, images, labels, new_progress(), "fp32")
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_allocator_setting_stops_the_page_faults_of_every_step():
    """Untuned, glibc hands a step's freed buffers back to the kernel, and the next step faults
    them in again (8,000-14,000 page faults per step of Net, batch 100, on an AMD EPYC);
    keep_freed_memory keeps them (~200-370). Each setting in its own fresh process."""
    def faults(setting: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, setting], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
        return out[0], float(out[1])

    (untuned_flag, untuned), (tuned_flag, tuned) = faults("default"), faults("tuned")
    assert (untuned_flag, tuned_flag) == ("False", "True")
    assert tuned * 5 < untuned, (tuned, untuned)
