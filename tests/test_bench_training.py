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
    # --epochs 1,2: the default job is the sweep's 1-epoch job, and the DDP recipe beside it its DDP run
    code = bench_training.main(["--storage", str(mnist_storage), "--out", str(tmp_path), *SMOKE,
                                "--job-args", "--subset 600 --epochs 1 --rounds 2", "--epochs", "1,2"])
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
    # Ray Train's DDP recipe, beside the job: the same workers, epochs, precision and images
    ddp = results["ddp"]
    assert (ddp["workers"], ddp["epochs"], ddp["precision"]) == (3, 1, results["job"]["precision"])
    assert ddp["steps"] == 2 and 0 < ddp["test_accuracy"] <= 1 and ddp["allreduce_ms_median"] > 0
    assert 0 < ddp["job_end_seconds"] <= ddp["seconds"]
    assert "Default job / Ray Train DDP recipe" in report
    # the epoch sweep: the job and Net plain at 1 and 2 epochs, in the job's precision; DDP at 1
    sweep = json.loads((tmp_path / "training_epochs.json").read_text())
    assert [run["epochs"] for run in sweep["runs"]] == [1, 2]
    one, two = sweep["runs"]
    assert one["job"] == results["job"] and one["ddp"] == ddp and "ddp" not in two
    assert two["job"]["epochs"] == 2 and two["job"]["rounds"] == 2
    assert [run["net_plain"]["epochs"] for run in sweep["runs"]] == [1, 2]
    assert all(run["net_plain"]["precision"] == run["job"]["precision"] for run in sweep["runs"])
    assert {"job", "net_plain"} <= sweep["costs"]["fits"].keys() and "growth_ratio" in sweep["costs"]
    assert "Job growth / Net plain growth" in (tmp_path / "training_epochs.md").read_text()
    # the RTT model, from the measured job and DDP rows
    rtt = json.loads((tmp_path / "training_rtt.json").read_text())
    assert rtt["measured"]["job_seconds"] == results["job"]["seconds"] and rtt["ddp_sync"]["count"] == 2
    assert len(rtt["job_seconds"]) == len(rtt["ddp_seconds"]) == len(rtt["rtt_ms"])
    assert all((tmp_path / name).stat().st_size > 0 for name in ("training_epochs.png", "training_rtt.png"))


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
