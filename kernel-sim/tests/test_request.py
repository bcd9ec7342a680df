"""Request lifetime rules of net/handshake/request.c, on kernel-sim's RequestTable."""

import errno

import pytest

from kernel_sim.handshake.request import HandshakeNet, HandshakeReq, RequestTable, SubmitError


class Proto:
    handler_class = 1

    def __init__(self):
        self.done_calls = []

    def done(self, req, status, remote_auth):
        self.done_calls.append((req.sock_key, status, remote_auth))


def make(listeners=True, pending_max=3):
    table = RequestTable(lambda net, cls: 0 if listeners else -errno.ESRCH)
    return table, HandshakeNet("test", pending_max=pending_max), Proto()


def submit(table, net, proto, key):
    req = HandshakeReq(proto=proto, sock_key=key, sock=None)
    table.submit(net, req)
    return req


def test_submit_without_a_listening_agent_fails_with_esrch_and_keeps_nothing():
    table, net, proto = make(listeners=False)
    with pytest.raises(SubmitError) as info:
        submit(table, net, proto, 1)
    assert info.value.errno == -errno.ESRCH
    assert table.lookup(1) is None and not net.requests


def test_no_listener_traces_notify_err_then_submit_err_as_linux_6_12_does():
    """Seen on 6.12.95 (tests/kernel, nvme_no_agent): handshake_notify_err err=-3, then
    handshake_submit_err err=-3, and no handshake_submit."""
    trace = []
    table = RequestTable(lambda net, cls: -errno.ESRCH,
                         lambda event, req, info: trace.append((event, dict(info))))
    with pytest.raises(SubmitError):
        submit(table, HandshakeNet("test", pending_max=3), Proto(), 1)
    assert [e for e in trace if e[0] != "destruct"] == [
        ("notify_err", {"errno": -errno.ESRCH}), ("submit_err", {"errno": -errno.ESRCH})]


def test_submit_over_the_pending_cap_is_eagain():
    table, net, proto = make(pending_max=3)
    for key in range(3):
        submit(table, net, proto, key)
    with pytest.raises(SubmitError) as info:
        submit(table, net, proto, 99)
    assert info.value.errno == -errno.EAGAIN


def test_second_request_on_a_socket_is_ebusy_even_after_completion():
    table, net, proto = make()
    req = submit(table, net, proto, 1)
    table.complete(req, 0, None)
    with pytest.raises(SubmitError) as info:
        submit(table, net, proto, 1)
    assert info.value.errno == -errno.EBUSY
    table.destruct(1)
    submit(table, net, proto, 1)  # a destroyed socket frees its slot


def test_accept_order_is_fifo():
    table, net, proto = make()
    for key in (10, 11, 12):
        submit(table, net, proto, key)
    assert [table.next(net, 1).sock_key for _ in range(3)] == [10, 11, 12]
    assert table.next(net, 1) is None


def test_completion_happens_exactly_once():
    table, net, proto = make()
    req = submit(table, net, proto, 1)
    table.next(net, 1)
    assert table.complete(req, -errno.EACCES, (5, 6))
    assert not table.complete(req, 0, None)
    assert proto.done_calls == [(1, -errno.EACCES, (5, 6))]


def test_cancel_of_pending_request_removes_it_without_callback():
    table, net, proto = make()
    submit(table, net, proto, 1)
    assert table.cancel(1)
    assert table.next(net, 1) is None and proto.done_calls == []


def test_cancel_of_accepted_request_wins_and_later_done_has_no_effect():
    table, net, proto = make()
    req = submit(table, net, proto, 1)
    table.next(net, 1)
    assert table.cancel(1)
    assert not table.complete(req, 0, None)
    assert proto.done_calls == []


def test_cancel_after_completion_loses():
    table, net, proto = make()
    req = submit(table, net, proto, 1)
    table.next(net, 1)
    table.complete(req, 0, None)
    assert not table.cancel(1)


def test_net_exit_completes_pending_requests_with_the_given_status():
    table, net, proto = make()
    submit(table, net, proto, 1)
    submit(table, net, proto, 2)
    table.net_exit(net, -errno.ETIMEDOUT)
    assert sorted(proto.done_calls) == [(1, -errno.ETIMEDOUT, None), (2, -errno.ETIMEDOUT, None)]
    with pytest.raises(SubmitError) as info:
        submit(table, net, proto, 3)
    assert info.value.errno == -errno.EOPNOTSUPP


def test_linux_6_12_net_exit_leaves_pending_requests_alone():
    table, net, proto = make()
    submit(table, net, proto, 1)
    table.net_exit(net, errno.ETIMEDOUT, complete_pending=False)
    assert proto.done_calls == []
