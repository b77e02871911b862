"""The Ray Serve applications. serving/serve_config.yaml deploys both and holds every deployment
option (CPUs, replicas and autoscaling, queues, health checks, user_config); the decorators here
stay bare.

    mnist      route /     MnistApi (ingress): HTTP API, validation, preprocessing; batches the
                           requests that arrive together into one call to the model
                           MnistModel (any number of replicas): the weights named by `latest`,
                           dynamic batching (@serve.batch), hot reload
    mnist-ui   route /ui   MnistUI (one replica): the Gradio sketchpad, calling MnistModel
                           through a DeploymentHandle

One prediction: serving.api route -> MnistApi.infer (a batch) -> HandleBackend (retries a lost
replica) -> MnistModel.reply -> ModelServer.infer (a batch) -> ModelStore.predict.

Why the model has its own deployment: a model replica can die (or be replaced) without losing a
request, because MnistApi sends the batch again to another replica. Why the page has its own
application: Gradio keeps per-session state in its process, so it runs as a single replica.
serve_config.yaml sets `colocate: true` (args): API and model in one deployment, MnistService,
the default layout because it measures fastest (no Ray hop per request; docs/SERVING.md, "Layout").
The split layout above is `python -m serving deploy --split`.
"""
import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.api import ApiError, create_api
from serving.limits import RETRY_AFTER
from serving.model_store import ModelStore, NoModel, follow_latest, storage_root
from serving.schemas import Limits

log = logging.getLogger("ray.serve")
RETRIES = 1  # a batch whose model replica died is sent again to another, once: inference is idempotent,
             # but a batch that killed two replicas may be what kills them (docs/RELIABILITY.md)
MAX_BATCH_SIZE = 32  # requests per model call: @serve.batch's start value, then the user_config's


class ModelConfig(BaseModel):
    """The model's user_config: `serve deploy` applies a change live, without a restart."""
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="0: batch what queued while the last batch ran")
    poll_interval_s: float = Field(1.0, gt=0, description="how often `latest` is checked")


