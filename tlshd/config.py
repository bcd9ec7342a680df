"""Configuration in the reference agent's key-file format (``/etc/tlshd/config``).

The format is GLib's key file, as ktls-utils reads it: ``[group]`` headers,
``key=value`` lines, ``#`` comments, ``;``-separated lists. Parsing is pure:
``parse_config(text, path)`` returns a frozen ``Config`` or raises ConfigError
naming ``file:line [group] key``. Unknown keys are collected as warnings, not
errors, so a file written for a newer reference agent still loads.

Keys understood (reference agent): ``[debug] loglevel, tls, nl``;
``[authenticate] keyrings``; ``[authenticate.client]`` and
``[authenticate.server]``: ``x509.truststore``, ``x509.crl``,
``x509.certificate``, ``x509.private_key`` (``x509.pq.*`` accepted).
Keys of this agent live in ``[agent]``: ``workers``, ``max_inflight`` (handshakes a
worker runs at once), ``handshake_timeout_ms`` (used when ACCEPT carries no timeout),
``require_client_cert`` (server x509), ``upcall`` (``auto``, ``netlink`` or
``kernel-sim[:ENDPOINT]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tlshd.errors import ConfigError

DEFAULT_PATHS = (Path("/etc/tlshd/config"), Path("/etc/tlshd.conf"))

_X509_KEYS = ("x509.truststore", "x509.crl", "x509.certificate", "x509.private_key")
_PQ_KEYS = ("x509.pq.certificate", "x509.pq.private_key")
# Handshakes one worker runs at once; more stay queued in the kernel (bench/burst.py,
# docs/performance.md: a small number keeps every accepted request fast under a storm)
MAX_INFLIGHT_DEFAULT = 16

_KNOWN: dict[str, tuple[str, ...]] = {
    "debug": ("loglevel", "tls", "nl"),
    "authenticate": ("keyrings",),
    "authenticate.client": _X509_KEYS + _PQ_KEYS,
    "authenticate.server": _X509_KEYS + _PQ_KEYS,
    "agent": ("workers", "max_inflight", "handshake_timeout_ms", "require_client_cert", "upcall",
              "metrics", "control_socket"),
}
_GROUP_RE = re.compile(r"^\[([^\[\]]+)\]$")


@dataclass(frozen=True)
class Entry:
    value: str
    line: int


@dataclass(frozen=True)
class X509Side:
    truststore: Path | None = None
    crl: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    pq_certificate: Path | None = None  # x509.pq.*: a second, post-quantum (ML-DSA) identity
    pq_private_key: Path | None = None


@dataclass(frozen=True)
class Config:
    client: X509Side = field(default_factory=X509Side)
    server: X509Side = field(default_factory=X509Side)
    keyrings: tuple[str, ...] = ()
    loglevel: int = 0
    tls_debug: int = 0
    nl_debug: int = 0
    workers: int = 0  # 0: one per CPU
    max_inflight: int = MAX_INFLIGHT_DEFAULT  # handshakes one worker runs at once
    handshake_timeout_ms: int = 10_000
    require_client_cert: bool = False
    upcall: str = "auto"
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint; off when empty
    control_socket: str = "tlshd/control"  # abstract Unix name, per network namespace
    path: Path | None = None
    warnings: tuple[str, ...] = ()


def parse_keyfile(text: str, where: str) -> dict[str, dict[str, Entry]]:
    """Split a key file into groups of key -> (value, line); syntax errors raise."""
    groups: dict[str, dict[str, Entry]] = {}
    current: dict[str, Entry] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _GROUP_RE.match(line)
        if match:
            current = groups.setdefault(match.group(1).strip(), {})
        elif "=" not in line:
            # The line is not quoted: it could be a pasted key or secret.
            raise ConfigError(f"expected 'key=value' or '[group]', got a {len(line)}-character "
                              "line of neither form",
                              where=f"{where}:{number}")
        elif current is None:
            raise ConfigError("key outside any [group]", where=f"{where}:{number}")
        else:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = Entry(value, number)
    return groups


def parse_config(text: str, path: Path | None = None) -> Config:
    where = str(path) if path else "<config>"
    groups = parse_keyfile(text, where)
    warnings = _unknown_keys(groups, where)
    return Config(
        client=_x509_side(groups.get("authenticate.client", {}), where, "authenticate.client"),
        server=_x509_side(groups.get("authenticate.server", {}), where, "authenticate.server"),
        keyrings=_list(groups.get("authenticate", {}).get("keyrings")),
        loglevel=_int(groups, "debug", "loglevel", where, 0, (0, 7)),
        tls_debug=_int(groups, "debug", "tls", where, 0, (0, 99)),
        nl_debug=_int(groups, "debug", "nl", where, 0, (0, 99)),
        workers=_int(groups, "agent", "workers", where, 0, (0, 256)),
        max_inflight=_int(groups, "agent", "max_inflight", where, MAX_INFLIGHT_DEFAULT,
                          (1, 4096)),
        handshake_timeout_ms=_int(groups, "agent", "handshake_timeout_ms", where, 10_000,
                                  (1, 3_600_000)),
        require_client_cert=_bool(groups, "agent", "require_client_cert", where),
        upcall=_upcall(groups, where),
        metrics=_metrics(groups, where),
        control_socket=_name(groups, "agent", "control_socket", where, "tlshd/control"),
        path=path,
        warnings=warnings,
    )


def load_config(path: Path | None = None) -> Config:
    """Read the named file, else the first default path that exists, else defaults."""
    candidates = (path,) if path is not None else DEFAULT_PATHS
    for candidate in candidates:
        if candidate.exists() or path is not None:
            try:
                text = candidate.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read: {exc.strerror}", where=str(candidate)) from None
            return parse_config(text, candidate)
    return Config()


def _unknown_keys(groups: dict[str, dict[str, Entry]], where: str) -> tuple[str, ...]:
    out = []
    for group, entries in groups.items():
        known = _KNOWN.get(group)
        for key, entry in entries.items():
            if known is None or key not in known:
                out.append(f"{where}:{entry.line}: [{group}] {key}: unknown key, ignored")
    return tuple(out)


def _x509_side(entries: dict[str, Entry], where: str, group: str) -> X509Side:
    paths: dict[str, Path | None] = {}
    for key in _X509_KEYS + _PQ_KEYS:
        entry = entries.get(key)
        if entry is not None and not entry.value:
            raise ConfigError("empty path", where=f"{where}:{entry.line} [{group}] {key}")
        field_name = key.removeprefix("x509.").replace("pq.", "pq_")
        paths[field_name] = Path(entry.value) if entry else None
    if (paths["pq_certificate"] is None) != (paths["pq_private_key"] is None):
        raise ConfigError("x509.pq.certificate and x509.pq.private_key go together",
                          where=f"{where} [{group}]")
    return X509Side(**paths)


def _list(entry: Entry | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(item.strip() for item in entry.value.split(";") if item.strip())


def _int(groups: dict[str, dict[str, Entry]], group: str, key: str, where: str, default: int,
         bounds: tuple[int, int]) -> int:
    entry = groups.get(group, {}).get(key)
    if entry is None:
        return default
    try:
        value = int(entry.value, 10)  # GLib reads "08" as 8 and refuses "0x10"; so do we
    except ValueError:
        value = None
    if value is None or not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"expected an integer in {bounds[0]}..{bounds[1]}, got {entry.value!r}",
                          where=f"{where}:{entry.line} [{group}] {key}")
    return value


def _bool(groups: dict[str, dict[str, Entry]], group: str, key: str, where: str) -> bool:
    entry = groups.get(group, {}).get(key)
    if entry is None:
        return False
    if entry.value.lower() in ("true", "1", "yes"):
        return True
    if entry.value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"expected true or false, got {entry.value!r}",
                      where=f"{where}:{entry.line} [{group}] {key}")


def _upcall(groups: dict[str, dict[str, Entry]], where: str) -> str:
    entry = groups.get("agent", {}).get("upcall")
    if entry is None:
        return "auto"
    if entry.value in ("auto", "netlink", "kernel-sim") or entry.value.startswith("kernel-sim:"):
        return entry.value
    raise ConfigError(f"expected auto, netlink or kernel-sim[:NAME], got {entry.value!r}",
                      where=f"{where}:{entry.line} [agent] upcall")


def parse_listen(value: str, where: str = "[agent] metrics") -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets); an empty host means 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {value!r}", where=where)
    return host.strip("[]") or "127.0.0.1", int(port)


def _metrics(groups: dict[str, dict[str, Entry]], where: str) -> str:
    entry = groups.get("agent", {}).get("metrics")
    if entry is None or not entry.value:
        return ""
    parse_listen(entry.value, f"{where}:{entry.line} [agent] metrics")
    return entry.value


def _name(groups: dict[str, dict[str, Entry]], group: str, key: str, where: str,
          default: str) -> str:
    entry = groups.get(group, {}).get(key)
    if entry is None:
        return default
    if not entry.value or len(entry.value) > 100 or "\0" in entry.value:
        raise ConfigError(f"expected a name of 1 to 100 characters, got {entry.value!r}",
                          where=f"{where}:{entry.line} [{group}] {key}")
    return entry.value
