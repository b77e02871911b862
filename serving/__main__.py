"""python -m serving deploy | config | status | delete   (see serving/deploy.py)."""
import argparse
import json
import sys

import yaml

from serving import deploy
from training.storage import STORAGE_ENV


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=deploy.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("deploy", "deploy the app on the local Ray cluster and print its URLs"),
                       ("config", "print the Serve config fitted to this node (for `serve deploy FILE`)")]:
        command = commands.add_parser(name, help=text)
        command.add_argument("--storage", help=f"storage root (default ${STORAGE_ENV}, else ./storage)")
        command.add_argument("--name", help="API application name (default mnist; the page is <name>-ui)")
        command.add_argument("--route-prefix", help="API route prefix (default /; the page is <prefix>/ui)")
        command.add_argument("--model-replicas", type=int, help="fixed number of model replicas")
        command.add_argument("--split", action="store_true",
                             help="API (MnistApi) and model (MnistModel) as two deployments, each scaled on "
                                  "its own (default: one, MnistService: fastest; docs/SERVING.md)")
    commands.add_parser("status", help="applications on the local cluster")
    remove = commands.add_parser("delete", help="delete the applications deployed by `deploy`")
    remove.add_argument("--name", default="mnist")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except deploy.DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.command == "status":
        apps = deploy.serve_details().get("applications") or {}
        print(json.dumps({name: {k: app.get(k) for k in ("status", "route_prefix", "source", "message")}
                          for name, app in apps.items()}, indent=2))
        return 0
    if args.command == "delete":
        found = deploy.delete([args.name, f"{args.name}-ui"])
        print(f"deleted {', '.join(found)}" if found else f"{args.name} is not deployed")
        return 0
    config = deploy.local_config(args.storage, args.name, args.route_prefix, args.model_replicas, args.split)
    if args.command == "config":
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    api, ui = deploy.app_pair(config)
    print(f"Deploying {api['name']!r} and {ui['name']!r} "
          f"(storage {api['runtime_env']['env_vars'][STORAGE_ENV]}) ...")
    deploy.deploy(config)
    links = deploy.urls(api["route_prefix"])
    state = deploy.health(links["health"])
    for label, url in links.items():
        print(f"  {label:10} {url}")
    ready = state.get("status") == "ready"
    print(f"Model: {state.get('model_version')}" if ready else f"Not ready yet: {state.get('message')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
