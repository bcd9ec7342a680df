"""The scenarios of tests/kernel/scenarios.py played on kernel-sim, the way scripts/qemu/guest.sh
plays them on Linux: the same consumers' steps, the same agent configuration, one agent serving
both sides, and the evidence taken from the kernel (kernel-sim's trace and kTLS counters)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable

from kernel_sim import keys
from kernel_sim.consumer import HandshakeOutcome, NFSClient, NFSServer
from kernel_sim.kernel import Kernel
from kernel_sim.nvme import NVMeHost, NVMeKeyring, NVMeTarget, psk_identity
from tests.kernel.evidence import Evidence, from_sim, summarize
from tests.kernel.scenarios import NVME_QUEUES
from tests.pki import PKI

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b1c0f5e-sim"
SUBNQN = "nqn.2026-01.io.tlshd:qemu-test"


def agent_config(pki: PKI, endpoint: str, keyring: str, *, server: str = "server") -> str:
    """guest.sh's agent.conf, on a kernel-sim endpoint."""
    d = pki.ca.parent
    return (
        f"[authenticate]\nkeyrings={keyring}\n\n"
        "[authenticate.client]\n"
        f"x509.truststore={pki.ca}\n"
        f"x509.certificate={d / 'client.crt'}\nx509.private_key={d / 'client.key'}\n\n"
        "[authenticate.server]\n"
        f"x509.truststore={pki.ca}\n"
        f"x509.certificate={d / (server + '.crt')}\nx509.private_key={d / (server + '.key')}\n\n"
        f"[agent]\nworkers=1\nupcall=kernel-sim:{endpoint}\n"
        f"control_socket=tlshd-test/{endpoint}\n"
    )


def errno_name(status: int) -> str:
    return "0" if status == 0 else errno.errorcode[abs(status)]


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _both(kernel: Kernel, client_side: Callable[[socket.socket], HandshakeOutcome],
          server_side: Callable[[socket.socket], object]) -> tuple[HandshakeOutcome, object]:
    """Run the server side in a thread, the client side here; release both sockets."""
    client, server = _pair()
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(server=server_side(server)))
    thread.start()
    try:
        out = client_side(client)
    finally:
        thread.join(30)
        kernel.sock_release(client)
        kernel.sock_release(server)
    return out, box.get("server")


def nvme_connect(kernel: Kernel, ring: NVMeKeyring, pskids: list[int] | None = None) -> str:
    """``nvme connect --tls``: one queue after the other (admin, then I/O), each ICReq/ICResp
    over kTLS; the first failure fails the connect with that errno."""
    for _ in range(NVME_QUEUES):
        host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=ring.serial)
        target = NVMeTarget(kernel, keyring=ring.serial)

        def target_side(sock: socket.socket, target: NVMeTarget = target) -> int:
            out = target.handshake(sock)
            if out.status == 0:
                target.serve_icreq()
            return out.status

        def host_side(sock: socket.socket, host: NVMeHost = host) -> HandshakeOutcome:
            out = host.connect(sock)
            if out.status == 0:
                host.init_connection()
            return out

        out, _ = _both(kernel, host_side, target_side)
        if out.status:
            return errno_name(out.status)
        if pskids is not None:
            pskids += [host.tls_pskid, target.tls_pskid]  # the PSK each side's DONE named
    return "0"


def nfs_mount(kernel: Kernel, *, export: str, xprtsec: str) -> str:
    """mount -t nfs -o vers=4.2[,xprtsec=...] 127.0.0.1:/ against an ``export`` export; the
    errno mount(8) reports."""
    server = NFSServer(kernel, xprtsec=export)
    client = NFSClient(kernel, xprtsec=xprtsec)

    def server_side(sock: socket.socket) -> int:
        outcome, peer_auth = server.handshake(sock)
        refusal = server.admits(outcome, peer_auth)
        if refusal == 0:
            server.serve(sock, 1)
        else:
            sock.shutdown(socket.SHUT_RDWR)  # the refusal ends the client's call
        return refusal

    def client_side(sock: socket.socket) -> HandshakeOutcome:
        out = client.mount(sock, "127.0.0.1")
        if out.status == 0 and client.ktls is not None:
            with contextlib.suppress(ConnectionError, OSError):
                client.null_call(2)
        return out

    out, refusal = _both(kernel, client_side, server_side)
    if out.status:
        return errno_name(out.status)  # the RPC client's -EACCES: "access denied by server"
    return errno_name(int(refusal))  # type: ignore[call-overload]


class SimScenarios:
    """A 6.12-profile kernel-sim, its ``.nvme`` keyring with the PSK the host looks up, and an
    agent started (and restarted) by ``start_agent(config_text)``."""

    def __init__(self, kernel: Kernel, pki: PKI, ring: NVMeKeyring, ring_name: str,
                 start_agent: Callable[[str], object], stop_agent: Callable[[], None]) -> None:
        self.kernel, self.pki, self.ring, self.ring_name = kernel, pki, ring, ring_name
        self._start, self._stop = start_agent, stop_agent
        self.sha384_serial = 0
        self.pskids: list[int] = []  # by nvme_psk_sha384: the PSK serials both sides reported
        ring.add_psk(psk_identity(HOSTNQN, SUBNQN, 1), os.urandom(32))

    def config(self, server: str = "server") -> str:
        return agent_config(self.pki, self.kernel.endpoint, self.ring_name, server=server)

    def run(self, name: str) -> tuple[str, Evidence]:
        with socket.socket() as probe:
            ns = self.kernel.netns_of(probe)
        before = ns.ulp.stats()
        mark = len(self.kernel.trace)
        consumer_errno = getattr(self, f"s_{name}")()
        events = list(self.kernel.trace)[mark:]
        return consumer_errno, summarize(from_sim(events), before, ns.ulp.stats())

    def s_nvme_psk(self) -> str:
        return nvme_connect(self.kernel, self.ring)

    def s_nvme_psk_sha384(self) -> str:
        serial = self.ring.add_psk(psk_identity(HOSTNQN, SUBNQN, 2), os.urandom(48))
        self.sha384_serial = serial
        try:
            return nvme_connect(self.kernel, self.ring, self.pskids)
        finally:
            keys.invalidate(serial)

    def s_nvme_no_agent(self) -> str:
        self._stop()
        try:
            return nvme_connect(self.kernel, self.ring)
        finally:
            self._start(self.config())

    def s_nfs_tls(self) -> str:
        return nfs_mount(self.kernel, export="tls", xprtsec="tls")

    def s_nfs_mtls(self) -> str:
        return nfs_mount(self.kernel, export="mtls", xprtsec="mtls")

    def s_nfs_plain_refused(self) -> str:
        return nfs_mount(self.kernel, export="tls", xprtsec="none")

    def s_nfs_tls_on_mtls(self) -> str:
        return nfs_mount(self.kernel, export="mtls", xprtsec="tls")

    def s_nfs_untrusted_ca(self) -> str:
        self._stop()
        self._start(self.config(server="server-untrusted"))
        try:
            return nfs_mount(self.kernel, export="tls", xprtsec="tls")
        finally:
            self._stop()
            self._start(self.config())
