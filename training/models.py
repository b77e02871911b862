"""Published model versions and which one serves: the promotion policy and a CLI to look and to move.

    python -m training.models list                 versions, accuracy, run, created; which one serves
    python -m training.models promote VERSION      point `latest` at VERSION
    python -m training.models rollback             back to the version that served before
    python -m training.models prune --keep N [--dry-run]

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
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from training.storage import (PromotionError, is_version_name, models_dir, promote_version, promotion_lock,
                              published_versions, publish_version, point_latest_locked, read_history, resolve_storage,
                              serving_version, rollback_target, rollback_version, run_dir, version_metadata)

POLICIES = ("auto", "always", "never")
# auto promotes a full-data run scoring at least the serving model's test accuracy less this:
# 0.1 point, 10 of the 10,000 test images: about the spread of one recipe over seeds (three seeds of
# the chosen one gave 99.29-99.40% in bench/model_sweep.py), so a rerun is not refused for noise.
TOLERANCE = 0.001


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
    parser = argparse.ArgumentParser(prog="python -m training.models", description=__doc__, parents=[common],
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
