"""A TLS server for tlsfuzzer: each connection is handed to the agent through kernel-sim.

    .venv/bin/python tools/tlsfuzzer_front.py --port PORT [--key rsa|ec] [--ready FILE]

kernel-sim runs in this process, and the agent (``python -m tlshd``) runs as its own process
on the simulator's endpoint, with a throwaway PKI (tests/pki.py). Each accepted TCP
connection is a server handshake request, as an NFS or NVMe target would submit one. After a
successful DONE, the connection is served over kernel-sim's kTLS record layer as a small
HTTP/1.0 server does, which is what tlsfuzzer's scripts expect:

* data: an ``HTTP/1.0 200 OK`` response once a request's ``\\r\\n\\r\\n`` has arrived;
* a close_notify alert: a close_notify back, then close;
* any other record the kernel would not hand an application (a handshake message after the
  handshake, another alert), or EOF: close.

The agent's log goes to ``--log`` (default ``agent.log``). The figures of a run (DONE
statuses, the agent's exit status) are printed at SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import issue_leaf, make_ca, write_issued

ALERT, APPLICATION_DATA = 21, 23
CLOSE_NOTIFY = b"\x01\x00"
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


def write_config(directory: Path, key: str, endpoint: str) -> Path:
    """An all-RSA (tlsfuzzer's scripts offer RSA signatures only, for the chain too) or an
    all-EC PKI from tests/pki.py: ``ca.pem``, ``server.crt``/``.key`` and a client pair
    ``client.crt``/``.key`` that the server trusts; and the agent's config."""
    ca = make_ca("tlshd fuzz CA", kind=key)
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    server = write_issued(directory, "server", issue_leaf(
        ca, "localhost", dns=("localhost",), ips=("127.0.0.1",), kind=key))
    write_issued(directory, "client", issue_leaf(ca, "client.test", client=True, kind=key))
    path = directory / "config"
    path.write_text(
        f"[authenticate.server]\nx509.truststore={directory / 'ca.pem'}\n"
        f"x509.certificate={server.cert}\nx509.private_key={server.key}\n\n"
        f"[agent]\nworkers=1\nupcall=kernel-sim:{endpoint}\nfailure_log_burst=0\n"
        f"control_socket=tlshd-fuzz/{endpoint}\n")
    return path


class Front:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lock = threading.Lock()

    def serve(self, conn: socket.socket) -> None:
        consumer = TLSConsumer(self.kernel, timeout_s=20.0)
        try:
            outcome = consumer.server(conn)
            with self.lock:
                self.statuses[outcome.status] += 1
            if outcome.status == 0 and consumer.ktls is not None:
                self._converse(consumer)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.kernel.sock_release(conn)

    def _converse(self, consumer: TLSConsumer) -> None:
        ktls = consumer.ktls
        assert ktls is not None
        ktls.sock.settimeout(30)
        request = b""
        while True:
            record_type, data = ktls.recvmsg(16384)
            if record_type == APPLICATION_DATA and data:
                request += data
                if b"\r\n\r\n" in request:
                    ktls.sendmsg(RESPONSE)
                    request = b""
                continue
            if record_type == ALERT and data == CLOSE_NOTIFY:
                ktls.sendmsg(CLOSE_NOTIFY, record_type=ALERT)
            return  # EOF, another alert, a post-handshake message: close, as an application


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4433)
    parser.add_argument("--key", choices=("rsa", "ec", "ed25519"), default="rsa")
    parser.add_argument("--ready", type=Path, help="written once the agent listens")
    parser.add_argument("--log", type=Path, default=Path("agent.log"), help="the agent's log")
    parser.add_argument("--pki", type=Path, required=True,
                        help="where the CA, the certificates and the keys are written")
    args = parser.parse_args()
    endpoint = f"tlshd-fuzz-{uuid.uuid4().hex[:8]}"
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    args.pki.mkdir(parents=True, exist_ok=True)
    with Kernel(endpoint=endpoint) as kernel, args.log.open("w") as log:
        ns = kernel.add_netns(None)
        config = write_config(args.pki, args.key, endpoint)
        agent = subprocess.Popen([sys.executable, "-m", "tlshd", "-s", "-c", str(config)],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        front = Front(kernel)
        try:
            if not kernel.wait_for(lambda: kernel.listeners(ns) >= 1, 60):
                print(f"tlsfuzzer_front: the agent did not start ({args.log})", file=sys.stderr)
                return 1
            listener = socket.create_server(("127.0.0.1", args.port), backlog=128)
            listener.settimeout(0.5)
            if args.ready:
                args.ready.write_text(f"{os.getpid()}\n")
            while not stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=front.serve, args=(conn,), daemon=True).start()
            listener.close()
        finally:
            agent.terminate()
            code = agent.wait(60)
            time.sleep(0.2)
        for status, count in sorted(front.statuses.items()):
            print(f"front_done_status_{-status}={count}")
        print(f"front_agent_exit={code}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
