"""Command line: ``tlshd [-c FILE] [-s]`` runs the agent; ``doctor``, ``status``, ``run``, ``demo``.

Flags of the reference agent: ``-c/--config``, ``-s/--stderr`` (stderr as well as syslog),
``-h/--help``, ``-v/--version`` (on stderr, as ktls-utils prints it). Exit status, as the
reference's: 0 after a clean stop, 1 for every failure (a configuration or start-up error,
whose message says what to fix, or a usage error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from tlshd import __version__
from tlshd.config import Config, load_config
from tlshd.early import Held
from tlshd.errors import TlshdError

log = logging.getLogger("tlshd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error exits 1, as ktls-utils' getopt loop does (EXIT_FAILURE)."""
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_string(), file=sys.stderr)
        parser.exit(0)


def version_string() -> str:
    """As ktls-utils' ``-v`` ("tlshd, built from ktls-utils X ..."), naming the TLS library."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "(not installed)"

    try:
        from OpenSSL import SSL

        openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except ImportError:
        openssl = "OpenSSL (not loadable)"
    return (f"tlshd, built from tlshd {__version__} (Python {sys.version.split()[0]}; TLS "
            f"library: {openssl} through pyOpenSSL {installed('pyOpenSSL')} and cryptography "
            f"{installed('cryptography')})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tlshd", description="TLS handshake agent for the Linux kernel's kTLS consumers")
    parser.add_argument("command", nargs="?", default="agent",
                        choices=("agent", "run", "demo", "doctor", "status", "install",
                                 "tags", "policy"),
                        help="agent (default): serve the kernel; doctor: check this host and "
                             "say what to fix; status: what the running agent of this network "
                             "namespace is doing; demo: kernel-sim demonstration; run: agent if "
                             "this kernel has the handshake family, else demo; install: "
                             "the systemd units and a commented /etc/tlshd/config; tags "
                             "CERT...: the session tags a client certificate would get; "
                             "policy explain: which [app] rule a connection maps to, and why")
    parser.add_argument("files", nargs="*", type=Path, metavar="CERT",
                        help="tags: certificate files (PEM or DER)")
    parser.add_argument("-c", "--config", type=Path, help="configuration file "
                        "(default /etc/tlshd/config, then /etc/tlshd.conf)")
    parser.add_argument("-s", "--stderr", action="store_true",
                        help="log to stderr as well as syslog")
    parser.add_argument("-v", "--version", action=_Version, nargs=0,
                        help="print the version and TLS library, then exit")
    parser.add_argument("--upcall", help="auto, netlink or kernel-sim[:ENDPOINT]")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="status: print the JSON document")
    explain = parser.add_argument_group("policy explain: the connection to judge")
    explain.add_argument("--user", default="root", help="name or uid (default root)")
    explain.add_argument("--exe", default="", help="the executable's path")
    explain.add_argument("--cgroup", default="", help="the cgroup (v2 path)")
    explain.add_argument("--direction", choices=("outbound", "inbound"), default="outbound")
    explain.add_argument("--remote", default="", help="ADDRESS:PORT of the peer")
    explain.add_argument("--local", default="", help="ADDRESS:PORT of this end")
    explain.add_argument("--server-name", default=None, help="the name a client asks for")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install: the file system root to install into (default /)")
    return parser


def main(argv: Sequence[str] | None = None, *, held: Held | None = None) -> int:
    """``held``: the group membership tlshd.early took before this module was imported; the
    supervisor keeps it until its workers listen, and it goes with the process on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["wrap"]:
        return _wrap(argv[1:])
    args = build_parser().parse_intermixed_args(argv)
    if args.command == "run" and not _kernel_has_family():
        print("tlshd run: this kernel has no 'handshake' netlink family (CONFIG_NET_HANDSHAKE, "
              "Linux 6.4+), so nothing could reach an agent: running the kernel-sim demo "
              "instead", file=sys.stderr, flush=True)
        args.command = "demo"
    if args.command == "demo":
        try:
            from kernel_sim.demo import run_demo  # the one way into the simulator from here
        except ImportError:
            print("tlshd demo: kernel-sim is not installed (pip install ./kernel-sim)",
                  file=sys.stderr)
            return 1
        return run_demo()
    if args.command in ("install", "doctor", "policy"):
        return _tool(args)
    if args.files and args.command != "tags":
        print(f"tlshd {args.command}: unexpected arguments", file=sys.stderr)
        return 2
    try:
        config = _load(args)
        if args.command == "tags":
            return _tags(config, args.files)
        if args.command == "status":
            return _status(config, as_json=args.json)
        from tlshd.agent.supervisor import configure_logging, serve

        configure_logging(args.stderr, config)
        log.info("%s", version_string().replace("tlshd, built", "Built", 1))
        for notice in config.notices:
            log.info("%s", notice)
        if os.environ.get("SSLKEYLOGFILE"):
            log.warning("SSLKEYLOGFILE is set: the secrets of every handshake are written to "
                        "%r (for debugging only)", os.environ["SSLKEYLOGFILE"][:200])
        for warning in config.warnings:
            log.warning("%s", warning)
        return serve(config, load=lambda: _load(args), held=held)
    except TlshdError as exc:
        print(f"tlshd: {exc}", file=sys.stderr)
        return 1


