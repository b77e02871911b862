"""The published-versions registry: publishing a version, which one serves (`latest`), moving it
(promote, rollback: locked, recorded in history.json), the promotion policy, pruning, and a CLI.

    python -m training.versions list                 versions, accuracy, run, created; which one serves
    python -m training.versions promote VERSION      point `latest` at VERSION
    python -m training.versions rollback             back to the version that served before
    python -m training.versions prune --keep N [--dry-run]

Every successful training run publishes a version; serving follows `latest`, which moves only
by a promotion: the run's own (`train.py --promote auto|always|never`) or this CLI's. Each
move is atomic (a rename), serialised by a lock file, and recorded in history.json, so
`rollback` knows where to go. --storage (else $MNIST_STORAGE, else ./storage) picks the root,
so the same commands work in a pod on the cluster's shared volume (/mnt/shared).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# BadVersionName and PromotionError are defined with the name rules that raise them; import them from here.
from training.storage import (DIR_MODE, METADATA_FILE, MODEL_FILE, BadVersionName, PromotionError,
                              atomic_torch_save, atomic_write_bytes, atomic_write_json, check_version_name,
                              fsync_dir, history_path, is_version_name, latest_path, metadata_path, model_path,
                              models_dir, resolve_storage, run_dir, version_dir)

POLICIES = ("auto", "always", "never")
# auto promotes a full-data run scoring at least the serving model's test accuracy less this:
# 0.1 point, 10 of the 10,000 test images: about the spread of one recipe over seeds (docs/BENCHMARKS.md,
# "How the model was chosen"), so a rerun is not refused for noise.
TOLERANCE = 0.001


# ---------------------------------------------------------------- publishing and reading `latest`

def publish_version(storage: Path, version: str, state_dict: dict, metadata: dict) -> Path:
    """Write <version>/ completely under a temporary name and rename it; `latest` does not move."""
    root = models_dir(storage)
    final = version_dir(storage, version)
    if final.exists():
        raise FileExistsError(f"model version {version} is already published at {final}")
    staging = Path(tempfile.mkdtemp(dir=root if root.exists() else _mkdir(root), prefix=f".{version}."))
    try:
        atomic_torch_save(staging / MODEL_FILE, state_dict)
        atomic_write_json(staging / METADATA_FILE, metadata)
        staging.chmod(DIR_MODE)  # mkdtemp makes 0700
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(root)
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_latest(storage: Path) -> str | None:
    """The published version that `latest` names, or None before the first publication.
    BadVersionName if it names anything but a plain version name (a path, '..')."""
    try:
        text = latest_path(storage).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    return check_version_name(text) if text else None


def serving_version(storage: Path) -> str | None:
    """read_latest for promotion: a `latest` that names no plain version counts as nothing serving
    (serving refuses it and keeps its model), so promoting a good version repairs it."""
    try:
        return read_latest(storage)
    except BadVersionName:
        return None


# ---------------------------------------------------------------- promotion: moving `latest`

HISTORY_LENGTH = 20  # promotions kept in history.json: enough to roll back several times


@contextmanager
def promotion_lock(storage: Path):
    """Serialise every move of `latest` (the CLI, finishing runs) across processes and pods.

    flock on a file beside `latest`: Linux's NFS client maps it to an NFS lock, so it holds on
    the shared volume too. Not reentrant: the *_locked functions expect it held."""
    import fcntl

    lock = _mkdir(models_dir(storage)) / ".promotion.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def version_metadata(storage: Path, version: str) -> dict:
    """The metadata of a complete published version; PromotionError says what is wrong otherwise."""
    folder = version_dir(storage, version)
    if not folder.is_dir():
        known = ", ".join(published_versions(storage)[-5:]) or "none"
        raise PromotionError(f"no published version '{version}' under {models_dir(storage)} (latest ones: {known})")
    path = metadata_path(storage, version)
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise PromotionError(f"version '{version}' is incomplete: {folder} has no {METADATA_FILE}") from None
    except (OSError, ValueError) as error:
        raise PromotionError(f"version '{version}': cannot read {path} ({error})") from None
    if not isinstance(metadata, dict):
        raise PromotionError(f"version '{version}': {path} is not a JSON object")
    if not model_path(storage, version).is_file():
        raise PromotionError(f"version '{version}' is incomplete: {folder} has no {MODEL_FILE}")
    return metadata


def published_versions(storage: Path) -> list[str]:
    """Names of the version folders (complete or not), sorted; staging folders start with '.'."""
    root = models_dir(storage)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_history(storage: Path) -> list[dict]:
    """Past promotions, oldest first: [{"version", "at", "note", maybe "rolled_back_at"}]; [] at first."""
    path = history_path(storage)
    try:
        history = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise PromotionError(f"{path} is not readable JSON ({error}); fix or delete it (it only guides rollback)") from None
    if not (isinstance(history, list) and all(isinstance(e, dict) and isinstance(e.get("version"), str) for e in history)):
        raise PromotionError(f"{path} is malformed: expected a list of {{\"version\": ...}} entries; "
                             "fix or delete it (it only guides rollback)")
    return history


def point_latest_locked(storage: Path, version: str, note: str) -> None:
    """Move `latest` to a complete version and record it in the history (hold promotion_lock).

    `latest` is renamed into place first: a crash before the history is written leaves the
    previous entry last, which is still where a rollback should go."""
    history = read_history(storage)
    serving = serving_version(storage)
    if serving and _head(history) != serving and _complete(storage, serving):  # moved by hand or older code
        history.append({"version": serving, "at": _now(), "note": "found serving (moved outside this history)"})
    history.append({"version": version, "at": _now(), "note": note})
    atomic_write_bytes(latest_path(storage), f"{version}\n".encode())
    atomic_write_json(history_path(storage), history[-HISTORY_LENGTH:])


def _complete(storage: Path, version: str) -> bool:
    try:
        version_metadata(storage, version)
        return True
    except PromotionError:
        return False


def _head(history: list[dict]) -> str | None:
    """The version the history says serves: its last entry not rolled back."""
    return next((e["version"] for e in reversed(history) if not e.get("rolled_back_at")), None)


def promote_version(storage: Path, version: str, note: str = "promoted by hand") -> str | None:
    """Point `latest` at a complete version; returns the version that served before."""
    with promotion_lock(storage):
        version_metadata(storage, version)
        read_history(storage)  # a malformed history stops us before anything moves
        before = serving_version(storage)
        if before != version:
            point_latest_locked(storage, version, note)
    return before


def rollback_target(history: list[dict], serving: str | None) -> tuple[str, list[dict]]:
    """The version that served before `serving`, and the history with the entries rolled back
    from marked (kept, so the list of versions that once served stays whole)."""
    marked = [dict(entry) for entry in history]
    index = len(marked)
    while index and (marked[index - 1]["version"] == serving or marked[index - 1].get("rolled_back_at")):
        marked[index - 1].setdefault("rolled_back_at", _now())
        index -= 1
    if not index:
        raise PromotionError(f"nothing to roll back to: the history has no version that served before '{serving}'")
    return marked[index - 1]["version"], marked


def rollback_version(storage: Path) -> tuple[str | None, str]:
    """Point `latest` back at the version that served before; returns (from, to).

    The rolled-back entries are marked, so a second rollback goes one further back."""
    with promotion_lock(storage):
        serving = serving_version(storage)
        target, kept = rollback_target(read_history(storage), serving)
        version_metadata(storage, target)
        # History first: a crash before `latest` moves leaves the target last, so rolling back again still goes there.
        atomic_write_json(history_path(storage), kept)
        atomic_write_bytes(latest_path(storage), f"{target}\n".encode())
    return serving, target


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the policy

@dataclass(frozen=True)
class Decision:
    promote: bool
    summary: str  # "promoted ..." or "kept V (99.34%) because ..."


def describe(version: str | None, metadata: dict | None) -> str:
    if version is None:
        return "nothing serving"
    accuracy = (metadata or {}).get("test_accuracy")
    return f"{version} ({accuracy:.2%})" if isinstance(accuracy, (int, float)) else f"{version} (accuracy unknown)"


def decide(policy: str, run: dict, serving: str | None, serving_metadata: dict | None) -> Decision:
    """Should a finished run's version replace the serving one? Pure: metadata in, decision out.

    auto: promote when nothing serves yet (nothing to protect), else only a full-data run (no
    --subset) whose test accuracy is at least the serving version's less TOLERANCE. A serving
    version without a readable accuracy cannot be compared and gives way to a full-data run."""
    if policy not in POLICIES:
        raise ValueError(f"unknown promotion policy {policy!r}; use one of {', '.join(POLICIES)}")
    kept = f"kept {describe(serving, serving_metadata)} because"
    if policy == "always":
        return Decision(True, "promoted (--promote always)")
    if policy == "never":
        return Decision(False, f"{kept} --promote never")
    if serving is None:
        return Decision(True, "promoted (nothing was serving)")
    if run.get("subset"):
        return Decision(False, f"{kept} this run trained on --subset {run['subset']} images "
                               "(auto promotes full-data runs only)")
    accuracy = run["test_accuracy"]
    best = (serving_metadata or {}).get("test_accuracy")
    if not isinstance(best, (int, float)):
        return Decision(True, f"promoted ({serving}, serving, has no readable test accuracy)")
    if accuracy >= best - TOLERANCE:
        return Decision(True, f"promoted: {accuracy:.2%} >= {best:.2%} of {serving}, "
                              f"less the {100 * TOLERANCE:.2f}-point tolerance")
    return Decision(False, f"{kept} this run's {accuracy:.2%} is more than {100 * TOLERANCE:.2f} points below it")


def serving_metadata(storage: Path, serving: str | None) -> dict | None:
    """The serving version's metadata, or None when there is none or it cannot be read."""
    if serving is None:
        return None
    try:
        return version_metadata(storage, serving)
    except PromotionError:
        return None


