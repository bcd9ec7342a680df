"""Guest side of the app_pair scenario (guest.sh): tlshd.app on the real kernel.

A loopback TCP pair; the agent secures one end as client (server_name localhost) and the other
as server, both through its application endpoint; then 4 MiB one way and 1 MiB the other with
plain send/recv on the sockets (kTLS does the records), compared byte for byte. Then a child
that has become uid 65534 asks too and must get EACCES. Last, a client to a Python ssl
(OpenSSL) server that sends its two default NewSessionTickets: the first plain recv() must
be the server's data, not EIO (the agent read the tickets before the hand-over). Then a
client of openssl s_server that then sends a KeyUpdate: what plain reads give after it.
Prints ``key=value`` lines. Usage: app-pair.py PKI_DIR
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tlshd.app import Secured, SecureSocketError, secure_client, secure_server

SOL_TCP, TCP_ULP = 6, 31


def say(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 16, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main() -> int:
    client, server = pair()
    box: dict[str, object] = {}

    def serve() -> None:
        try:
            box["s"] = secure_server(server)
        except SecureSocketError as exc:
            box["s"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        secured: Secured | SecureSocketError = secure_client(client, server_name="localhost")
    except SecureSocketError as exc:
        secured = exc
    thread.join(30)
    served = box.get("s")
    for side, outcome in (("client", secured), ("server", served)):
        if isinstance(outcome, Secured):
            say(f"{side}_status", 0)
            say(f"{side}_peer", outcome.peer)
            say(f"{side}_cipher", outcome.cipher)
        else:
            say(f"{side}_status", getattr(outcome, "errno", "none"))
    if not isinstance(secured, Secured) or not isinstance(served, Secured):
        return 0
    say("ulp", client.getsockopt(SOL_TCP, TCP_ULP, 16).rstrip(b"\0").decode())
    up, down = os.urandom(4 << 20), os.urandom(1 << 20)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_exactly(server, len(up))))
    reader.start()
    client.sendall(up)
    reader.join(60)
    say("up_exact", "yes" if got and hashlib.sha256(got[0]).digest() ==
        hashlib.sha256(up).digest() else "no")
    writer = threading.Thread(target=server.sendall, args=(down,))
    writer.start()
    back = read_exactly(client, len(down))
    writer.join(60)
    say("down_exact", "yes" if back == down else "no")
    client.close()
    server.close()
    refused()
    tickets(Path(sys.argv[1]))
    key_update(Path(sys.argv[1]))
    return 0


def key_update(pki: Path) -> None:
    """A peer's KeyUpdate after the hand-over: openssl s_server sends one when a line "k"
    arrives on its stdin. What a plain recv() on the kTLS socket then gives, as errno names:
    the KeyUpdate record itself, then the next data record (sent with the new keys)."""
    import subprocess
    import time

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki / "server.crt"),
         "-key", str(pki / "server.key"), "-naccept", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert server.stdin is not None
    try:
        sock = None
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert sock is not None
        secure_client(sock, server_name="localhost")
        sock.settimeout(10)
        server.stdin.write(b"before\n")
        server.stdin.flush()
        say("keyupdate_before", sock.recv(100).decode(errors="replace").strip())
        server.stdin.write(b"k\n")
        server.stdin.flush()
        time.sleep(0.5)
        server.stdin.write(b"after\n")
        server.stdin.flush()
        outcomes = [_recv_outcome(sock, 0)]
        # then: is the socket readable within 3 s, and what does a non-blocking read give
        ready = select.select([sock], [], [], 3)[0]
        sock.setblocking(False)
        outcomes.append(("readable:" if ready else "quiet:") + _recv_outcome(sock, 0))
        say("keyupdate_reads", ",".join(outcomes))
        sock.close()
    except OSError as exc:
        say("keyupdate_reads", f"setup:{exc}")
    finally:
        server.kill()
        server.wait()


def tickets(pki: Path) -> None:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100)[::-1])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    try:
        secure_client(sock, server_name="localhost")
        sock.sendall(b"hello, server")
        sock.settimeout(10)
        say("ticket_server_read", sock.recv(100).decode(errors="replace"))
    except OSError as exc:
        say("ticket_server_read", f"errno:{exc.errno}")
    thread.join(10)
    sock.close()
    listener.close()


def _recv_outcome(sock: socket.socket, flags: int) -> str:
    """A recv's data, or its errno's name ("timeout" when it waited out the socket's)."""
    import errno

    try:
        return sock.recv(100, flags).decode(errors="replace").strip() or "EOF"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def refused() -> None:
    """The same request from uid 65534, whom [app] allow_users does not name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = "none"
        try:
            c, _s = pair()
            os.setgid(65534)
            os.setuid(65534)
            secure_client(c, server_name="localhost")
        except SecureSocketError as exc:
            code = str(exc.errno)
        except OSError as exc:
            code = f"oserror:{exc.errno}"
        os.write(write_end, code.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        say("other_uid_errno", pipe.read())
    os.waitpid(pid, 0)


if __name__ == "__main__":
    sys.exit(main())
