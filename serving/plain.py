"""The baseline: the same API (routes, validation, preprocessing, model) in one plain uvicorn
process, without Ray. The serving benchmark runs it beside Ray Serve.

    python -m serving.plain --storage DIR [--port 8001] [--ui]
"""
import argparse
import asyncio
import contextlib

import numpy as np
import torch
import uvicorn

from serving.api import create_api
from serving.model_store import ModelStore, follow_latest, storage_root
from serving.schemas import Limits
from training.storage import STORAGE_ENV


class LocalBackend:
    """The model in this process: one forward pass per request, no batching."""

    def __init__(self, store: ModelStore):
        self.store = store

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        return self.store.predict(images)

    async def status(self) -> dict:
        return self.store.status()


def create_plain_app(storage: str | None = None, limits: Limits | None = None, ui: bool = False,
                     poll_interval_s: float = 1.0):
    store = ModelStore(storage_root(storage))
    store.refresh()
    backend = LocalBackend(store)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(follow_latest(store, lambda: poll_interval_s))
        yield
        watcher.cancel()

    api = create_api(backend, limits, title="MNIST digits (plain uvicorn)")
    api.router.lifespan_context = lifespan
    if ui:
        from serving.ui import mount_ui
        api = mount_ui(api, backend)
    return api


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help=f"storage root (default ${STORAGE_ENV}, else ./storage)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Serve replica)")
    parser.add_argument("--ui", action="store_true", help="also mount the sketchpad at /ui")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    app = create_plain_app(args.storage, ui=args.ui)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
