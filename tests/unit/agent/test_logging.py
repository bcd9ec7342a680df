"""Logging: syslog with ident tlshd and facility auth, or stderr; debug levels per [debug]."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from tlshd.agent.supervisor import configure_logging
from tlshd.agent.worker import _log_result
from tlshd.config import Config
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType

LOG_AUTH, LOG_INFO, LOG_WARNING = 4, 6, 4


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger("tlshd")
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def _reply() -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 7, MsgType.CLIENTHELLO, AuthMode.X509, "srv.example",
                       10000, None, (), None, ())


def test_handshake_line_goes_to_syslog_with_ident_tlshd_and_facility_auth(tmp_path: Path):
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(address)
        syslog.settimeout(5)
        configure_logging(False, Config(), syslog_address=address)
        _log_result(_reply(), 0, 12.5, "ok cipher=TLS_AES_256_GCM_SHA384", "ns1")
        datagram = syslog.recv(4096).decode()
    assert datagram.startswith(f"<{LOG_AUTH * 8 + LOG_INFO}>tlshd[")
    assert ("handshake netns=ns1 role=client auth=X509 peer=srv.example addr=- status=0 12.5ms "
            "ok cipher=TLS_AES_256_GCM_SHA384") in datagram


def test_without_a_syslog_socket_the_agent_logs_to_stderr_and_says_why(tmp_path, capsys):
    configure_logging(False, Config(), syslog_address=str(tmp_path / "nothing-here"))
    _log_result(_reply(), 13, 3.0, "failed: peer sent alert: unknown_ca")
    err = capsys.readouterr().err
    assert "syslog at" in err and "using stderr" in err
    assert "status=13" in err


@pytest.mark.parametrize("loglevel, tls, nl, root, io, netlink", [
    (0, 0, 0, logging.INFO, logging.INFO, logging.INFO),
    (7, 0, 0, logging.DEBUG, logging.INFO, logging.INFO),
    (10, 0, 0, logging.DEBUG, logging.INFO, logging.INFO),  # the reference's advice
    (-1, -1, -1, logging.DEBUG, logging.INFO, logging.INFO),  # log.c: if (!tlshd_debug)
    (0, 3, 0, logging.INFO, logging.DEBUG, logging.INFO),
    (0, 0, 1, logging.INFO, logging.INFO, logging.DEBUG),
])
def test_debug_keys_select_the_debug_lines(loglevel, tls, nl, root, io, netlink):
    configure_logging(True, Config(loglevel=loglevel, tls_debug=tls, nl_debug=nl))
    assert logging.getLogger("tlshd").level == root
    assert logging.getLogger("tlshd.io").level == io
    assert logging.getLogger("tlshd.netlink").level == netlink


def test_stderr_flag_logs_to_stderr_and_syslog_both(tmp_path: Path, capsys):
    # ktls-utils src/tlshd/log.c: openlog(..., LOG_PERROR) with -s: syslog and stderr
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(address)
        syslog.settimeout(5)
        configure_logging(True, Config(), syslog_address=address)
        _log_result(_reply(), 0, 1.0, "ok")
        datagram = syslog.recv(4096).decode()
    assert "status=0" in datagram and "status=0" in capsys.readouterr().err


def test_stderr_flag_without_syslog_is_quiet_about_it(tmp_path: Path, capsys):
    configure_logging(True, Config(), syslog_address=str(tmp_path / "nothing-here"))
    _log_result(_reply(), 0, 1.0, "ok")
    err = capsys.readouterr().err
    assert "status=0" in err and "syslog" not in err
