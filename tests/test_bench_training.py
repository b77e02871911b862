"""Smoke test: the training benchmark still runs end to end (tiny sizes; figures are not checked)."""
import json

import pytest

from bench import bench_training, train_floor
from training.versions import read_latest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# The one-process references on 300 images (3 steps per epoch, 1 per seed worker) evaluated on 1,000
# test images: on all 10,000, the seed network's evaluations took most of the references' time.
SMOKE = ("--baseline-subset", "300", "--test-subset", "1000")


def test_training_benchmark_runs_and_writes_its_report(ray_head, mnist_storage, tmp_path):
    code = bench_training.main(["--storage", str(mnist_storage), "--out", str(tmp_path), *SMOKE,
                                "--job-args", "--subset 600 --epochs 1 --rounds 2"])
    assert code == 0
    results = json.loads((tmp_path / "training.json").read_text())
    assert {"baseline", "net_plain", "seed", "job", "job_fp32", "machine"} <= results.keys()
    assert results["net_plain"]["precision"] in ("fp32", "bf16") and results["net_plain"]["calibration"]["screen_ms"]
    assert "flags" in results["machine"] and "cores" in results["machine"]
    assert results["job"]["rounds"] == 2 and len(results["job"]["round_accuracy"]) == 2
    assert results["job_fp32"]["precision"] == "fp32"  # the default job itself where auto chose fp32
    assert all(0 < results[k]["test_accuracy"] <= 1 for k in ("baseline", "net_plain", "seed", "job", "job_fp32"))
    assert all(0 < results[k]["job_end_seconds"] <= results[k]["seconds"] for k in ("job", "job_fp32"))
    report = (tmp_path / "training.md").read_text()
    assert "time / baseline" in report and "Default job / Net plain" in report
    assert (tmp_path / "training_accuracy.png").stat().st_size > 0


def test_floor_benchmark_times_ray_train_without_training_beside_the_anchor(ray_head, mnist_storage, tmp_path):
    serving_before = read_latest(mnist_storage)
    code = bench_training.main(["--floor", "--storage", str(mnist_storage), "--out", str(tmp_path),
                                *SMOKE])
    assert code == 0
    [run] = json.loads((tmp_path / "training_floor.json").read_text())["sets"]
    # The floor job ran Ray Train (its run state is on the storage root); Ray recorded its end
    # before its `ray job submit` returned.
    assert any((mnist_storage / train_floor.FLOOR_DIR).iterdir())
    assert 0 < run["floor"]["job_end_seconds"] <= run["floor"]["seconds"]
    # The real job on 300 images: 3 workers, 2 rounds, published, and not served (--promote never).
    assert run["job_tiny"]["workers"] == 3 and run["job_tiny"]["rounds"] == 2
    assert read_latest(mnist_storage) == serving_before
    ratios = bench_training.floor_ratios(run)
    assert ratios["Ray floor / Net plain"] == run["floor"]["seconds"] / run["net_plain"]["seconds"]
    assert "| **median** |" in (tmp_path / "training_floor.md").read_text()
