"""The tracefs parser and the per-request pairing of tests/kernel/evidence.py."""

from __future__ import annotations

from tests.kernel.evidence import parse_tracefs, summarize

LINES = """\
# tracer: nop
  nfsd-333 [001] ..... 50.939093: handshake_submit: req=aaaa sk=1
  kworker/u8:0-12 [000] ..... 50.948675: handshake_submit: req=bbbb sk=2
  python-337 [001] ..... 50.948000: handshake_cmd_accept: req=bbbb sk=2 fd=12
  python-337 [001] ..... 50.953987: handshake_cmd_accept: req=aaaa sk=1 fd=11
  python-337 [001] ..... 51.103839: handshake_cmd_accept_err: req=0 sk=0 err=-11
  python-337 [001] ..... 51.407699: handshake_cmd_done: req=bbbb sk=2 fd=12
  python-337 [001] ..... 51.407819: handshake_complete: req=bbbb sk=2 status=0
  python-337 [001] ..... 51.449362: handshake_cmd_done: req=aaaa sk=1 fd=11
  python-337 [001] ..... 51.449379: handshake_complete: req=aaaa sk=1 status=-13
  bash-294 [000] ..... 52.000000: handshake_submit: req=cccc sk=3
  kworker/1:1-46 [001] ..... 52.100000: handshake_destruct: req=cccc sk=3
  bash-294 [000] ..... 53.000000: handshake_submit: req=cccc sk=4
  bash-294 [000] ..... 53.000100: handshake_notify_err: req=dddd sk=5 err=-3
  bash-294 [000] ..... 53.000200: handshake_submit_err: req=dddd sk=5 err=-3
  python-337 [001] ..... 53.010000: handshake_cmd_accept: req=cccc sk=4 fd=11
  python-337 [001] ..... 53.030000: handshake_cmd_done: req=cccc sk=4 fd=11
  python-337 [001] ..... 53.030100: handshake_complete: req=cccc sk=4 status=0
"""


def test_counts_statuses_errors_and_ktls():
    ev = summarize(parse_tracefs(LINES), {"TlsTxSw": 1, "TlsRxSw": 1},
                   {"TlsTxSw": 3, "TlsRxSw": 4})
    assert (ev.submitted, ev.accepted, ev.done) == (4, 3, 3)
    assert ev.statuses == (-13, 0, 0)
    assert ev.submit_errors == (-3,) and ev.notify_errors == (-3,)
    assert ev.ktls_installed == 2  # the smaller of the TX and RX growth


def test_each_completed_request_is_timed_once():
    timings = summarize(parse_tracefs(LINES), {}, {}).timings
    assert len(timings) == 3
    by_status = sorted((round(t.submit_to_accept_ms, 3), round(t.accept_to_done_ms, 3), t.status)
                       for t in timings)
    # bbbb: its ACCEPT is traced 0.675 ms before its submit (the submit fires after READY)
    assert (0.0, 459.699, 0) in by_status
    assert (14.894, 495.375, -13) in by_status  # aaaa
    # cccc's first request was destroyed unaccepted: the reused address starts afresh
    assert (10.0, 20.0, 0) in by_status
