"""tlshd.agent.privsep: the monitor's policy, against kernel-sim, with this test as the handshake
process (honest through ``MonitorClient``, hostile with raw messages).

A hostile handshake process must not: send DONE for a request it was not given, give a peer
id that is not its request's, read a file that is not a configured credential, set a socket
option that is not kTLS's, read a PSK its request does not name, or keep the monitor alive by
talking nonsense. Whatever way it ends, the requests it held get DONE EIO at once."""

from __future__ import annotations

import errno
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernel_sim.handshake.tlshd import TLSHandshakeArgs
from kernel_sim.kernel import Kernel
from tlshd.agent import privsep
from tlshd.errors import TransportError
from tlshd.ktls import SOL_TCP, TCP_ULP, TLS_ULP_NAME
from tlshd.upcall import SimUpcall

WAIT_S = 5.0
SO_COOKIE = 57


class Consumer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def done(self, _data: object, status: int, peerid: int) -> None:
        self.calls.append((status, peerid))


@dataclass
class Rig:
    kernel: Kernel
    monitor: privsep.Monitor
    client: privsep.MonitorClient
    thread: threading.Thread
    allowed: Path
    secret: Path

    def submit(self, sock: socket.socket) -> Consumer:
        consumer = Consumer()
        args = TLSHandshakeArgs(sock=sock, done=consumer.done)  # type: ignore[arg-type]
        assert self.kernel.tls_client_hello_anon(args) == 0
        return consumer

    def raw(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """A message as a hostile handshake process sends it; the answer, or None if the
        monitor ended the channel."""
        privsep.send(self.client.requests, message)
        self.client.requests.settimeout(WAIT_S)
        answer, fds = privsep.receive(self.client.requests)
        for fd in fds:
            socket.socket(fileno=fd).close()
        return answer

    def monitor_ended(self) -> bool:
        self.thread.join(WAIT_S)
        return not self.thread.is_alive()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Kernel(endpoint=f"tlshd-test-{uuid.uuid4().hex[:10]}") as kernel:
        kernel.add_netns(None)
        upcall = SimUpcall(kernel.endpoint)
        requests, child_requests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notify, child_notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        allowed, secret = tmp_path / "server.pem", tmp_path / "other.key"
        allowed.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
        secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
        monitor = privsep.Monitor(upcall, requests, notify, frozenset({str(allowed)}))
        thread = threading.Thread(target=monitor.run, args=(lambda: False, lambda: None),
                                  daemon=True)
        thread.start()
        client = privsep.MonitorClient(child_requests, child_notify)
        try:
            yield Rig(kernel, monitor, client, thread, allowed, secret)
        finally:
            client.close()
            thread.join(WAIT_S)
            requests.close()
            notify.close()
            upcall.close()




def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


def test_accept_hands_over_the_consumers_socket_and_done_reaches_the_consumer(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    consumer = rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    with socket.socket(fileno=reply.sockfd) as ours:
        assert _cookie(ours) == _cookie(tcp[0])  # the same socket, in our fd table
        rig.client.done(reply.sockfd, errno.EACCES, ())
    assert rig.kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EACCES, 0)]
    assert rig.monitor.handles == {}  # the handle is retired with its DONE


