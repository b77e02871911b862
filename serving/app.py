"""The Ray Serve applications (serving/serve_config.yaml deploys both):

    mnist      route /     MnistService: the HTTP API and the model in one replica. It loads the
                           weights named by `latest`, batches requests (@serve.batch), follows
                           `latest` for hot reload, and scales to any number of replicas.
    mnist-ui   route /ui   MnistUI: the Gradio sketchpad, one replica, calling MnistService
                           through a DeploymentHandle.

Why two applications: API and model in one process is one Ray hop per request instead of two
(about 40% more throughput on 2 cores, see docs/SERVING.md), and Gradio keeps per-session state
(queue, uploads) in its process, so the page must live in a single replica while the API scales.
Both ask for little CPU (0.25 and 0) so that a training job fits beside them on a 2-CPU machine.
"""
import asyncio
import logging

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serving.api import create_api
from serving.model_store import ModelStore, NoModel, follow_latest, storage_root
from serving.schemas import Limits

log = logging.getLogger("ray.serve")


class ModelConfig(BaseModel):
    """MnistService's user_config: `serve deploy` applies a change live, without a restart."""
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="0: batch what queued while the last batch ran")
    poll_interval_s: float = Field(1.0, gt=0, description="how often `latest` is checked")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  user_config=ModelConfig().model_dump(), health_check_period_s=5)
@serve.ingress()
class MnistService:
    async def __init__(self, storage: str | None = None, limits: dict | None = None):
        torch.set_num_threads(1)  # one core's worth: batching, not threads, gives throughput here
        self.config = ModelConfig()
        self.limits = Limits(**(limits or {}))
        self.store = ModelStore(storage_root(storage))
        await asyncio.to_thread(self.store.refresh)  # no model yet is fine: 503 until one is published
        log.info("model store %s: version %s", self.store.storage, self.store.status()["model_version"])
        self._watcher = asyncio.create_task(follow_latest(self.store, lambda: self.config.poll_interval_s))

    def __serve_build_asgi_app__(self):
        """Runs on the replica after __init__ (a FastAPI app built in the driver would be pickled)."""
        return create_api(LocalBackend(self), self.limits)

    def reconfigure(self, user_config: dict) -> None:
        self.config = ModelConfig(**user_config)
        self._batched.set_max_batch_size(self.config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str] | str:
        """Probabilities and version, or the no-model message (a plain value crosses Ray cleanly)."""
        if self.store.current is None:
            return self.store.no_model_message()
        return await self._batched(images)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        probs, version = self.store.predict(np.concatenate(requests))
        bounds = np.cumsum([len(r) for r in requests])[:-1]
        return [(part, version) for part in np.split(probs, bounds)]

    async def status(self) -> dict:
        return self.store.status()


class LocalBackend:
    """The API's view of the model in its own replica."""

    def __init__(self, service: MnistService):
        self.service = service

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        return _result(await self.service.infer(images))

    async def status(self) -> dict:
        return self.service.store.status()


class HandleBackend:
    """The page's view of the model: MnistService of another application, through a handle."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:  # looked up on first use: the API app may deploy after the page
            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        return _result(await self.handle.infer.remote(images))

    async def status(self) -> dict:
        return await self.handle.status.remote()


def _result(result):
    if isinstance(result, str):
        raise NoModel(result)
    return result


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class MnistUI:
    def __init__(self, model_app: str = "mnist"):
        self.backend = HandleBackend(model_app)

    def __serve_build_asgi_app__(self):
        from serving.ui import ui_app  # Gradio is imported only where the page is served
        return ui_app(self.backend)


class AppArgs(Limits):
    """`args:` of the mnist application in serve_config.yaml (or key=value after `serve run`)."""
    storage: str | None = Field(None, description="storage root; default $MNIST_STORAGE, else <repo>/storage")


class UIArgs(BaseModel):
    """`args:` of the mnist-ui application."""
    model_config = ConfigDict(extra="forbid")
    model_app: str = Field("mnist", description="name of the application that runs MnistService")


def build_app(args: dict | None = None) -> serve.Application:
    options = AppArgs(**(args or {}))
    limits = Limits(**options.model_dump(include=set(Limits.model_fields)))
    return MnistService.bind(options.storage, limits.model_dump())


def build_ui(args: dict | None = None) -> serve.Application:
    return MnistUI.bind(UIArgs(**(args or {})).model_app)