def publish_run(storage: Path, version: str, state_dict: dict, metadata: dict, policy: str) -> tuple[Path, Decision]:
    """Publish a finished run's version, decide by `policy`, and promote it if so; the decision
    goes into its metadata.json under "promotion". Under the promotion lock, so a concurrent
    `promote` cannot slip in between the decision and the move."""
    with promotion_lock(storage):
        serving = serving_version(storage)
        before = serving_metadata(storage, serving)
        decision = decide(policy, metadata, serving, before)
        if decision.promote:
            try:
                read_history(storage)
            except PromotionError as error:  # published anyway; promote by hand once the file is fixed
                decision = Decision(False, f"kept {describe(serving, before)} because {error}")
        record = {"policy": policy, "promoted": decision.promote, "summary": decision.summary,
                  "serving_before": serving, "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = publish_version(storage, version, state_dict, {**metadata, "promotion": record})
        if decision.promote:
            point_latest_locked(storage, version, note=f"training run, --promote {policy}")
    return path, decision


# ---------------------------------------------------------------- looking

def version_rows(storage: Path, history: list[dict]) -> list[dict]:
    """Every version folder, oldest first, with what `list` shows; incomplete ones say why."""
    serving = serving_version(storage)
    promoted = {entry["version"] for entry in history}
    previous = _previous(history, serving)
    rows = []
    for version in published_versions(storage):
        row = {"version": version, "serving": version == serving, "previous": version == previous,
               "promoted_before": version in promoted}
        try:
            metadata = version_metadata(storage, version)
            row.update(test_accuracy=metadata.get("test_accuracy"), run_id=metadata.get("run_id"),
                       subset=metadata.get("subset"), created_at=metadata.get("created_at"), problem=None)
        except PromotionError as error:
            row.update(test_accuracy=None, run_id=None, subset=None, problem=str(error),
                       created_at=_mtime(models_dir(storage) / version))
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["created_at"] or ""), r["version"]))


