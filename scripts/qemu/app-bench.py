"""Guest side of the app_bench scenario (guest.sh): what tlshd.app and tlshd wrap cost.

    app-bench.py PKI_DIR MIB CONNECTS

1. Bulk throughput: MIB MiB one way over a loopback pair secured by the agent (kTLS: plain
   send/recv, the kernel does the records), against the same transfer over a pair whose
   records Python's ssl module (OpenSSL, in user space) does. Three rounds each, alternated;
   the median. Also the CPU of this process (both ends are its threads) per MiB.
2. Connection set-up: CONNECTS connections to a Python ssl server, each TCP connect + TLS
   handshake + one byte each way, from a program under ``tlshd wrap`` (plain sockets: the
   handshake is the agent's, inside connect()) against the same program doing its own
   handshake with Python's ssl module. The medians per connection.

Prints ``key=value`` lines.
"""

from __future__ import annotations

import os
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tlshd.app import secure_client, secure_server

CHUNK = 64 * 1024
ROUNDS = 3

PROGRAM = """
import socket, ssl, sys, time
port, count, mode, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca)
for _ in range(count):
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    if mode == "direct":
        sock = context.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(b"x")
    assert sock.recv(1) == b"y"
    print(f"{(time.perf_counter() - t0) * 1000:.3f}", flush=True)
    sock.close()
"""


def say(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def ktls_pair() -> tuple[socket.socket, socket.socket]:
    client, server = pair()
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(secure_server(server)))
    thread.start()
    secure_client(client, server_name="localhost")
    thread.join(30)
    assert done, "the server side was not secured"
    return client, server


def ssl_pair(pki: Path) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    client, server = pair()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki / "server.crt", pki / "server.key")
    client_context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    box: list[ssl.SSLSocket] = []
    thread = threading.Thread(
        target=lambda: box.append(server_context.wrap_socket(server, server_side=True)))
    thread.start()
    tls_client = client_context.wrap_socket(client, server_hostname="localhost")
    thread.join(30)
    return tls_client, box[0]


def transfer(sender: socket.socket, receiver: socket.socket, size: int) -> tuple[float, float]:
    """Seconds and this process's CPU seconds to move ``size`` bytes."""
    block = os.urandom(CHUNK)
    got = [0]

    def receive() -> None:
        while got[0] < size:
            data = receiver.recv(CHUNK)
            if not data:
                return
            got[0] += len(data)

    reader = threading.Thread(target=receive)
    cpu0, t0 = os.times(), time.perf_counter()
    reader.start()
    for _ in range(size // CHUNK):
        sender.sendall(block)
    reader.join(120)
    elapsed, cpu1 = time.perf_counter() - t0, os.times()
    assert got[0] == size, (got[0], size)
    return elapsed, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def throughput(pki: Path, mib: int) -> None:
    size = mib << 20
    runs: dict[str, list[tuple[float, float]]] = {"ktls": [], "userspace": []}
    for _ in range(ROUNDS):
        for kind, values in runs.items():
            a, b = ktls_pair() if kind == "ktls" else ssl_pair(pki)
            with a, b:
                values.append(transfer(a, b, size))
    for kind, values in runs.items():
        say(f"{kind}_mib_s", f"{mib / statistics.median(v[0] for v in values):.1f}")
        say(f"{kind}_cpu_ms_per_mib",
            f"{statistics.median(v[1] for v in values) * 1000 / mib:.2f}")


def tls_server(pki: Path) -> tuple[int, threading.Event]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                if tls.recv(1) == b"x":
                    tls.sendall(b"y")
        except (OSError, ssl.SSLError):
            pass

    def serve() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def setup_latency(pki: Path, connects: int) -> None:
    port, stop = tls_server(pki)
    repo = Path(__file__).resolve().parents[2]
    args = [str(port), str(connects)]
    medians = {}
    for mode in ("direct", "wrap"):
        prefix = [sys.executable, "-m", "tlshd", "wrap", "--server-name", "localhost", "--"] \
            if mode == "wrap" else []
        done = subprocess.run([*prefix, sys.executable, "-c", PROGRAM, *args, mode,
                               str(pki / "ca.pem")], capture_output=True, text=True,
                              cwd=repo, timeout=600, check=False)
        times = [float(line) for line in done.stdout.split()]
        assert len(times) == connects, (mode, done.stdout, done.stderr)
        medians[mode] = statistics.median(times[1:])  # the first pays for imports
        say(f"{mode}_connect_ms", f"{medians[mode]:.1f}")
    stop.set()
    say("wrap_setup_ratio", f"{medians['wrap'] / medians['direct']:.2f}")


def main() -> int:
    pki, mib, connects = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    throughput(pki, mib)
    setup_latency(pki, connects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
