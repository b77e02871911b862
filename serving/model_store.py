"""The published model that serving runs: loaded from `<storage>/models/mnist/latest`, swapped
whole when a newer version appears, and never replaced by a version that fails to load.

Both the Ray Serve model deployment and the plain uvicorn baseline use this class.
"""
import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.model import for_inference, network_for, to_input
from training.storage import METADATA_FILE, MODEL_FILE, metadata_path, model_path, resolve_storage, version_dir
from training.versions import BadVersionName, PromotionError, read_history, read_latest

log = logging.getLogger("ray.serve")
# Images per forward pass, however the calls were batched (32 calls of a 256-image tensor would
# otherwise be one pass of 8192 images): larger batches run as several passes, so the activations'
# memory is bounded (~30 MB at 256).
MAX_FORWARD_IMAGES = 256


def storage_root(storage: str | None = None) -> Path:
    """The `storage` arg, else $MNIST_STORAGE (set by the config's runtime_env and the local head),
    else ./storage: training.storage's one rule."""
    return resolve_storage(storage)


class NoModel(RuntimeError):
    """Nothing is published yet (or nothing loadable): serving answers 503 until training publishes."""


class Unusable(ValueError):
    """A published version that cannot serve; the message is safe to show (no paths, no library text)."""


@dataclass(frozen=True)
class Loaded:
    version: str
    net: torch.nn.Module        # the published network, as its metadata names it
    metadata: dict
    loaded_at: float
    inference: torch.nn.Module  # what predicts: `net` with BatchNorm folded in (a batch of 32 costs ~1/3 less)


@dataclass
class LoadError:
    version: str
    error: str
    at: float
    signature: tuple = field(repr=False, default=())


def _signature(path: Path) -> tuple:
    """Changes when the file does, so a fixed (re-published) file is tried again."""
    try:
        stat = path.stat()
        return stat.st_mtime_ns, stat.st_size
    except OSError:
        return ()


def load_version(storage: Path, version: str) -> Loaded:
    """Load and check one published version; raise Unusable with a message fit for /model (the
    full cause is chained, for the log)."""
    folder = version_dir(storage, version)
    if not folder.is_dir():
        raise Unusable("its folder does not exist")
    try:
        metadata = json.loads(metadata_path(storage, version).read_text())
    except (OSError, ValueError) as error:
        raise Unusable(f"{METADATA_FILE} is missing or not valid JSON") from error
    if not isinstance(metadata, dict):
        raise Unusable(f"{METADATA_FILE} is not a JSON object")
    try:
        # weights_only: a state_dict needs no pickled code, and a tampered file cannot run any.
        state = torch.load(model_path(storage, version), map_location="cpu", weights_only=True)
        net = network_for(state, metadata.get("architecture"))  # no architecture: the first network, NetV1
    except Exception as error:
        raise Unusable(f"{MODEL_FILE} is missing, corrupt, or not this network's weights") from error
    inference = for_inference(net)
    with torch.inference_mode():
        probe = inference(torch.zeros(1, 1, 28, 28))
    if not torch.isfinite(probe).all():
        raise Unusable("the weights produce non-finite outputs")
    return Loaded(version, net, metadata, time.time(), inference)


