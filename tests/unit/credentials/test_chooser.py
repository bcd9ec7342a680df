"""tlshd.credentials.chooser: one place decides a request's credentials, against real
keyrings (kernel-sim's NVMeKeyring makes one of the kernel's kind)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from kernel_sim.nvme import NVMeKeyring
from tlshd.config import Config
from tlshd.credentials.chooser import Chooser
from tlshd.credentials.contexts import Contexts
from tlshd.credentials.keys import LOCAL_KEYS
from tlshd.errors import TlshdError, UnknownPSKIdentityError, UnsupportedRequestError
from tlshd.handshake.engine import State
from tlshd.handshake.events import HandshakeFailed, NeedServerCredentials
from tlshd.handshake.secrets import HashAlg, Role
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType

IDENTITY = "NVMe0R01 nqn.host nqn.subsys"


@pytest.fixture(scope="module")
def chooser() -> Chooser:
    return Chooser(Contexts.from_config(Config()), LOCAL_KEYS)


@pytest.fixture
def ring() -> Iterator[NVMeKeyring]:
    ring = NVMeKeyring.create(name=f"tlshd-test-chooser-{os.getpid()}")
    yield ring
    ring.close()


def _reply(message_type: MsgType, auth: AuthMode, peer_identities: tuple[int, ...] = (),
           keyring: int | None = None, peername: str | None = None) -> AcceptReply:
    return AcceptReply(Header(0, 0, 0, 0), -1, message_type, auth, peername, None, keyring,
                       peer_identities, None, ())


def test_a_psk_client_takes_the_first_readable_key_and_keeps_the_rest(
        chooser: Chooser, ring: NVMeKeyring) -> None:
    first = ring.add_psk(IDENTITY, os.urandom(32))
    second = ring.add_psk("NVMe0R02 nqn.host nqn.subsys", os.urandom(48))
    missing = 0x7FFFFFF0
    engine, choice = chooser.start(_reply(MsgType.CLIENTHELLO, AuthMode.PSK,
                                          (missing, first, second)))
    assert choice.psk is not None and choice.psk.serial == first
    assert choice.untried == (second,) and engine.state is State.RUNNING
    retried = chooser.retry(_reply(MsgType.CLIENTHELLO, AuthMode.PSK), choice,
                            UnknownPSKIdentityError("refused"))
    assert retried is not None and choice.psk.serial == second
    assert choice.psk.hash_alg is HashAlg.SHA384 and choice.untried == ()
    assert isinstance(choice.first_error, UnknownPSKIdentityError)  # the news, if all fail
    assert chooser.retry(_reply(MsgType.CLIENTHELLO, AuthMode.PSK), choice, None) is None


def test_a_psk_server_asks_and_the_answer_finds_the_key_in_the_requests_keyring(
        chooser: Chooser, ring: NVMeKeyring) -> None:
    serial = ring.add_psk(IDENTITY, os.urandom(32))
    reply = _reply(MsgType.SERVERHELLO, AuthMode.PSK, keyring=ring.serial)
    engine, choice = chooser.start(reply)
    assert engine.state is State.HELLO_PENDING
    client, _ = chooser.start(_reply(MsgType.CLIENTHELLO, AuthMode.PSK, (serial,)))
    engine.receive_data(client.data_to_send())
    asked = engine.next_event()
    assert isinstance(asked, NeedServerCredentials)
    assert asked.identities == (IDENTITY.encode(),)
    chooser.answer(engine, reply, asked, choice)
    assert choice.psk is not None and choice.psk.serial == serial
    assert engine.state is State.RUNNING


def test_a_psk_server_without_the_key_refuses_with_unknown_psk_identity(
        chooser: Chooser, ring: NVMeKeyring) -> None:
    other = ring.add_psk("NVMe0R01 someone else", os.urandom(32))
    reply = _reply(MsgType.SERVERHELLO, AuthMode.PSK, keyring=None)  # not searched anyway
    engine, choice = chooser.start(reply)
    client, _ = chooser.start(_reply(MsgType.CLIENTHELLO, AuthMode.PSK, (other,)))
    engine.receive_data(client.data_to_send())
    asked = engine.next_event()
    assert isinstance(asked, NeedServerCredentials)
    chooser.answer(engine, reply, asked, choice)
    failed = engine.next_event()
    assert isinstance(failed, HandshakeFailed) and failed.error.status == errno.EKEYREJECTED
    assert choice.psk is None and engine.data_to_send()  # the alert


def test_x509_requests_get_the_configured_contexts_and_odd_ones_are_refused(
        chooser: Chooser) -> None:
    engine, choice = chooser.start(_reply(MsgType.CLIENTHELLO, AuthMode.UNAUTH,
                                          peername="server.test"))
    assert engine.state is State.RUNNING and engine._role is Role.CLIENT and choice.psk is None
    with pytest.raises(TlshdError):  # no server certificate configured
        chooser.start(_reply(MsgType.SERVERHELLO, AuthMode.X509))
    with pytest.raises(UnsupportedRequestError):
        chooser.start(_reply(MsgType.CLIENTHELLO, 99))  # type: ignore[arg-type]
