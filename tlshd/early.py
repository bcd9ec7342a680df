"""Be a listener before being loaded: join the ``tlshd`` group first thing after exec.

The kernel refuses a handshake request at once with ESRCH when nobody in the network
namespace has joined the ``handshake`` family's ``tlshd`` group (``handshake_req_submit`` ->
``handshake_genl_notify``). Loading the agent (OpenSSL, cryptography, the configuration, the
credentials, forking the workers) takes seconds on a small or emulated machine, and at boot
``nvmf-autoconnect`` or ``remote-fs.target`` runs in exactly that window. So the console
script enters here: with nothing imported but what the interpreter itself has loaded
(``os``, ``socket``, ``struct``, ``sys``), it opens one netlink socket (or, for kernel-sim, one
endpoint connection), joins the group, and only then imports the agent. Requests submitted
meanwhile wait in the kernel's queue; the workers ACCEPT them as soon as they are up, and the
supervisor then closes this socket (the workers are the listeners from there on). If the start
fails, the process exits and the kernel sees no listener again at once: new requests get
ESRCH, not a wait for a timeout.

Only ``tlshd`` and ``tlshd agent``/``run`` hold early; ``-h``, ``-v`` and the other commands do
not. Nothing here is fatal: anything unexpected leaves the agent to report it as it loads.
"""

# No ``from __future__ import annotations``: it imports the __future__ module, a file lookup.
# Only what needs no file lookup: on Debian's python3 these four are compiled into the
# interpreter, so nothing here searches sys.path (``socket`` alone pulls in enum, functools,
# collections and selectors: about 25 modules, each looked up along sys.path, which in the
# real-kernel tier starts with the 9p-shared checkout).
import _socket as socket
import _struct as struct
import posix
import sys

StructError: type[Exception] = struct.error  # type: ignore[attr-defined]  # not in typeshed

NETLINK_GENERIC = 16
SOL_NETLINK = 270
SO_PEERCRED = 17  # the uid of who bound a kernel-sim endpoint: root or ours (tlshd/upcall.py)
NETLINK_ADD_MEMBERSHIP = 1
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS = 1, 2, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
KSIM_CMD_ADD_MEMBERSHIP, KSIM_A_GROUP = 1, 1  # kernel-sim's private family (docs/kernel-sim.md)
TIMEOUT_S = 2.0
_DEFAULT_CONFIGS = ("/etc/tlshd.conf", "/etc/tlshd/config")
_VALUE_OPTIONS = {"-c": "config", "--config": "config", "--upcall": "upcall", "--workers": ""}


class Held:
    """The early membership: one socket, kept until the workers listen themselves."""

    def __init__(self, sock: socket.socket, transport: str) -> None:
        self.sock, self.transport = sock, transport

    def close(self) -> None:
        self.sock.close()


def main() -> int:
    """The ``tlshd`` console script: hold the group, then load and run the agent.

    Under ``python3 -S`` (what ``tlshd install`` puts in the unit), the interpreter skips
    ``site`` at start, which is most of its start-up time (0.8 of 1.1 s in a TCG guest): the
    group is joined first, and ``site`` is run afterwards, before anything else is imported."""
    held = hold(sys.argv[1:])
    if sys.flags.no_site:
        import site

        site.main()
    from tlshd.cli import main as cli_main

    return cli_main(held=held)


def hold(argv: list[str]) -> Held | None:
    """Join the group if ``argv`` runs the agent; None when it does not, or cannot."""
    options = agent_options(argv)
    if options is None:
        return None
    mode = options.get("upcall") or _configured_upcall(options.get("config"))
    try:
        if mode.startswith("kernel-sim"):
            return _hold_sim(mode.partition(":")[2] or "kernel-sim")
        return _hold_netlink()  # auto is the kernel's family: kernel-sim must be named
    except (OSError, ValueError, StructError):
        return None


