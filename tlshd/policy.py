"""Application policy (``[app] policy_dir``): which process may ask for TLS on which socket.

Rules in the spirit of z/OS AT-TLS, in YAML files (``*.yml``, ``*.yaml``, read in sorted
order, the same YAML subset as the session-tag files)::

    rules:
      web-clients:
        priority: 100                 # higher first; equal: the order they were read in
        match:
          direction: outbound         # outbound (client), inbound (server) or any
          users: [www-data, 1000]     # names or uids
          executables: [/usr/bin/curl, "/opt/web/*"]
          cgroups: ["/system.slice/web.service"]
          remote: [10.0.0.0/8, "::1/128"]
          remote_ports: ["443", "8000-8999"]
          local: [...]
          local_ports: [...]
        action:
          tls: true                   # false: such requests are refused (EACCES)
          server_name: required       # outbound: a request without one is refused (EINVAL)
          credentials: web            # [app.credentials.web]: its certificate, trust and
                                      # client_auth, for these requests only

Every field of ``match`` is optional and an absent one matches anything; a list matches when
one item does; globs are whole-string, ``*`` and ``?`` only. The first rule that matches, by
priority, decides; a request that no rule matches is refused. The request's facts come from
the kernel: the uid from SCM_CREDENTIALS, the executable and cgroup from /proc of that pid,
the addresses from the socket itself.

This is security policy, so it fails closed: a policy with any problem (a file that does not
parse, an unknown key, a bad address) refuses every request and says why, and a reload that
brings one keeps the policy in force. ``tlshd doctor`` reports the problems, and
``tlshd policy explain`` shows which rule a connection maps to and why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tlshd.tags import miniyaml
from tlshd.tags.miniyaml import (
    Node,
    Scalar,
    SchemaError,
    Seq,
    expect_mapping,
    expect_scalar,
)
from tlshd.tags.rules import MAX_FILE_BYTES, compile_glob, yaml_files

POLICY_DIR = Path("/etc/tlshd/policy.d")
DIRECTIONS = ("outbound", "inbound", "any")
_LIST_FIELDS = ("users", "executables", "cgroups", "remote", "remote_ports", "local",
                "local_ports")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Facts:
    """What a request is judged by."""

    direction: str  # outbound | inbound
    uid: int
    executable: str = ""
    cgroup: str = ""
    remote: tuple[str, int] | None = None  # address, port
    local: tuple[str, int] | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    file: str
    priority: int
    order: int
    direction: str = "any"
    uids: frozenset[int] | None = None
    executables: tuple[re.Pattern[str], ...] | None = None
    cgroups: tuple[re.Pattern[str], ...] | None = None
    remote: tuple[Network, ...] | None = None
    remote_ports: tuple[tuple[int, int], ...] | None = None
    local: tuple[Network, ...] | None = None
    local_ports: tuple[tuple[int, int], ...] | None = None
    tls: bool = True
    server_name_required: bool = False
    credentials: str = ""  # [app.credentials.NAME] for its requests; "": [authenticate.*]

    def checks(self, facts: Facts) -> list[tuple[str, bool]]:
        """Each condition of ``match`` that the rule sets, and whether ``facts`` meet it."""
        out = []
        if self.direction != "any":
            out.append((f"direction {self.direction}", facts.direction == self.direction))
        if self.uids is not None:
            out.append((f"uid in {sorted(self.uids)}", facts.uid in self.uids))
        for what, globs, value in (("executable", self.executables, facts.executable),
                                   ("cgroup", self.cgroups, facts.cgroup)):
            if globs is not None:
                out.append((f"{what} {value or '?'}",
                            bool(value) and any(g.fullmatch(value) for g in globs)))
        for what, nets, ports, end in (("remote", self.remote, self.remote_ports, facts.remote),
                                       ("local", self.local, self.local_ports, facts.local)):
            if nets is not None:
                out.append((f"{what} address {end[0] if end else '?'}",
                            end is not None and _in_networks(end[0], nets)))
            if ports is not None:
                out.append((f"{what} port {end[1] if end else '?'}",
                            end is not None and any(a <= end[1] <= b for a, b in ports)))
        return out

    def matches(self, facts: Facts) -> bool:
        return all(ok for _, ok in self.checks(facts))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None
    reason: str


@dataclass(frozen=True)
class Policy:
    directory: Path
    rules: tuple[Rule, ...] = ()  # in the order they are tried
    files: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def decide(self, facts: Facts, *, server_name: str | None = None) -> Decision:
        if self.problems:
            return Decision(False, None, f"the policy has {len(self.problems)} problem(s): "
                                         "every request is refused (tlshd doctor)")
        for rule in self.rules:
            if not rule.matches(facts):
                continue
            if not rule.tls:
                return Decision(False, rule, f"rule {rule.name} refuses TLS here")
            if rule.server_name_required and facts.direction == "outbound" and not server_name:
                return Decision(False, rule, f"rule {rule.name} requires a server name")
            return Decision(True, rule, f"rule {rule.name}")
        return Decision(False, None, "no rule allows it")


PolicyError = SchemaError  # a problem in a policy file, with its line


def load_policy(directory: Path = POLICY_DIR) -> Policy:
    """Read every policy file; never raises (problems are in the result)."""
    names, problem = yaml_files(directory)
    if problem:
        return Policy(directory, problems=(problem,))
    texts, problems = [], []
    for name in names:
        try:
            data = (directory / name).read_bytes()[:MAX_FILE_BYTES + 1]
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            texts.append((name, data.decode("utf-8")))
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {getattr(exc, 'strerror', None) or exc}")
    policy = parse_policy_texts(texts, directory)
    return Policy(directory, policy.rules, tuple(names), (*problems, *policy.problems))


def parse_policy_texts(texts: Iterable[tuple[str, str]], directory: Path = POLICY_DIR
                       ) -> Policy:
    rules: list[Rule] = []
    files, problems = [], []
    for name, text in texts:
        files.append(name)
        try:
            for document in miniyaml.parse(text):
                rules += _document(name, document, len(rules), {r.name for r in rules})
        except (miniyaml.YAMLError, PolicyError) as exc:
            problems.append(f"{name}:{exc.line}: {getattr(exc, 'reason', exc)}")
    ordered = sorted(rules, key=lambda r: (-r.priority, r.order))
    return Policy(directory, tuple(ordered), tuple(files), tuple(problems))


def _document(file: str, node: Node, first: int, taken: set[str]) -> list[Rule]:
    top = expect_mapping(node, "a policy file")
    rules: list[Rule] = []
    for key, value in top.pairs:
        if key.value != "rules":
            raise PolicyError(f"unexpected key {key.value[:40]!r} (only 'rules')", key.line)
        for name, body in expect_mapping(value, "rules").pairs:
            if not _NAME.fullmatch(name.value):
                raise PolicyError(f"rule name {name.value[:40]!r}: 1 to 64 of [A-Za-z0-9_.-]",
                                  name.line)
            if name.value in taken:
                raise PolicyError(f"rule {name.value} is defined twice", name.line)
            taken.add(name.value)
            rules.append(_rule(file, name, body, first + len(rules)))
    return rules


def _rule(file: str, name: Scalar, body: Node, order: int) -> Rule:
    fields: dict[str, object] = {"name": name.value, "file": file, "order": order,
                                 "priority": 0}
    for key, value in expect_mapping(body, f"rule {name.value}").pairs:
        if key.value == "priority":
            fields["priority"] = _int(value, "priority", -1_000_000, 1_000_000)
        elif key.value == "match":
            fields.update(_match(value))
        elif key.value == "action":
            fields.update(_action(value))
        else:
            raise PolicyError(f"rule {name.value}: unexpected key {key.value[:40]!r} "
                              "(priority, match, action)", key.line)
    return Rule(**fields)  # type: ignore[arg-type]


def _match(node: Node) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in expect_mapping(node, "match").pairs:
        if key.value == "direction":
            direction = expect_scalar(value, "direction").value
            if direction not in DIRECTIONS:
                raise PolicyError(f"direction {direction[:20]!r}: one of "
                                  f"{', '.join(DIRECTIONS)}", value.line)
            out["direction"] = direction
        elif key.value in _LIST_FIELDS:
            items = [expect_scalar(i, key.value).value for i in _seq(value, key.value).items]
            out.update(_list_field(key.value, items, value.line))
        else:
            raise PolicyError(f"match: unexpected key {key.value[:40]!r} (direction, "
                              f"{', '.join(_LIST_FIELDS)})", key.line)
    return out


def _list_field(name: str, items: list[str], line: int) -> dict[str, object]:
    try:
        if name == "users":
            return {"uids": frozenset(uid_of(i) for i in items)}
        if name in ("executables", "cgroups"):
            return {name: tuple(compile_glob(i) for i in items)}
        if name in ("remote", "local"):
            return {name: tuple(ipaddress.ip_network(i, strict=False) for i in items)}
        return {name: tuple(_port_range(i) for i in items)}
    except ValueError as exc:
        raise PolicyError(f"{name}: {exc}", line) from None


def uid_of(item: str) -> int:
    """A user name or a numeric uid; ValueError for a name that is no user."""
    if item.isdigit():
        return int(item)
    try:
        return pwd.getpwnam(item).pw_uid
    except KeyError:
        raise ValueError(f"no user {item[:40]!r}") from None


def _port_range(item: str) -> tuple[int, int]:
    low, _, high = item.partition("-")
    a, b = int(low), int(high or low)
    if not 0 < a <= b <= 65535:
        raise ValueError(f"port range {item[:20]!r}")
    return a, b


def _action(node: Node) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in expect_mapping(node, "action").pairs:
        text = expect_scalar(value, key.value).value
        if key.value == "tls" and text in ("true", "false"):
            out["tls"] = text == "true"
        elif key.value == "server_name" and text in ("required", "optional"):
            out["server_name_required"] = text == "required"
        elif key.value == "credentials" and _NAME.fullmatch(text):
            out["credentials"] = text
        else:
            raise PolicyError(f"action: {key.value[:40]!r}: {text[:20]!r} (tls: true|false, "
                              "server_name: required|optional, credentials: NAME of "
                              "[app.credentials.NAME])", key.line)
    return out


def _seq(node: Node, what: str) -> Seq:
    if isinstance(node, Scalar) and node.value:
        return Seq((node,), node.line)  # one item may stand alone
    if not isinstance(node, Seq):
        raise PolicyError(f"{what}: expected a list", node.line)
    return node


def _int(node: Node, what: str, low: int, high: int) -> int:
    text = expect_scalar(node, what).value
    try:
        value = int(text)
    except ValueError:
        raise PolicyError(f"{what}: {text[:20]!r} is not a number", node.line) from None
    if not low <= value <= high:
        raise PolicyError(f"{what}: {value} is outside {low}..{high}", node.line)
    return value


def _in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def process_ids(pid: int) -> tuple[int, int, int]:
    """A process's (or thread's) thread-group id, real uid and effective uid, from
    /proc/PID/status; OSError if it is gone, ValueError if the file is not as expected."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    uids = fields["Uid"].split()
    return int(fields["Tgid"]), int(uids[0]), int(uids[1])