def _previous(history: list[dict], serving: str | None) -> str | None:
    try:
        return rollback_target(history, serving)[0]
    except PromotionError:
        return None


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'':2}{'VERSION':<28} {'ACCURACY':>8}  {'DATA':<12} {'CREATED':<25} {'RUN':<28} STATE"]
    for r in rows:
        accuracy = f"{r['test_accuracy']:.2%}" if isinstance(r["test_accuracy"], (int, float)) else "?"
        data = f"subset {r['subset']}" if r["subset"] else ("full" if not r["problem"] else "?")
        state = ("serving" if r["serving"] else "previous (rollback target)" if r["previous"]
                 else "promoted before" if r["promoted_before"] else "")
        if r["problem"]:
            state = f"{state} INCOMPLETE: {r['problem']}".strip()
        lines.append(f"{'*' if r['serving'] else '':2}{r['version']:<28} {accuracy:>8}  {data:<12} "
                     f"{r['created_at'] or '?':<25} {r['run_id'] or '?':<28} {state}")
    return "\n".join(lines)


# ---------------------------------------------------------------- retention

def prune(storage: Path, keep: int, dry_run: bool) -> dict:
    """Remove versions that never served, beyond the `keep` newest, with their runs' folders.

    Never removes a version in the promotion history (the serving one and the one before it
    among them; both are protected again explicitly, in case the history was trimmed), nor a
    folder without metadata (not known to be a finished version). Dry run: report only."""
    with promotion_lock(storage):
        serving = serving_version(storage)
        history = read_history(storage)  # malformed: PromotionError before anything is deleted
        protected = {entry["version"] for entry in history} | {serving, _previous(history, serving)}
        complete = [r for r in version_rows(storage, history) if not r["problem"]]
        newest = {r["version"] for r in complete[::-1][:keep]}
        doomed = [r for r in complete if r["version"] not in protected | newest]
        kept_runs = {r["run_id"] for r in complete if r not in doomed}
        removals = []
        for row in doomed:
            paths = [models_dir(storage) / row["version"]]
            run = _run_folder(storage, row["run_id"])
            if run and row["run_id"] not in kept_runs:
                paths.append(run)
            removals.append({"version": row["version"], "paths": [str(p) for p in paths],
                             "bytes": sum(_size(p) for p in paths)})
        if not dry_run:
            for removal in removals:
                for path in removal["paths"]:
                    _remove_tree(Path(path))
    return {"removed": removals, "bytes": sum(r["bytes"] for r in removals), "dry_run": dry_run,
            "kept": sorted(r["version"] for r in complete if r not in doomed)}