def agent_options(argv: list[str]) -> dict[str, str] | None:
    """The options of an agent command line, or None if it is something else."""
    options: dict[str, str] = {}
    args = iter(argv)
    command = "agent"
    for arg in args:
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help", "-v", "--version"):
            return None
        if name in _VALUE_OPTIONS:
            value = value if eq else next(args, "")
            if _VALUE_OPTIONS[name]:
                options[_VALUE_OPTIONS[name]] = value
        elif arg.startswith("-c") and len(arg) > 2:
            options["config"] = arg[2:]
        elif not arg.startswith("-"):
            command = arg
    return options if command in ("agent", "run") else None


def _configured_upcall(path: str | None) -> str:
    """``[agent] upcall`` of the file the agent will read (the same search order)."""
    for candidate in (path,) if path else _DEFAULT_CONFIGS:
        try:
            with open(candidate, encoding="utf-8", errors="replace") as config:
                text = config.read(1 << 20)
        except OSError:
            continue
        group, upcall = "", "auto"
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                group = line[1:-1]
            elif group == "agent" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                if key.strip() == "upcall":
                    upcall = value.strip()
        return upcall
    return "auto"


# -- the two transports: what tlshd.upcall does, in the fewest possible instructions ------


def _hold_netlink() -> Held:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.connect((0, 0))  # only the kernel may unicast to us (tlshd/upcall.py)
        sock.settimeout(TIMEOUT_S)
        sock.send(_get_family("handshake"))
        _family_id, groups = _family_reply(sock.recv(65536))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups["tlshd"])
        sock.setblocking(False)
    except (OSError, ValueError, KeyError, StructError) as exc:
        sock.close()
        raise ValueError(f"early join: {exc}") from None
    return Held(sock, "netlink")


def _hold_sim(endpoint: str) -> Held:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT_S)
        sock.connect(b"\0" + endpoint.encode() + b"/genl")
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))
        if uid not in (0, posix.geteuid()):
            raise ValueError(f"endpoint served by uid {uid}")
        sock.send(_get_family("handshake"))
        _family_id, groups = _family_reply(sock.recv(65536))
        sock.send(_get_family("kernel_sim"))
        ksim_id, _ = _family_reply(sock.recv(65536))
        attr = struct.pack("=HHI", 8, KSIM_A_GROUP, groups["tlshd"])
        sock.send(_genl(ksim_id, KSIM_CMD_ADD_MEMBERSHIP, NLM_F_REQUEST | NLM_F_ACK, attr))
        _check_ack(sock.recv(65536))
        sock.setblocking(False)
    except (OSError, ValueError, KeyError, StructError) as exc:
        sock.close()
        raise ValueError(f"early join: {exc}") from None
    return Held(sock, f"kernel-sim:{endpoint}")


def _genl(family: int, cmd: int, flags: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), family, flags, 1, posix.getpid()) + body


def _get_family(name: str) -> bytes:
    value = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(value), CTRL_ATTR_FAMILY_NAME) + value
    return _genl(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, NLM_F_REQUEST,
                 attr + b"\0" * (-len(attr) % 4))


def _attrs(data: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise ValueError("truncated attribute")
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _check_ack(data: bytes) -> None:
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR and length >= 20:
        error = struct.unpack_from("=i", data, 16)[0]
        if error:
            raise OSError(-error, posix.strerror(-error))


def _family_reply(data: bytes) -> tuple[int, dict[str, int]]:
    """CTRL_CMD_NEWFAMILY: the family id and its multicast groups by name."""
    _check_ack(data)
    length = struct.unpack_from("=I", data)[0]
    attrs = _attrs(data[20:length])
    groups = {}
    for nested in _attrs(attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
        group = _attrs(nested)
        name = group[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()
        groups[name] = struct.unpack("=I", group[CTRL_ATTR_MCAST_GRP_ID])[0]
    return struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID])[0], groups


if __name__ == "__main__":
    # Run as a file (``python3 -S .../tlshd/early.py``): Python put this file's directory first
    # on sys.path (unless -P), which would make tlshd's modules top-level ones; the checkout
    # (its parent, from __file__, absolute since Python 3.9) goes last instead.
    if not sys.flags.safe_path and sys.path:
        del sys.path[0]
    sys.path.append(__file__.rpartition("/")[0].rpartition("/")[0] or "/")
    sys.exit(main())
