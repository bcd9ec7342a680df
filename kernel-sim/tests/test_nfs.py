"""kernel-sim's NFS consumers without an agent: the export's xprtsec= check and a client without
TLS (both settled against Linux 6.12 by the scenario suite in tests/kernel/)."""

import errno
import socket

import pytest

from kernel_sim.consumer import (
    RPC_AUTH_NONE,
    HandshakeOutcome,
    NFSClient,
    NFSServer,
    parse_rpc,
    read_record,
)
from kernel_sim.handshake.tlshd import TLS_NO_PEERID


class NoKernel:
    """A kernel that must not be reached: these paths submit nothing."""

    def __getattr__(self, name):
        raise AssertionError(f"the kernel was asked for {name}")


OK = HandshakeOutcome(0, TLS_NO_PEERID, 0.0)


@pytest.mark.parametrize("export, outcome, peer_auth, expected", [
    ("tls", OK, False, 0),
    ("tls", OK, True, 0),  # an authenticated peer satisfies a tls export too
    ("mtls", OK, True, 0),
    ("mtls", OK, False, -errno.EPERM),  # handshake fine, no client certificate: mount refused
    ("tls", HandshakeOutcome(-errno.EPERM, TLS_NO_PEERID, 0.0), False, -errno.EPERM),  # no TLS
])
def test_export_xprtsec_check(export, outcome, peer_auth, expected):
    assert NFSServer(NoKernel(), xprtsec=export).admits(outcome, peer_auth) == expected


def test_a_client_without_tls_sends_auth_none_and_the_server_submits_nothing():
    client_sock, server_sock = socket.socketpair()
    with client_sock, server_sock:
        out = NFSClient(NoKernel(), xprtsec="none").mount(client_sock, "127.0.0.1")
        assert out.status == 0  # nothing was submitted: the mount's fate is the server's
        server = NFSServer(NoKernel(), xprtsec="tls")
        outcome, peer_auth = server.handshake(server_sock)
        assert (outcome.status, peer_auth) == (-errno.EPERM, False)
        assert server.admits(outcome, peer_auth) == -errno.EPERM


def test_the_plain_call_carries_auth_none():
    client_sock, server_sock = socket.socketpair()
    with client_sock, server_sock:
        NFSClient(NoKernel(), xprtsec="none").mount(client_sock, "127.0.0.1")
        _xid, _mtype, rest = parse_rpc(read_record(server_sock.recv))
        assert int.from_bytes(rest[16:20], "big") == RPC_AUTH_NONE


def test_xprtsec_must_be_known():
    with pytest.raises(ValueError):
        NFSClient(NoKernel(), xprtsec="krb5")
