"""The `meshproxy` command: argument parsing, then config loading and the right runner.

Exit codes: 0 ok, 1 bad config or input, 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import Address, ConfigError, load_config
from .config.model import parse_duration
from .errors import UsageError
from .logs import LEVELS, setup_logging

COMMANDS = ("run", "check", "demo", "demo-upstream", "ca")


def _address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"must be host:port, got {text!r}")
    return Address(host.strip("[]"), int(port))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    """`20`, `20s` or `2m`: a positive number of seconds."""
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 24h, got {text!r}")
    return seconds


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of requests per second, got {text!r}") from None
    if not 1 <= rate <= 5000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 5000 requests per second, got {text!r}")
    return rate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshproxy",
        description="A service-mesh sidecar proxy. `meshproxy --config FILE` runs a sidecar.",
    )
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a sidecar (the default command)")
    run.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--log-level", choices=LEVELS, default="info")

    check = commands.add_parser("check", help="validate a config file and print every error")
    check.add_argument("--config", required=True, metavar="FILE", help="YAML config file")

    demo = commands.add_parser(
        "demo", help="the mesh in a box: a CA, sidecars with mTLS, demo services and load, live",
        description="Start a small mesh on this machine and watch it: the CA, a frontend and a "
                    "backend in two versions (v1, v2), each behind its own sidecar, mTLS and an "
                    "authorization policy between them, a 90/10 canary split and a load generator. "
                    "Keys: s shifts the canary, b breaks backend v2, f fixes it, r shows the "
                    "certificates, q quits. On exit an HDR latency report is written.")
    demo.add_argument("--duration", type=_seconds, metavar="S",
                      help="run unattended for S seconds (break and fix v2 half-way), print a summary; "
                           "exit 0 if at least 99%% of the requests succeeded, else 1")
    demo.add_argument("--netns", action="store_true",
                      help="each service in its own network namespace and veth pair (root only)")
    demo.add_argument("--rate", type=_rate, default=200.0, metavar="R",
                      help="requests per second sent to the frontend (default 200)")
    demo.add_argument("--report-dir", type=Path, default=Path("meshproxy-demo-report"), metavar="DIR",
                      help="where the report goes (default ./meshproxy-demo-report)")
    demo.set_defaults(log_level="warning")

    upstream = commands.add_parser("demo-upstream", help="run a tiny HTTP origin for trying meshproxy out")
    upstream.add_argument("--address", type=_address, default=Address("127.0.0.1", 9001),
                          help="host:port to listen on (default 127.0.0.1:9001)")
    upstream.add_argument("--name", default="demo-upstream", help="name it answers with")
    upstream.add_argument("--log-level", choices=LEVELS, default="info")

    ca = commands.add_parser("ca", help="run the certificate authority that issues sidecar identities")
    ca.set_defaults(log_level="info")
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)
    ca_init = ca_commands.add_parser("init", help="create a root and an intermediate CA in a new directory")
    ca_init.add_argument("--dir", required=True, type=Path, help="CA directory to create (mode 0700)")
    ca_init.add_argument("--trust-domain", required=True, metavar="DOMAIN",
                         help="SPIFFE trust domain, e.g. mesh.local")
    ca_token = ca_commands.add_parser("token", help="mint a bootstrap token for one identity; prints it alone")
    ca_token.add_argument("--dir", required=True, type=Path, help="CA directory")
    ca_token.add_argument("--identity", required=True, metavar="SPIFFE_ID",
                          help="e.g. spiffe://mesh.local/ns/default/sa/web")
    ca_token.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                          help="how long the token stays valid (default 1h)")
    ca_token.add_argument("--uses", type=int, default=1, help="how many certificates it can get (default 1)")
    ca_serve = ca_commands.add_parser("serve", help="serve the signing API over HTTPS")
    ca_serve.add_argument("--dir", required=True, type=Path, help="CA directory")
    ca_serve.add_argument("--address", type=_address, default=Address("127.0.0.1", 15012),
                          help="host:port to listen on (default 127.0.0.1:15012)")
    ca_serve.add_argument("--log-level", choices=LEVELS, default="info")

    for sub in (run, check, demo, upstream, ca, ca_init, ca_token, ca_serve):
        sub.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """`meshproxy --config FILE` means `meshproxy run --config FILE`."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return ["run", *argv]
    return argv


def _load(path: str) -> object:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config ({len(exc.errors)} error(s)):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error.path or '(top)'}: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)

    if args.command == "check":
        config = _load(args.config)
        print(f"{args.config}: ok ({len(config.listeners)} listener(s), {len(config.clusters)} cluster(s))")
        raise SystemExit(0)

    setup_logging(args.log_level, "supervisor" if args.command == "run" else args.command)
    try:
        if args.command == "run":
            from . import supervisor

            config = _load(args.config)
            raise SystemExit(supervisor.run(config, args.log_level, args.config))
        if args.command == "demo":
            from .demo.session import DemoOptions, run_demo

            options = DemoOptions(duration=args.duration, netns=args.netns, rate=args.rate,
                                  report_dir=args.report_dir)
            raise SystemExit(run_demo(options))
        if args.command == "demo-upstream":
            import trio

            from .demo.upstream import serve

            try:
                trio.run(serve, args.address, args.name)
            except KeyboardInterrupt:
                pass
            raise SystemExit(0)
        if args.command == "ca":
            from .ca import commands as ca

            if args.ca_command == "init":
                ca.init(args.dir, args.trust_domain)
            elif args.ca_command == "token":
                print(ca.token(args.dir, args.identity, args.ttl, args.uses))
            else:
                ca.serve(args.dir, args.address)
            raise SystemExit(0)
    except UsageError as exc:
        logging.getLogger("meshproxy").error("%s", exc)
        raise SystemExit(1) from None
    except OSError as exc:
        logging.getLogger("meshproxy").error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