def split(probs: np.ndarray, version: str, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
    """A batch's answer, cut back into one (probabilities, version) per request."""
    bounds = np.cumsum([len(r) for r in requests])[:-1]
    return [(part, version) for part in np.split(probs, bounds)]


@dataclass(frozen=True)
class ModelReply:
    """What a model replica answers through a handle: probabilities and version, or why there is no
    model. A value, not a raised NoModel: an exception crossing Ray carries the replica's traceback."""
    probabilities: np.ndarray | None = None
    version: str | None = None
    no_model: str | None = None  # the public message of NoModel (503 "train first")

    def unwrap(self) -> tuple[np.ndarray, str]:
        if self.no_model is not None:
            raise NoModel(self.no_model)
        return self.probabilities, self.version


class ModelServer:
    """The model side of a replica: the store, the `latest` watcher, dynamic batching. It is a
    `serving.api.Backend` itself: the colocated MnistService serves its API over it directly."""

    async def _start_model(self, storage: str | None) -> None:
        torch.set_num_threads(1)  # one core's worth: batching, not threads, gives throughput here
        self.config = ModelConfig()
        self.store = ModelStore(storage_root(storage))
        await asyncio.to_thread(self.store.refresh)  # no model yet is fine: 503 until one is published
        log.info("model store %s: version %s", self.store.storage, self.store.status()["model_version"])
        self._watcher = asyncio.create_task(follow_latest(self.store, lambda: self.config.poll_interval_s))

    def reconfigure(self, user_config: dict) -> None:
        self.config = ModelConfig(**user_config)
        self.infer.set_max_batch_size(self.config.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def infer(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Probabilities and version per request; NoModel (for the whole batch) when nothing is loaded."""
        probs, version = self.store.predict(np.concatenate(requests))
        return split(probs, version, requests)

    async def reply(self, images: np.ndarray) -> ModelReply:
        """`infer` for a caller across Ray (HandleBackend): no model is a value, not an exception."""
        try:
            return ModelReply(*await self.infer(images))
        except NoModel as error:
            return ModelReply(no_model=str(error))

    async def status(self) -> dict:
        return self.store.status()


@serve.deployment
class MnistModel(ModelServer):
    async def __init__(self, storage: str | None = None):
        # Serve routes to a replica only after __init__ returns, so one that autoscaling adds
        # takes no request before the published model is loaded (and probed).
        await self._start_model(storage)


class HandleBackend:
    """The API's (or the page's) view of MnistModel through a handle, retrying lost replicas."""

    def __init__(self, handle: DeploymentHandle | None = None, app_name: str = "", deployment: str = "MnistModel"):
        self._handle, self.app_name, self.deployment = handle, app_name, deployment

    @property
    def handle(self) -> DeploymentHandle:
        if self._handle is None:  # looked up on first use: the page may deploy before the API app
            self._handle = serve.get_deployment_handle(self.deployment, self.app_name)
        return self._handle

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        for attempt in range(RETRIES + 1):
            try:
                reply = await self.handle.reply.remote(images)
                return reply.unwrap()
            except RayActorError as error:  # the replica died mid-request: another one takes it
                if attempt == RETRIES:
                    log.warning("suspect batch of %d images: it lost %d model replicas; answered 503, not resent",
                                len(images), RETRIES + 1)
                    raise ApiError(503, "no model replica could answer; try again", headers=RETRY_AFTER) from error
                log.warning("model replica lost (%s); sending the batch again", type(error).__name__)
            except BackPressureError:  # the model replicas' queues are full (max_queued_requests): shed
                raise ApiError(503, "the service is overloaded; try again shortly", headers=RETRY_AFTER) from None

    async def status(self) -> dict:
        return await self.handle.status.remote()


@serve.deployment
@serve.ingress()
class MnistApi:
    """The HTTP API; a `serving.api.Backend` over MnistModel, batching what arrives together."""

    def __init__(self, model: DeploymentHandle, limits: dict | None = None):
        self.model = HandleBackend(model)
        self.limits = Limits(**(limits or {}))

    def __serve_build_asgi_app__(self):
        """Runs on the replica after __init__ (a FastAPI app built in the driver would be pickled)."""
        return create_api(self, self.limits)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def infer(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """One call to the model for the requests that arrived together: the Ray hop, which
        costs more than the model, is paid once per batch instead of once per request."""
        probs, version = await self.model.infer(np.concatenate(requests))
        return split(probs, version, requests)

    async def status(self) -> dict:
        return await self.model.status()


@serve.deployment
@serve.ingress()
class MnistService(ModelServer):
    """API and model in one replica (`colocate: true`); python -m serving deploy gives it
    MnistModel's options from serve_config.yaml, with MnistApi's request-facing ones."""

    async def __init__(self, storage: str | None = None, limits: dict | None = None):
        await self._start_model(storage)
        self.limits = Limits(**(limits or {}))

    def __serve_build_asgi_app__(self):
        return create_api(self, self.limits)


@serve.deployment
@serve.ingress()
class MnistUI:
    def __init__(self, model_app: str = "mnist", model_deployment: str = "MnistModel"):
        self.backend = HandleBackend(app_name=model_app, deployment=model_deployment)

    def __serve_build_asgi_app__(self):
        from serving.ui import ui_app  # Gradio is imported only where the page is served
        return ui_app(self.backend)


class AppArgs(Limits):
    """`args:` of the mnist application in serve_config.yaml (or key=value after `serve run`)."""
    storage: str | None = Field(None, description="storage root; default $MNIST_STORAGE, else ./storage")
    colocate: bool = Field(False, description="API and model in one deployment (MnistService)")


class UIArgs(BaseModel):
    """`args:` of the mnist-ui application."""
    model_config = ConfigDict(extra="forbid")
    model_app: str = Field("mnist", description="the application that runs the model")
    model_deployment: str = Field("MnistModel", description="MnistModel, or MnistService if colocated")


def build_app(args: dict | None = None) -> serve.Application:
    """The mnist application (the API and the model) from its serve_config.yaml args."""
    options = AppArgs(**(args or {}))
    limits = Limits(**options.model_dump(include=set(Limits.model_fields))).model_dump()
    if options.colocate:
        return MnistService.bind(options.storage, limits)
    return MnistApi.bind(MnistModel.bind(options.storage), limits)


def build_ui(args: dict | None = None) -> serve.Application:
    """The mnist-ui application (the sketchpad page, serving/ui.py) from its serve_config.yaml args."""
    options = UIArgs(**(args or {}))
    return MnistUI.bind(options.model_app, options.model_deployment)
