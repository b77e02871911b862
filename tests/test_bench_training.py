"""Smoke test: the training benchmark still runs end to end (tiny sizes; figures are not checked)."""
import json

import pytest

from bench import bench_training, train_floor

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# The one-process references on 300 images (3 steps per epoch, 1 per seed worker) evaluated on 1,000
# test images: on all 10,000, the seed network's evaluations took most of the references' time.
SMOKE = ("--baseline-subset", "300", "--test-subset", "1000")


def test_training_benchmark_runs_and_writes_its_report(ray_head, mnist_storage, tmp_path):
    """The default run, for real: both baselines, the job, the seed scheme, Ray Train's DDP recipe
    beside the job, and the RTT model from the two. (The epoch sweep's own bookkeeping is tested
    below without Ray: its runs are these same `ray_job` and `ddp_job` calls.) The job trains in
    fp32, so that it is also the fp32 row on every CPU: where `auto` chooses bf16, the extra fp32 job
    the benchmark then runs is the same `ray_job` call, and the sweep's test below checks it is made."""
    code = bench_training.main(["--storage", str(mnist_storage), "--out", str(tmp_path), *SMOKE,
                                "--job-args", "--subset 600 --epochs 1 --rounds 2 --precision fp32"])
    assert code == 0
    results = json.loads((tmp_path / "training.json").read_text())
    assert {"baseline", "net_plain", "seed", "job", "job_fp32", "machine"} <= results.keys()
    assert results["net_plain"]["precision"] in ("fp32", "bf16") and results["net_plain"]["calibration"]["screen_ms"]
    assert "flags" in results["machine"] and "cores" in results["machine"]
    assert results["job"]["rounds"] == 2 and len(results["job"]["round_accuracy"]) == 2
    assert results["job_fp32"] == results["job"] and results["job"]["precision"] == "fp32"  # not run twice
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
    assert not (tmp_path / "training_epochs.json").exists()  # no --epochs, no sweep
    # the RTT model, from the measured job and DDP rows
    rtt = json.loads((tmp_path / "training_rtt.json").read_text())
    assert rtt["measured"]["job_seconds"] == results["job"]["seconds"] and rtt["ddp_sync"]["count"] == 2
    assert len(rtt["job_seconds"]) == len(rtt["ddp_seconds"]) == len(rtt["rtt_ms"])
    assert (tmp_path / "training_rtt.png").stat().st_size > 0


class Measured:
    """The benchmark's measured rows, made up and recorded: the orchestration around them under
    test, without a cluster. Times grow by epoch so that the line fits have something to fit."""

    def __init__(self, precision: str):
        self.precision, self.calls = precision, []

    def job(self, storage, *train_args):
        epochs = bench_training.job_config(list(train_args)).epochs
        self.calls.append(("job", epochs))
        return {"scheme": "job", "seconds": 30.0 + 10 * epochs, "job_end_seconds": 29.0 + 10 * epochs,
                "test_accuracy": 0.95, "workers": 3, "rounds": 2, "epochs": epochs, "precision": self.precision,
                "threads": 1, "round_accuracy": [0.9, 0.95], "aggregate_seconds": [1.0, 1.0],
                "job_internal_seconds": 20.0 + 10 * epochs}

    def ddp(self, storage, job_args, epochs, precision, threads=None):
        self.calls.append(("ddp", epochs, precision))
        return {"scheme": "ddp", "seconds": 28.0 + 11 * epochs, "job_end_seconds": 27.0 + 11 * epochs,
                "test_accuracy": 0.95, "epochs": epochs, "precision": precision, "workers": 3, "steps": 2 * epochs,
                "train_seconds": 11.0 * epochs, "gradient_bytes": 4_800_000, "buffer_bytes": 0,
                "allreduce_ms_median": 2.0}

    def net_plain(self, train, test, epochs=2, precision=None):
        self.calls.append(("net_plain", epochs, precision))
        return {"scheme": "Net plain", "seconds": 8.0 * epochs, "test_accuracy": 0.96, "epochs": epochs,
                "precision": precision or self.precision, "calibration": {"screen_ms": {}}}

    def reference(self, train, test):
        return {"scheme": "reference", "seconds": 20.0, "test_accuracy": 0.9}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_epoch_sweep_runs_each_point_once_in_the_jobs_precision(mnist_storage, tmp_path, monkeypatch, precision):
    measured = Measured(precision)
    for name, fake in (("ray_job", measured.job), ("ddp_job", measured.ddp), ("net_plain", measured.net_plain),
                       ("baseline", measured.reference), ("seed_scheme", measured.reference)):
        monkeypatch.setattr(bench_training, name, fake)
    monkeypatch.setattr(bench_training.local, "up", lambda: False)  # the cluster, not needed here
    code = bench_training.main(["--storage", str(mnist_storage), "--out", str(tmp_path), *SMOKE,
                                "--job-args", "--subset 600 --epochs 1 --rounds 2", "--epochs", "1,2,4"])
    assert code == 0
    # The default job (1 epoch) is the sweep's first point, not run again; DDP beside it only (the
    # default --ddp-epochs); Net plain at every other epoch count, in the job's precision (its
    # default row, 2 epochs in the precision it chose, is reused where that is the job's).
    fp32_job = [("job", 1)] if precision == "bf16" else []
    plain = [("net_plain", 2, None), ("net_plain", 1, precision), ("net_plain", 4, precision)]
    assert sorted(measured.calls, key=str) == sorted([("job", 1), *fp32_job, ("ddp", 1, precision), ("job", 2),
                                                      ("job", 4), *plain], key=str)
    sweep = json.loads((tmp_path / "training_epochs.json").read_text())
    assert [run["epochs"] for run in sweep["runs"]] == [1, 2, 4]
    assert [run["job"]["seconds"] for run in sweep["runs"]] == [40.0, 50.0, 70.0]
    assert "ddp" in sweep["runs"][0] and not any("ddp" in run for run in sweep["runs"][1:])
    fits = sweep["costs"]["fits"]
    assert fits["job"]["slope"] == pytest.approx(10) and fits["job"]["intercept"] == pytest.approx(30)
    assert fits["net_plain"]["slope"] == pytest.approx(8) and "ddp" not in fits  # one DDP point: no line
    growth = sweep["costs"]["growth_ratio"]
    assert (growth["from_epochs"], growth["to_epochs"], growth["ratio"]) == (1, 4, pytest.approx(30 / 24))
    report = (tmp_path / "training_epochs.md").read_text()
    assert "Job growth / Net plain growth, 1 -> 4 epochs" in report and "| 4 | 70.0 |" in report
    assert (tmp_path / "training_epochs.png").stat().st_size > 0


