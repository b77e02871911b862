"""python -m ray_cluster up | down | status | env   (and `kuberay ...` for Kubernetes)."""
import argparse
import json
import sys

from ray_cluster import local


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a local Ray head on 127.0.0.1 (idempotent)")
    start.add_argument("--num-cpus", type=int, help="logical CPUs to offer (default: all cores)")
    start.add_argument("--python-proxy", action="store_true",
                       help="Serve's Python proxy as the ingress instead of HAProxy (the default, on 127.0.0.1 "
                            "like every port of this cluster): slower, Ray's ingress before 2.56")
    commands.add_parser("down", help="stop the local Ray head started by `up`")
    commands.add_parser("status", help="print addresses and resources of the local cluster")
    commands.add_parser("env", help="print the exports that let a shell's Ray clients in (token auth): "
                                    'eval "$(python -m ray_cluster env)"')
    try:
        from ray_cluster import kuberay_cli
        kuberay_cli.add_subparser(commands)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            local.up(num_cpus=args.num_cpus, haproxy=not args.python_proxy)
        elif args.command == "down":
            local.down()
        elif args.command == "env":
            local.ensure_token()
            print(local.env_line())
        elif args.command == "status":
            print(json.dumps(local.status(), indent=2))
        else:
            return args.run(args)
    except local.ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