class ModelStore:
    """Holds the current model; `refresh()` follows `latest` and keeps the old model on failure."""

    def __init__(self, storage: Path):
        self.storage = Path(storage)
        self.current: Loaded | None = None
        self.error: LoadError | None = None

    def refresh(self) -> bool:
        """Load the version `latest` names if it is new; True when the model changed."""
        try:
            version = read_latest(self.storage)
        except BadVersionName as error:  # a path, '..': never joined to the models folder
            if not (self.error and self.error.version == "?" and "plain" in self.error.error):
                log.error("`latest` %s; keeping model %s", error, self.current and self.current.version)
            self.error = LoadError("?", "`latest` does not name a plain version name; it is ignored", time.time())
            return False
        except OSError as error:
            log.warning("cannot read `latest`: %s", error)
            self.error = LoadError("?", "`latest` cannot be read", time.time())
            return False
        if version is None or (self.current and self.current.version == version):
            if self.current and self.current.version == version:
                self.error = None
            return False
        signature = _signature(model_path(self.storage, version))
        if self.error and (self.error.version, self.error.signature) == (version, signature):
            return False  # already failed on exactly these files; wait for a change
        try:
            loaded = load_version(self.storage, version)
        except Exception as error:  # any failure keeps the old model serving; the reason goes to /model
            log.warning("model version %s did not load", version, exc_info=True)
            reason = str(error) if isinstance(error, Unusable) else "it could not be loaded (see the replica's log)"
            self.error = LoadError(version, reason, time.time(), signature)
            if self.current is None:  # a (re)started replica has no old model: the last one that served
                self.current = self._last_served_loadable(exclude=version)
                return self.current is not None
            return False
        self.current, self.error = loaded, None
        return True

    def _last_served_loadable(self, exclude: str) -> Loaded | None:
        """The newest version in history.json (promoted, not rolled back) that loads: never a trial
        that was not promoted, nor one rolled back; a folder pruned meanwhile is skipped."""
        try:
            history = read_history(self.storage)
        except PromotionError:
            log.warning("history.json is unreadable: no version to fall back to")
            return None
        tried = {exclude}
        for entry in reversed(history):
            version = entry["version"]
            if version in tried or entry.get("rolled_back_at"):
                continue
            tried.add(version)
            try:
                return load_version(self.storage, version)
            except Exception:  # unusable, or pruned while we looked: the one before
                log.warning("fallback version %s did not load", version, exc_info=True)
        return None

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        """MNIST-format images [N, 28, 28] (0..255, uint8 or float) -> probabilities [N, 10], version."""
        loaded = self.current  # one snapshot per batch: a swap mid-batch cannot mix two models
        if loaded is None:
            raise NoModel(self.no_model_message())
        parts = [forward(loaded, images[start:start + MAX_FORWARD_IMAGES])
                 for start in range(0, len(images), MAX_FORWARD_IMAGES)]
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), loaded.version

    def _without_paths(self, value):
        """`value` (metadata) with the storage root's path in any text replaced: /model is public,
        and a promotion summary can quote a file under it."""
        if isinstance(value, dict):
            return {key: self._without_paths(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._without_paths(item) for item in value]
        if isinstance(value, str):
            for root in {str(self.storage.resolve()), str(self.storage)}:
                value = value.replace(root, "<storage>")
        return value

    def no_model_message(self) -> str:
        """Public text: no server paths, no library messages (those go to the log)."""
        if self.error:
            return f"no model is loaded: version {self.error.version} failed to load ({self.error.error})"
        return ("no model is published yet (no `latest` in the models folder); train first, e.g. "
                "`make run`, and this service picks the model up by itself")

    def status(self) -> dict:
        loaded = self.current
        return {
            "ready": loaded is not None,
            "model_version": loaded.version if loaded else None,
            "metadata": self._without_paths(loaded.metadata) if loaded else None,
            "loaded_at": loaded.loaded_at if loaded else None,
            "reload_error": ({"version": self.error.version, "error": self.error.error, "at": self.error.at}
                             if self.error else None),
            "message": None if loaded else self.no_model_message(),
        }


def forward(loaded: Loaded, images: np.ndarray) -> np.ndarray:
    """One forward pass: MNIST-format images [N, 28, 28] -> probabilities [N, 10]."""
    with torch.inference_mode():
        batch = images if images.dtype == np.uint8 else images.astype(np.float32)  # a copy: to_input divides in place
        logits = loaded.inference(to_input(torch.from_numpy(batch)))
        return torch.softmax(logits.double(), dim=1).float().numpy()  # float64 so each row sums to 1


async def follow_latest(store: ModelStore, interval_s: Callable[[], float]) -> None:
    """Poll `latest` forever (a few bytes a second), loading new versions off the event loop.

    `interval_s` is a callable so that a Serve reconfigure can change it while this runs.
    """
    reported = None
    while True:
        await asyncio.sleep(interval_s())
        try:
            if await asyncio.to_thread(store.refresh):
                log.info("now serving model version %s", store.current.version)
            elif store.error and store.error is not reported:
                log.warning("model version %s did not load: %s", store.error.version, store.error.error)
            reported = store.error
        except Exception:  # the watcher must outlive any surprise; the next poll tries again
            log.exception("model refresh failed")