def _run_folder(storage: Path, run_id) -> Path | None:
    if not isinstance(run_id, str) or not is_version_name(run_id):
        return None  # not a plain folder name: never follow it
    folder = run_dir(storage, run_id)
    return folder if folder.is_dir() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_tree(path: Path) -> None:
    """Rename out of sight first (a hidden name), so no half-deleted folder looks like a version or run."""
    if not path.exists():
        return
    hidden = path.with_name(f".pruning-{path.name}-{uuid.uuid4().hex[:6]}")
    os.replace(path, hidden)
    shutil.rmtree(hidden)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", default=argparse.SUPPRESS,
                        help="storage root (default $MNIST_STORAGE, else ./storage; /mnt/shared in a pod)")
    parser = argparse.ArgumentParser(prog="python -m training.versions", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", parents=[common], help="versions and which one serves")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    promote = commands.add_parser("promote", parents=[common], help="point latest at VERSION")
    promote.add_argument("version")
    commands.add_parser("rollback", parents=[common], help="back to the version that served before")
    pruning = commands.add_parser("prune", parents=[common], help="remove old versions that never served")
    pruning.add_argument("--keep", type=_non_negative, required=True, help="newest versions to keep in any case")
    pruning.add_argument("--dry-run", action="store_true", help="report what would go and the space freed; delete nothing")
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    storage = resolve_storage(getattr(args, "storage", None))
    try:
        if args.command != "list" and not models_dir(storage).is_dir():
            raise PromotionError(f"no models are published under {models_dir(storage)} (is --storage right?)")
        if args.command == "list":
            try:
                history = read_history(storage)
            except PromotionError as error:  # still worth listing; only the rollback column is unknown
                print(f"warning: {error}", file=sys.stderr)
                history = []
            rows = version_rows(storage, history)
            if args.json:
                print(json.dumps({"storage": str(storage), "serving": serving_version(storage), "versions": rows}, indent=2))
            else:
                print(format_rows(rows) if rows else f"no versions published under {models_dir(storage)}")
        elif args.command == "promote":
            before = promote_version(storage, args.version)
            print(f"{args.version} already serves; nothing moved" if before == args.version
                  else f"latest: {before or '(none)'} -> {args.version}")
        elif args.command == "rollback":
            before, after = rollback_version(storage)
            print(f"latest: {before} -> {after} (rolled back)")
        else:
            report = prune(storage, args.keep, args.dry_run)
            verb = "would remove" if args.dry_run else "removed"
            for removal in report["removed"]:
                print(f"{verb} {removal['version']}: {', '.join(removal['paths'])} ({removal['bytes'] / 1e6:.1f} MB)")
            print(f"{verb} {len(report['removed'])} versions, {report['bytes'] / 1e6:.1f} MB; "
                  f"kept {len(report['kept'])}")
    except PromotionError as error:
        print(f"error: {error}; nothing was changed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
