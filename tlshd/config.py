r"""Configuration in the reference agent's key-file format (``/etc/tlshd/config``).

The format is GLib's key file, as ktls-utils reads it: ``[group]`` headers,
``key=value`` lines, ``#`` comments, ``;``-separated lists, the escapes ``\s \n \t \r
\\`` (and ``\;`` in lists). Parsing is pure: ``parse_config(text, path)`` returns a frozen
``Config``. It is as lenient as the reference, which reads values with GLib and uses zero or
nothing for what does not parse (src/tlshd/config.c: "These calls return zero if the key isn't
present or the specified key value is invalid"): a bad value of a reference key is a warning
(``Config.warnings``, which the agent logs and ``tlshd doctor`` fails on), never a refusal to
start. Only what GLib itself refuses (a line that is neither group, key nor comment, a key
before any group) and bad values of this agent's own ``[agent]`` keys raise ConfigError
naming ``file:line [group] key``. Unknown keys are warnings, so a file written for a newer
reference agent still loads.

Keys understood (reference agent): ``[debug] loglevel, tls, nl, delay_done``;
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from tlshd.errors import ConfigError
from tlshd.untrusted import show

# ktls-utils 1.4.0 src/tlshd/main.c: /etc/tlshd.conf first ("Please relocate /etc/tlshd.conf to
# /etc/tlshd/config"), then /etc/tlshd/config.
LEGACY_PATH = Path("/etc/tlshd.conf")
DEFAULT_PATHS = (LEGACY_PATH, Path("/etc/tlshd/config"))
RELOCATE_NOTICE = "Please relocate /etc/tlshd.conf to /etc/tlshd/config"

_X509_KEYS = ("x509.truststore", "x509.crl", "x509.certificate", "x509.private_key")
_PQ_KEYS = ("x509.pq.certificate", "x509.pq.private_key")
# Handshakes one worker runs at once; more stay queued in the kernel (bench/burst.py,
# docs/performance.md: a small number keeps every accepted request fast under a storm)
MAX_INFLIGHT_DEFAULT = 16

_KNOWN: dict[str, tuple[str, ...]] = {
    "debug": ("loglevel", "tls", "nl", "delay_done"),
    "authenticate": ("keyrings", "groups"),
    "authenticate.client": _X509_KEYS + _PQ_KEYS,
    "authenticate.server": _X509_KEYS + _PQ_KEYS,
    "agent": ("workers", "max_inflight", "handshake_timeout_ms", "require_client_cert", "upcall",
              "log_success", "cn_fallback", "first_flight_timeout_ms", "max_inflight_per_peer",
              "max_waiting", "privsep", "worker_user", "failure_log_burst", "tags_dir",
              "metrics", "control_socket"),
    "app": ("enabled", "socket", "allow_users", "policy_dir"),
}
APP_CREDENTIALS = "app.credentials."  # [app.credentials.NAME]: what a policy rule may name
_APP_CREDENTIAL_KEYS = (*_X509_KEYS, "client_auth")
CLIENT_AUTH = ("none", "optional", "required")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GROUP_RE = re.compile(r"^\[([^\[\]]+)\]$")
TAGS_DIR = Path("/etc/tlshd/tags.d")  # ktls-utils 1.4.0: session tags (src/tlshd/main.c)


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
class AppCredentials:
    """``[app.credentials.NAME]``: credentials and trust a policy rule gives its requests.
    ``client_auth`` (as a server): none, optional (asked for, verified when sent) or
    required (verified, and a client without one is refused)."""

    side: X509Side
    client_auth: str = "optional"


@dataclass(frozen=True)
class Config:
    client: X509Side = field(default_factory=X509Side)
    server: X509Side = field(default_factory=X509Side)
    keyrings: tuple[str, ...] = ()
    groups: str = ""  # key exchange groups, OpenSSL 3.5 syntax; "": builders.DEFAULT_GROUPS
    loglevel: int = 0  # any integer, as GLib reads it; non-zero turns debug lines on
    tls_debug: int = 0
    nl_debug: int = 0
    delay_done: int = 0  # seconds to hold each DONE (ktls-utils' undocumented test knob)
    workers: int = 0  # 0: one per CPU
    max_inflight: int = MAX_INFLIGHT_DEFAULT  # handshakes one worker runs at once
    handshake_timeout_ms: int = 10_000
    require_client_cert: bool = False
    log_success: bool = True  # a line per successful handshake (failures are always logged)
    cn_fallback: bool = False  # a server certificate's subject CN may carry its name
    first_flight_timeout_ms: int = 2_000  # the peer's first message must be whole by then
    max_inflight_per_peer: int = 64  # server handshakes one client address may hold
    max_waiting: int = 256  # server handshakes a worker holds while awaiting their hello
    failure_log_burst: int = 5  # failure lines per source in 10 s; 0: every one
    privsep: bool = True  # handshakes in a confined process (tlshd/agent/privsep.py); root only
    worker_user: str = "nobody"  # whom the confined handshake processes run as
    upcall: str = "auto"
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint; off when empty
    control_socket: str = "tlshd/control"  # abstract Unix name, per network namespace
    tags_dir: Path = TAGS_DIR  # session-tag files (ktls-utils 1.4: fixed /etc/tlshd/tags.d)
    app_enabled: bool = False  # [app]: TLS for applications' own sockets (tlshd.app)
    app_socket: str = "tlshd/app"  # its abstract Unix name, per network namespace
    app_allow_users: tuple[str, ...] = ("root",)  # users (names or uids) who may ask
    app_policy_dir: Path = Path("/etc/tlshd/policy.d")  # rules; when any, they decide instead
    app_credentials: dict[str, AppCredentials] = field(default_factory=dict)  # by NAME
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()  # informational, logged at start (the relocation notice)


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
    warnings = list(_unknown_keys(groups, where))
    debug = groups.get("debug", {})

    def glib_int(key: str) -> int:
        return _glib_int(debug.get(key), where, f"[debug] {key}", warnings)

    delay_done = glib_int("delay_done")
    return Config(
        client=_x509_side(groups.get("authenticate.client", {}), where, "authenticate.client",
                          warnings),
        server=_x509_side(groups.get("authenticate.server", {}), where, "authenticate.server",
                          warnings),
        keyrings=_list(groups.get("authenticate", {}).get("keyrings"), where,
                       "[authenticate] keyrings", warnings),
        groups=_groups(groups.get("authenticate", {}).get("groups"), where, warnings),
        loglevel=glib_int("loglevel"),
        tls_debug=glib_int("tls"),
        nl_debug=glib_int("nl"),
        delay_done=delay_done if delay_done > 0 else 0,  # as config.c: tmp > 0 ? tmp : 0
        workers=_int(groups, "agent", "workers", where, 0, (0, 256)),
        max_inflight=_int(groups, "agent", "max_inflight", where, MAX_INFLIGHT_DEFAULT,
                          (1, 4096)),
        handshake_timeout_ms=_int(groups, "agent", "handshake_timeout_ms", where, 10_000,
                                  (1, 3_600_000)),
        require_client_cert=_bool(groups, "agent", "require_client_cert", where),
        log_success=_bool(groups, "agent", "log_success", where, default=True),
        cn_fallback=_bool(groups, "agent", "cn_fallback", where),
        first_flight_timeout_ms=_int(groups, "agent", "first_flight_timeout_ms", where, 2_000,
                                     (1, 3_600_000)),
        max_inflight_per_peer=_int(groups, "agent", "max_inflight_per_peer", where, 64,
                                   (1, 65_536)),
        max_waiting=_int(groups, "agent", "max_waiting", where, 256, (1, 65_536)),
        failure_log_burst=_int(groups, "agent", "failure_log_burst", where, 5, (0, 1_000_000)),
        privsep=_bool(groups, "agent", "privsep", where, default=True),
        worker_user=_name(groups, "agent", "worker_user", where, "nobody"),
        upcall=_upcall(groups, where),
        metrics=_metrics(groups, where),
        control_socket=_name(groups, "agent", "control_socket", where, "tlshd/control"),
        tags_dir=_path(groups.get("agent", {}).get("tags_dir"), where, "[agent] tags_dir",
                       warnings) or TAGS_DIR,
        app_enabled=_bool(groups, "app", "enabled", where),
        app_socket=_name(groups, "app", "socket", where, "tlshd/app"),
        app_allow_users=tuple(u.strip() for u in _list(
            groups.get("app", {}).get("allow_users"), where, "[app] allow_users", warnings)
            if u.strip()) if "allow_users" in groups.get("app", {}) else ("root",),
        app_policy_dir=_path(groups.get("app", {}).get("policy_dir"), where,
                             "[app] policy_dir", warnings) or Path("/etc/tlshd/policy.d"),
        app_credentials=_app_credentials(groups, where, warnings),
        path=path,
        warnings=tuple(warnings),
    )


def load_config(path: Path | None = None) -> Config:
    """Read the named file; else, as ktls-utils, /etc/tlshd.conf (with the relocation notice)
    if it loads, then /etc/tlshd/config; else the defaults."""
    if path is not None:
        return parse_config(_read_config(path), path)
    legacy, current = DEFAULT_PATHS
    skipped: list[str] = []
    if legacy.exists():
        try:
            loaded = parse_config(_read_config(legacy), legacy)
        except ConfigError as exc:  # the reference quietly goes on to the next file
            skipped.append(f"{exc}; reading {current} instead")
        else:
            return replace(loaded, notices=(RELOCATE_NOTICE.replace(str(LEGACY_PATH),
                                                                    str(legacy), 1),))
    if current.exists():
        loaded = parse_config(_read_config(current), current)
        return replace(loaded, warnings=(*skipped, *loaded.warnings))
    return Config(warnings=tuple(skipped),
                  notices=(f"no configuration file ({legacy} or {current}): using the "
                           "defaults",))


def _read_config(path: Path) -> str:
    try:
        return path.read_text(errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", where=str(path)) from None


def glib_unescape(value: str, *, in_list: bool = False) -> tuple[str, str | None]:
    """A key-file value as GLib 2.74's g_key_file_get_string() (``in_list``: one item of
    g_key_file_get_string_list()) returns it, and what GLib complains about, if anything.

    A string keeps an invalid escape literally and drops a backslash at the end; a list is
    refused whole (ktls-utils then sees no list). tests/oracles/glib_keyfile.c checks this
    against the real parser."""
    out, i, problem = [], 0, None
    while i < len(value):
        char = value[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        if i + 1 == len(value):
            problem = "escape character at end of line"
            break
        nxt = value[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
        elif in_list and nxt == ";":
            out.append(";")
        else:
            problem = problem or f"invalid escape sequence \\{nxt}"
            out.append(char + nxt)
        i += 2
    return "".join(out), problem


_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_GLIB_INT_RE = re.compile(r"^[ \t\n\v\f\r]*([+-]?[0-9]+)(?:[ \t\n\v\f\r].*)?$", re.DOTALL)
_INT32 = (-(2**31), 2**31 - 1)


def glib_int(value: str) -> int | None:
    """g_key_file_get_integer(): strtol base 10, then only whitespace may follow the digits,
    and the value must fit a C int; None where GLib gives an error."""
    match = _GLIB_INT_RE.match(value)
    if match is None:
        return None
    number = int(match.group(1), 10)
    return number if _INT32[0] <= number <= _INT32[1] else None


def _glib_int(entry: Entry | None, where: str, name: str, warnings: list[str]) -> int:
    if entry is None:
        return 0
    number = glib_int(entry.value)
    if number is None:
        warnings.append(f"{where}:{entry.line}: {name}: {_quoted(entry.value)} is not an "
                        "integer; 0 is used, as ktls-utils does")
        return 0
    return number


def _quoted(value: str, limit: int = 60) -> str:
    """An untrusted value, escaped and bounded, for a log line."""
    text = repr(value[:limit])
    return text + ("..." if len(value) > limit else "")


def _unknown_keys(groups: dict[str, dict[str, Entry]], where: str) -> tuple[str, ...]:
    out = []
    for group, entries in groups.items():
        known = _APP_CREDENTIAL_KEYS if group.startswith(APP_CREDENTIALS) else _KNOWN.get(group)
        for key, entry in entries.items():
            if known is None or key not in known:
                out.append(f"{where}:{entry.line}: [{group}] {key}: unknown key, ignored")
    return tuple(out)


def _app_credentials(groups: dict[str, dict[str, Entry]], where: str,
                     warnings: list[str]) -> dict[str, AppCredentials]:
    """Every ``[app.credentials.NAME]``; a bad name or client_auth is warned about and the
    group skipped (a rule naming it is then refused: the policy fails closed)."""
    out: dict[str, AppCredentials] = {}
    for group, entries in groups.items():
        if not group.startswith(APP_CREDENTIALS):
            continue
        name = group.removeprefix(APP_CREDENTIALS)
        if not _PROFILE_NAME.fullmatch(name):
            warnings.append(f"{where}: [{show(group, 80)}]: a name of 1 to 64 letters, digits, "
                            "'_', '.' or '-'; the group is ignored")
            continue
        entry = entries.get("client_auth")
        client_auth = entry.value.strip() if entry else "optional"
        if client_auth not in CLIENT_AUTH:
            warnings.append(f"{where}:{entry.line if entry else 0}: [{group}] client_auth: one "
                            f"of {', '.join(CLIENT_AUTH)}; the group is ignored")
            continue
        out[name] = AppCredentials(_x509_side(entries, where, group, warnings), client_auth)
    return out


def _x509_side(entries: dict[str, Entry], where: str, group: str,
               warnings: list[str]) -> X509Side:
    paths: dict[str, Path | None] = {}
    for key in _X509_KEYS + _PQ_KEYS:
        field_name = key.removeprefix("x509.").replace("pq.", "pq_")
        paths[field_name] = _path(entries.get(key), where, f"[{group}] {key}", warnings)
    if (paths["pq_certificate"] is None) != (paths["pq_private_key"] is None):
        warnings.append(f"{where} [{group}]: x509.pq.certificate and x509.pq.private_key go "
                        "together; the one given is ignored")
        paths["pq_certificate"] = paths["pq_private_key"] = None
    return X509Side(**paths)


_GROUPS_RE = re.compile(r"[A-Za-z0-9_?*:/ -]{1,512}")


def _groups(entry: Entry | None, where: str, warnings: list[str]) -> str:
    """``[authenticate] groups``: checked for its characters only (OpenSSL, when the
    contexts are built, decides which names it has); a bad value is warned about and the
    default used."""
    if entry is None:
        return ""
    value = entry.value.strip()
    if not _GROUPS_RE.fullmatch(value) or not value.replace("/", "").replace(":", "").strip():
        warnings.append(f"{where}:{entry.line}: [authenticate] groups: not a group list "
                        f"({show(value, 80)}), the default is used")
        return ""
    return value


def _path(entry: Entry | None, where: str, name: str, warnings: list[str]) -> Path | None:
    if entry is None:
        return None
    value, problem = glib_unescape(entry.value)
    if problem:
        warnings.append(f"{where}:{entry.line}: {name}: {problem}, read as {_quoted(value)} "
                        "(as GLib does)")
    if not value:
        warnings.append(f"{where}:{entry.line}: {name}: empty path; the key is ignored")
        return None
    return Path(value)


def _list(entry: Entry | None, where: str, name: str, warnings: list[str]) -> tuple[str, ...]:
    """g_key_file_get_string_list(): split at unescaped ``;``, then unescape each item."""
    if entry is None:
        return ()
    items, current, i, value = [], [], 0, entry.value
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            current.append(value[i:i + 2])
            i += 2
        elif value[i] == ";":
            items.append("".join(current))
            current, i = [], i + 1
        else:
            current.append(value[i])
            i += 1
    items.append("".join(current))
    unescaped = [glib_unescape(item, in_list=True) for item in items]
    problems = [problem for _, problem in unescaped if problem]
    if problems:
        warnings.append(f"{where}:{entry.line}: {name}: {problems[0]}; GLib refuses the whole "
                        "list, so ktls-utils links none of it, and neither does tlshd")
        return ()
    return tuple(item.strip() for item, _ in unescaped if item.strip())


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


def _bool(groups: dict[str, dict[str, Entry]], group: str, key: str, where: str,
          default: bool = False) -> bool:
    entry = groups.get(group, {}).get(key)
    if entry is None:
        return default
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