def test_floor_benchmark_times_ray_train_without_training_beside_the_anchor(ray_head, mnist_storage, tmp_path,
                                                                          monkeypatch):
    """The floor script under Ray Train and the Net plain anchor, for real; the job on 300 images
    is the same `ray_job` call the default run makes (above), recorded here."""
    tiny = []
    monkeypatch.setattr(bench_training, "ray_job", lambda storage, *args: tiny.append(args) or
                        Measured("fp32").job(storage, *args))
    code = bench_training.main(["--floor", "--storage", str(mnist_storage), "--out", str(tmp_path),
                                *SMOKE])
    assert code == 0
    [run] = json.loads((tmp_path / "training_floor.json").read_text())["sets"]
    # The floor job ran Ray Train (its run state is on the storage root); Ray recorded its end
    # before its `ray job submit` returned.
    assert any((mnist_storage / train_floor.FLOOR_DIR).iterdir())
    assert 0 < run["floor"]["job_end_seconds"] <= run["floor"]["seconds"]
    # The job on 300 images, never served: its flags as train.py reads them
    [args] = tiny
    config = bench_training.job_config(list(args))
    assert (config.subset, config.workers, config.rounds, config.promote) == (300, 3, 2, "never")
    assert 0 < run["net_plain"]["seconds"] and 0 < run["net_plain"]["test_accuracy"] <= 1
    ratios = bench_training.floor_ratios(run)
    assert ratios["Ray floor / Net plain"] == run["floor"]["seconds"] / run["net_plain"]["seconds"]
    assert bench_training.own_share(run) == run["job_tiny"]["seconds"] - run["floor"]["seconds"]
    report = (tmp_path / "training_floor.md").read_text()
    assert "| **median** |" in report and f"| {bench_training.own_share(run):.1f} |" in report


def test_the_peers_mode_alternates_the_job_and_the_ddp_recipe_in_the_jobs_precision(mnist_storage, tmp_path,
                                                                                   monkeypatch):
    measured = Measured("bf16")
    monkeypatch.setattr(bench_training, "ray_job", measured.job)
    monkeypatch.setattr(bench_training, "ddp_job", measured.ddp)
    monkeypatch.setattr(bench_training.local, "up", lambda: False)
    code = bench_training.main(["--peers", "--repeats", "2", "--storage", str(mnist_storage), "--out", str(tmp_path),
                                "--job-args", "--subset 600 --epochs 1 --rounds 2"])
    assert code == 0
    assert measured.calls == [("job", 1), ("ddp", 1, "bf16")] * 2  # in turn, DDP in the job's recorded precision
    pairs = json.loads((tmp_path / "training_peers.json").read_text())["pairs"]
    assert len(pairs) == 2 and all(pair["ddp"]["epochs"] == pair["job"]["epochs"] for pair in pairs)
    report = (tmp_path / "training_peers.md").read_text()
    assert f"**{40 / 39:.2f}x**" in report and "| 1 | 40.0 |" in report
    rtt = json.loads((tmp_path / "training_rtt.json").read_text())  # the model, from the median pair's rows
    assert rtt["measured"] == {**rtt["measured"], "job_seconds": 40.0, "ddp_seconds": 39.0}
