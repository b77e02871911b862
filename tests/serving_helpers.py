"""Helpers for the serving tests (the fixtures are in tests/serving_support.py)."""
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving import deploy
from tests.waiting import wait_for  # noqa: F401  (the serving tests import it from here)
from training.storage import models_dir, publish_model

RECIPE = {"seed": 0, "steps": 300, "batch_size": 64, "max_lr": 4e-3, "finetune_steps": 40}


def publish(storage: Path, version: str, state: dict, accuracy: float) -> None:
    publish_model(storage, version, state, {
        "version": version, "run_id": f"test-{version}", "workers": 1, "epochs": 0, "rounds": 1,
        "batch_size": RECIPE["batch_size"], "test_accuracy": accuracy, "round_metrics": [],
        "train_seconds": 0.0, "shards_manifest_sha256": "", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})


def point_latest(storage: Path, version: str) -> None:
    """Make `latest` name a version directly (to simulate broken or missing publications)."""
    (models_dir(storage) / "latest").write_text(f"{version}\n")


@dataclass
class ServeApp:
    name: str
    prefix: str
    storage: Path
    config: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:8000{self.prefix}"

    @property
    def ui_url(self) -> str:
        return f"{self.url}/ui/"

    @property
    def names(self) -> list[str]:
        return [app["name"] for app in self.config["applications"]]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def model(self) -> dict:
        return httpx.get(f"{self.url}/model", timeout=30).json()


def make_app(name: str, storage: Path, with_ui: bool = True, model_replicas: int | None = None,
             api_replicas: int | None = None) -> ServeApp:
    """The config's applications under test names, as `python -m serving deploy` builds them
    (`*_replicas`: a fixed count instead of the config's autoscaling)."""
    config = deploy.local_config(str(storage), name=name, route_prefix=f"/{name}", model_replicas=model_replicas,
                                 api_replicas=api_replicas)
    if not with_ui:
        config["applications"] = [deploy.app_pair(config)[0]]
    return ServeApp(name, f"/{name}", storage, config)


