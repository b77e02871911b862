"""training/train.py refuses bad input with one clear message and a non-zero exit, before any work."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import train  # noqa: E402  (the entrypoint is a script, as Ray runs it)


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--workers", "0"], "--workers: must be >= 1"),
    (["--workers", "x"], "invalid positive_int value"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--rounds", "0"], "--rounds: must be >= 1"),
    (["--batch-size", "-5"], "--batch-size: must be >= 1"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--subset", "100", "--workers", "101"], "--workers 101 is more than the 100 training images"),
    (["--workers", "60001"], "more than the 60000 training images"),
    (["--subset", "70000"], "larger than the 60000 training images"),
    (["--subset", "600", "--workers", "3", "--epochs", "1", "--rounds", "3"], "--rounds 3 is more than the 2 training steps"),
    (["--run-id", "../escape"], "--run-id: use 1-63 letters"),
    (["--checkpoint-steps", "-1"], "--checkpoint-steps must be >= 0"),
    (["--precision", "fp16"], "--precision: invalid choice: 'fp16'"),
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
    (["--strategy", "fedprox"], "fedprox needs a positive number"),
    (["--partition", "dirichlet:0"], "--partition dirichlet:0: use iid, dirichlet:ALPHA"),
    (["--partition", "classes:11"], "--partition classes:11: use iid"),
    (["--inject-fault", "nan:3"], "rank 3 is not one of the 3 workers"),
    (["--inject-fault", "scale:1"], "use nan:RANK or scale:RANK:FACTOR"),
    (["--threads", "0"], "--threads: must be >= 1"),
])
def test_bad_flags_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_seed_settings():
    args = train.parse_args([])
    assert (args.workers, args.epochs, args.batch_size) == (3, 2, 100)
    assert args.rounds == 4  # two FedAvg rounds per epoch


def test_the_reproduce_command_pins_the_decided_setting_and_parses_back():
    args = train.parse_args(["--seed", "4", "--subset", "3000", "--strategy", "median", "--partition", "classes:3",
                             "--inject-fault", "scale:1:100", "--no-augment"])
    command = train.reproduce_command(args, {"precision": "bf16", "threads": 1})
    again = train.parse_args(command.split()[2:])
    for flag in ("workers", "epochs", "rounds", "batch_size", "lr", "seed", "subset", "strategy", "partition",
                 "inject_fault", "augment", "elastic"):
        assert getattr(again, flag) == getattr(args, flag), flag
    assert (again.precision, again.threads) == ("bf16", 1)


def test_default_rounds_shrink_to_fit_a_tiny_subset():
    assert train.parse_args(["--subset", "300", "--workers", "3"]).rounds == 2  # 1 step per epoch


@pytest.mark.parametrize("free_per_node, workers, expected", [
    ([2.0], 3, (0.66, 1)),             # this machine: one node of 2 CPUs
    ([8.0], 3, (2.66, 2)),             # one big node: its CPUs shared out, threads to match
    ([0.75], 1, (0.75, 1)),
    ([2.0, 2.0, 2.0], 3, (2.0, 2)),    # the default GKE cluster: 3 pods x 2 CPUs, one worker per pod
    ([2.0, 2.0], 3, (1.0, 1)),         # two pods of 2: a third worker would not fit at 2 CPUs
    ([1.0, 2.0], 3, (1.0, 1)),         # uneven nodes: one worker on the small one, two on the big one
    ([4.0, 1.0], 2, (2.0, 2)),         # better two on the big node than one squeezed onto the small
    ([0.0, 2.0, 0.3], 2, (1.0, 1)),    # a full node and a sliver do not count
])
def test_worker_cpus_fit_into_the_nodes_free_cpus(free_per_node, workers, expected):
    cpus, threads = train.size_workers(free_per_node, workers)
    assert (cpus, threads) == expected
    assert sum(int(100 * free + 1e-6) // int(round(100 * cpus)) for free in free_per_node) >= workers  # all fit
    assert threads <= max(1, int(cpus))


def test_relative_storage_is_refused_inside_rays_copy_of_the_working_dir(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MNIST_STORAGE", raising=False)
    for relative in (None, "storage", "out/storage"):
        with pytest.raises(train.UserError, match="temporary copy"):
            train.storage_outside_job_copy(relative)
    assert train.storage_outside_job_copy(str(tmp_path / "s")) == tmp_path / "s"
    monkeypatch.setenv("MNIST_STORAGE", str(tmp_path / "env"))
    assert train.storage_outside_job_copy(None) == tmp_path / "env"


def test_relative_storage_resolves_against_the_current_dir_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_STORAGE", raising=False)
    assert train.storage_outside_job_copy(None) == tmp_path.resolve() / "storage"


def test_too_few_cpus_is_a_clear_error():
    with pytest.raises(train.UserError, match="too few"):
        train.size_workers([0.1], 4)
    with pytest.raises(train.UserError, match="too few"):
        train.size_workers([0.04, 0.04, 0.04], 1)  # 0.12 in all, but no node holds one 0.05 share


def run_script(*argv, env=None):
    return subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_unwritable_storage_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_script("--storage", str(blocker / "storage"))
    assert result.returncode == 2
    assert "is not writable" in result.stderr and "Traceback" not in result.stderr


def test_no_ray_cluster_is_a_clear_error(tmp_path):
    result = run_script("--storage", str(tmp_path), env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert result.returncode == 2
    assert "no Ray cluster at 127.0.0.1:9" in result.stderr and "python -m ray_cluster up" in result.stderr
