"""Submit training/train.py to a Ray cluster as a Ray job, as the README does: this repository as
the job's working dir, with the SDK's JobSubmissionClient or the `ray job submit` CLI. The tests
and the training benchmark submit their jobs through here."""
import shlex
import subprocess
import sys
from pathlib import Path

from ray_cluster import local

ROOT = Path(__file__).resolve().parents[1]


TRAIN_SCRIPT = "training/train.py"


def train_command(storage: Path, *train_args: str, python: str = "python", script: str = TRAIN_SCRIPT) -> list[str]:
    """The job's entrypoint: training/train.py (or another `script` of this repository that takes
    --storage) on a storage root, run from the job's copy of this repository (its working dir), or
    from the image on Kubernetes (manifests.train_command)."""
    return [python, script, *train_args, "--storage", str(storage)]


def submit_training(client, storage: Path, *train_args: str, python: str = "python",
                    submission_id: str | None = None) -> str:
    """Submit training/train.py through a JobSubmissionClient, this repository as the working dir
    (what `ray job submit --working-dir .` does); return the submission id without waiting.
    `python`: the interpreter, where the cluster's PATH does not lead to this venv's."""
    return client.submit_job(entrypoint=shlex.join(train_command(storage, *train_args, python=python)),
                             runtime_env={"working_dir": str(ROOT)}, submission_id=submission_id)


def ray_job_submit(storage: Path, *train_args: str, submission_id: str | None = None,
                   timeout: float | None = None, script: str = TRAIN_SCRIPT) -> subprocess.CompletedProcess:
    """The same job through the `ray job submit` CLI, as the README runs it: it tails the job's log
    and returns when the job ends, with the job's outcome as its exit status."""
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", local.DASHBOARD_URL,
               *(["--submission-id", submission_id] if submission_id else []), "--working-dir", str(ROOT),
               "--", *train_command(storage, *train_args, script=script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