def facts_of(caller_pid: int, uid: int, direction: str, sock_fd: int | None = None) -> Facts:
    """The facts of a request from /proc and its socket (the caller's executable and
    cgroup as they are now: a process that exec'd since sending is judged as it is)."""
    executable = cgroup = ""
    with contextlib.suppress(OSError):
        executable = os.readlink(f"/proc/{caller_pid}/exe")
    try:
        for line in Path(f"/proc/{caller_pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                cgroup = line[3:]
    except OSError:
        pass
    remote = local = None
    if sock_fd is not None:
        try:
            with socket.socket(fileno=os.dup(sock_fd)) as sock:
                remote = sock.getpeername()[:2]
                local = sock.getsockname()[:2]
        except OSError:
            pass
    return Facts(direction, uid, executable, cgroup, remote, local)


def explain(policy: Policy, facts: Facts, server_name: str | None = None) -> list[str]:
    """Lines for ``tlshd policy explain``: every rule in the order tried, its checks, and
    the decision."""
    lines = [f"policy from {policy.directory}: {len(policy.rules)} rule(s) in "
             f"{len(policy.files)} file(s)"]
    lines += [f"  problem: {p}" for p in policy.problems]
    decision = policy.decide(facts, server_name=server_name)
    for rule in policy.rules:
        checks = rule.checks(facts)
        verdict = "matches" if all(ok for _, ok in checks) else "does not match"
        lines.append(f"rule {rule.name} (priority {rule.priority}, {rule.file}): {verdict}")
        lines += [f"    {'ok  ' if ok else 'FAIL'} {what}" for what, ok in checks]
        if rule is decision.rule:
            break
    lines.append(f"decision: {'allowed' if decision.allowed else 'refused'} ({decision.reason})")
    return lines