def _load(args: argparse.Namespace) -> Config:
    """The configuration with the command line's overrides (also what SIGHUP re-reads)."""
    config = load_config(args.config)
    if args.upcall:
        config = replace(config, upcall=args.upcall)
    if args.workers is not None:
        config = replace(config, workers=args.workers)
    return config


def _status(config: Config, *, as_json: bool) -> int:
    from tlshd.agent.control import query_status
    from tlshd.agent.stats import format_status

    doc = query_status(("\0" + config.control_socket).encode())
    print(json.dumps(doc, indent=2) if as_json else format_status(doc), end="" if not as_json
          else "\n")
    return 0


def _tags(config: Config, files: list[Path]) -> int:
    from tlshd.tags import load_tags
    from tlshd.tags.explain import explain

    if not files:
        print("tlshd tags: name one or more certificate files", file=sys.stderr)
        return 2
    return explain(load_tags(config.tags_dir), files, sys.stdout)


def _tool(args: argparse.Namespace) -> int:
    """The commands that run without an agent: install, doctor, policy explain."""
    if args.command == "install":
        from tlshd.install import install, this_executable

        return install(args.root, this_executable(), sys.stdout)
    if args.command == "doctor":
        from tlshd.doctor import run_doctor

        return run_doctor(args.config, args.upcall, sys.stdout)
    return _policy(args)


def _policy(args: argparse.Namespace) -> int:
    from tlshd.policy import Facts, explain, load_policy, uid_of

    if [str(f) for f in args.files] != ["explain"]:
        print("tlshd policy: the one subcommand is 'explain'", file=sys.stderr)
        return 2
    try:
        config = _load(args)
        facts = Facts(args.direction, uid_of(args.user), args.exe, args.cgroup,
                      _endpoint(args.remote), _endpoint(args.local))
    except (TlshdError, ValueError) as exc:
        print(f"tlshd policy: {exc}", file=sys.stderr)
        return 2
    policy = load_policy(config.app_policy_dir)
    lines = explain(policy, facts, args.server_name)
    print("\n".join(lines))
    return 0 if policy.decide(facts, server_name=args.server_name).allowed else 1


def wrap_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlshd wrap", description="run PROGRAM with TLS under its TCP "
                     "connect() and accept() calls: the agent's handshake and kTLS "
                     "(seccomp user notification, Linux 5.14+)")
    parser.add_argument("--policy", type=Path, help="which connections get TLS: a rule file "
                        "in the format of [app] policy_dir (tls: false leaves a connection in "
                        "plain, and so does matching no rule); default: every TCP connection")
    parser.add_argument("--server-name", help="outbound: the name the server's certificate "
                        "must carry (and SNI); default: the peer's address")
    parser.add_argument("-c", "--config", type=Path,
                        help="the agent's configuration, for [app] socket")
    parser.add_argument("--endpoint", help="the agent's application endpoint (default: "
                        "[app] socket of the configuration, else tlshd/app)")
    parser.add_argument("--timeout-ms", type=int, default=10_000,
                        help="each connect and handshake (default 10000)")
    parser.add_argument("--verbose", action="store_true",
                        help="a line on stderr for each connection handled")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS")
    return parser


def _wrap(argv: list[str]) -> int:
    from tlshd.seccomp import UnsupportedError
    from tlshd.wrap import WrapOptions, load_wrap_policy, run

    args = wrap_parser().parse_args(argv)
    program = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not program:
        print("tlshd wrap: name the program to run (tlshd wrap -- PROGRAM ARGS...)",
              file=sys.stderr)
        return 2
    if not 1 <= args.timeout_ms <= 600_000:
        print("tlshd wrap: --timeout-ms must be 1..600000", file=sys.stderr)
        return 2
    policy = None
    if args.policy:
        try:
            policy = load_wrap_policy(args.policy)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"tlshd wrap: {args.policy}: {exc}", file=sys.stderr)
            return 2
        if policy.problems:
            print("\n".join(f"tlshd wrap: {problem}" for problem in policy.problems),
                  file=sys.stderr)
            return 2
    endpoint = args.endpoint or _app_endpoint(args.config)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    try:
        return run(WrapOptions(program, policy, args.server_name, endpoint, args.timeout_ms))
    except UnsupportedError as exc:
        print(f"tlshd wrap: {exc.strerror}", file=sys.stderr)
        return 1


def _app_endpoint(path: Path | None) -> str:
    """``[app] socket`` of the agent's configuration; the default if it cannot be read."""
    try:
        return load_config(path).app_socket
    except TlshdError:
        from tlshd.app import DEFAULT_ENDPOINT

        return DEFAULT_ENDPOINT


def _endpoint(text: str) -> tuple[str, int] | None:
    """ADDRESS:PORT, [IPv6]:PORT; "" for none."""
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text[:60]!r}: expected ADDRESS:PORT")
    return host.strip("[]"), int(port)


def _kernel_has_family() -> bool:
    from tlshd.upcall import NetlinkUpcall

    try:
        NetlinkUpcall(join=False).close()
    except (TlshdError, OSError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
