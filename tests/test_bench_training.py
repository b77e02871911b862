"""Smoke test: the training benchmark still runs end to end (tiny sizes; figures are not checked)."""
import json

import pytest

from bench import bench_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_training_benchmark_runs_and_writes_its_report(ray_head, mnist_storage, tmp_path):
    code = bench_training.main(["--storage", str(mnist_storage), "--out", str(tmp_path), "--baseline-subset", "600",
                                "--job-args", "--subset 600 --epochs 1 --rounds 2"])
    assert code == 0
    results = json.loads((tmp_path / "training.json").read_text())
    assert {"baseline", "net_plain", "seed", "job", "job_fp32", "machine"} <= results.keys()
    assert results["net_plain"]["precision"] in ("fp32", "bf16") and results["net_plain"]["calibration"]["screen_ms"]
    assert "flags" in results["machine"] and "cores" in results["machine"]
    assert results["job"]["rounds"] == 2 and len(results["job"]["round_accuracy"]) == 2
    assert results["job_fp32"]["precision"] == "fp32"
    assert all(0 < results[k]["test_accuracy"] <= 1 for k in ("baseline", "net_plain", "seed", "job", "job_fp32"))
    assert all(0 < results[k]["job_end_seconds"] <= results[k]["seconds"] for k in ("job", "job_fp32"))
    report = (tmp_path / "training.md").read_text()
    assert "time / baseline" in report and "Default job / Net plain" in report
    assert (tmp_path / "training_accuracy.png").stat().st_size > 0