def test_a_ready_reaches_the_handshake_process_through_the_monitor(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    import select

    rig.submit(tcp[0])
    assert select.select([rig.client.notify_fileno()], [], [], WAIT_S)[0]
    assert rig.client.drain_notifications() >= 1


def test_done_for_a_request_it_was_not_given_ends_the_handshake_process(rig: Rig) -> None:
    assert rig.raw({"op": "done", "h": 0, "status": 0, "remote": []}) is None
    assert rig.monitor_ended()
    with pytest.raises(TransportError):
        rig.client.accept()


def test_a_handshake_process_that_dies_leaves_no_request_without_done(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    consumers = [rig.submit(tcp[0])]
    assert rig.client.accept() is not None
    rig.client.close()  # as a crash closes it
    assert rig.monitor_ended()
    assert rig.kernel.wait_for(lambda: bool(consumers[0].calls), WAIT_S)
    assert consumers[0].calls == [(-errno.EIO, 0)]


def test_a_peer_id_that_is_not_the_requests_is_refused_and_the_request_still_answered(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    consumer = rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    handle = rig.client._handles[reply.sockfd]
    assert rig.raw({"op": "done", "h": handle, "status": 0, "remote": [123456]}) is None
    assert rig.monitor_ended()
    assert rig.kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EIO, 0)]  # never the forged success


def test_only_configured_credential_files_are_read(rig: Rig) -> None:
    assert rig.client.read(rig.allowed) == rig.allowed.read_bytes()
    assert rig.client.states([rig.allowed])[0][1] == rig.allowed.stat().st_ino
    assert rig.raw({"op": "read", "path": str(rig.secret)}) is None
    assert rig.monitor_ended()


def test_a_missing_configured_file_is_an_oserror_in_the_handshake_process(rig: Rig) -> None:
    rig.allowed.unlink()
    with pytest.raises(FileNotFoundError):
        rig.client.read(rig.allowed)
    assert rig.client.states([rig.allowed]) == ((errno.ENOENT,),)


def test_only_ktls_socket_options_are_set(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    rig.client.setsockopt(reply.sockfd, SOL_TCP, TCP_ULP, TLS_ULP_NAME)  # forwarded
    handle = rig.client._handles[reply.sockfd]
    so_bindtodevice = 25
    assert rig.raw({"op": "setsockopt", "h": handle, "level": socket.SOL_SOCKET,
                    "name": so_bindtodevice, "value": privsep._b64(b"lo")}) is None
    assert rig.monitor_ended()


def test_a_psk_the_request_does_not_name_is_not_read(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None and reply.peer_identities == ()
    handle = rig.client._handles[reply.sockfd]
    assert rig.raw({"op": "client_psk", "h": handle, "serials": [42]}) is None
    assert rig.monitor_ended()


@pytest.mark.parametrize("bad", [b"not json", b"[1, 2]", b'{"op": "mount"}',
                                 b'{"op": "done", "h": true, "status": 0, "remote": []}',
                                 b'{"op": "read", "path": 7}'])
def test_nonsense_ends_the_handshake_process(rig: Rig, bad: bytes) -> None:
    rig.client.requests.send(bad)
    assert rig.monitor_ended()
    assert rig.monitor.violation


def test_an_oversized_message_ends_the_handshake_process(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privsep, "MAX_MESSAGE", 1024)  # the socket's own buffer caps the real one
    rig.client.requests.send(b"{" + b" " * 2048 + b"}")
    assert rig.monitor_ended()
    assert rig.monitor.violation == "message too long"


def test_the_ktls_options_go_in_one_request_and_a_failure_names_its_step(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    from tlshd.ktls import SOL_TLS, TLS_TX, BatchSockoptError

    rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    with pytest.raises(BatchSockoptError) as failed:
        rig.client.setsockopts(reply.sockfd, [(SOL_TCP, TCP_ULP, TLS_ULP_NAME),
                                              (SOL_TLS, TLS_TX, b"\0" * 7)])  # a bad struct
    assert failed.value.index == 1 and failed.value.error.errno == errno.EINVAL
    handle = rig.client._handles[reply.sockfd]
    assert rig.raw({"op": "install", "h": handle, "steps": [
        {"level": socket.SOL_SOCKET, "name": 25, "value": privsep._b64(b"lo")}]}) is None
    assert rig.monitor_ended()


def test_the_accept_brings_the_credential_files_states(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    rig.submit(tcp[0])
    assert rig.client.accept() is not None
    rig.client.requests.close()  # no further request could be answered: the cache answers
    assert rig.client.states([rig.allowed])[0][1] == rig.allowed.stat().st_ino


def test_a_peer_key_made_again_and_again_stays_allowed(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    """A peer's certificate gives the same key serial every time; thousands of handshakes
    with one peer must not age its serial out (the soak found DONEs refused after 4096)."""
    der = b"0\x03\x02\x01\x00 a peer certificate, as far as the keyring cares"
    serials = {rig.client.peer_key(der) for _ in range(privsep.PEER_KEYS_KEPT + 10)}
    assert len(serials) == 1
    consumer = rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    rig.client.done(reply.sockfd, 0, tuple(serials))
    assert rig.kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(0, serials.pop())] and rig.monitor.violation is None


def test_a_lost_upcall_is_told_once_and_not_spun_on(rig: Rig) -> None:
    """The kernel side goes away: the handshake process hears it once (TransportError on its
    READY channel) and the monitor stops watching the dead socket instead of spinning on it."""
    import select
    import time

    calls = [0]
    forward = rig.monitor._forward_ready

    def counted() -> None:
        calls[0] += 1
        forward()

    rig.monitor._forward_ready = counted  # type: ignore[method-assign]
    rig.kernel.stop()
    assert select.select([rig.client.notify_fileno()], [], [], WAIT_S)[0]
    with pytest.raises(TransportError):
        rig.client.drain_notifications()
    time.sleep(1.0)
    assert calls[0] == 1



def test_done_may_carry_only_the_loaded_session_tags(
    rig: Rig, tcp: tuple[socket.socket, socket.socket]
) -> None:
    rig.monitor.tag_names = frozenset({"staff"})
    consumer = rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    with socket.socket(fileno=reply.sockfd):
        rig.client.done(reply.sockfd, errno.EACCES, (), ("staff",))
    assert rig.kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EACCES, 0)]
    assert not rig.monitor_ended()


@pytest.mark.parametrize("tags", [["nurse"], ["staff", "staff"], "staff", [7]])
def test_a_done_with_session_tags_that_are_not_loaded_ends_the_handshake_process(
    rig: Rig, tcp: tuple[socket.socket, socket.socket], tags: object
) -> None:
    rig.monitor.tag_names = frozenset({"staff"})
    consumer = rig.submit(tcp[0])
    reply = rig.client.accept()
    assert reply is not None
    handle = rig.client._handles[reply.sockfd]
    assert rig.raw({"op": "done", "h": handle, "status": 0, "remote": [], "tags": tags}) is None
    assert rig.monitor_ended()
    assert rig.kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EIO, 0)]  # never the forged tags
