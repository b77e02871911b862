"""Folders private to this user, for local state: the local Ray head's (ray_cluster/local.py) and
Gradio's uploads (serving/ui.py). In training/, the package both of them import, so that a Serve
replica does not import the local cluster's code to find its upload folder.
"""
import os
import tempfile
from pathlib import Path


def private_dir(path: str | os.PathLike) -> Path:
    """A folder only this user can enter (0700): made if missing, refused if it belongs to someone
    else or is a symlink (in a shared /tmp anyone could have made it first, to read or plant files)."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a folder of this user's; remove it or choose another")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_state_dir(name: str) -> Path:
    """Where local state of `name` lives: $XDG_RUNTIME_DIR/<name> (per user by design), else
    <tmp>/<name>-<uid>; made private by private_dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / name
    return Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
