"""The kernel's own evidence of handshakes, read the same way from a real kernel and kernel-sim.

A real kernel: the ``handshake:*`` tracepoints as tracefs prints them (``trace_clock=mono``) and
two ``/proc/net/tls_stat`` snapshots. kernel-sim: ``Kernel.trace`` (the same events) and its
ULP counters. Both become one :class:`Evidence`, which the scenarios compare.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kernel_sim.kernel import TraceEvent

# "  nfsd-333  [001] .....  50.939093: handshake_submit: req=00000000038e3fea sk=000000008490"
_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+): "
    r"handshake_(?P<event>\w+): (?P<fields>.*)$"
)
_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class Event:
    ts: float  # seconds, CLOCK_MONOTONIC
    event: str  # the tracepoint without "handshake_": submit, cmd_accept, complete, ...
    req: str  # a request's key: the hashed req pointer (tracefs) or the socket cookie (sim)
    value: int | None = None  # status (complete) or err (the *_err events)
    task: str = ""


def parse_tracefs(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        fields = dict(_FIELD.findall(m.group("fields")))
        raw = fields.get("status", fields.get("err"))
        events.append(Event(float(m.group("ts")), m.group("event"), fields.get("req", ""),
                            int(raw) if raw is not None else None, m.group("task")))
    return events


def from_sim(trace: Iterable[TraceEvent]) -> list[Event]:
    """kernel-sim's ``Kernel.trace`` entries as :class:`Event`s."""
    events = []
    for e in trace:
        value = e.info.get("status", e.info.get("errno"))
        events.append(Event(e.ts, e.event, str(e.sock), value))
    return events


def parse_tls_stat(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in (line.split() for line in text.splitlines()
                                                 if line.strip())}


@dataclass(frozen=True)
class Timing:
    """One request's path through the kernel: submit -> ACCEPT -> DONE, in milliseconds."""

    submit_to_accept_ms: float
    accept_to_done_ms: float
    status: int


@dataclass(frozen=True)
class Evidence:
    submitted: int  # handshake_submit: requests queued and announced
    submit_errors: tuple[int, ...]  # handshake_submit_err values, sorted
    notify_errors: tuple[int, ...]  # handshake_notify_err: the READY multicast failed
    accepted: int
    done: int
    statuses: tuple[int, ...]  # handshake_complete statuses, sorted
    ktls_installed: int  # TlsTxSw and TlsRxSw both grew by this much
    timings: tuple[Timing, ...] = field(default=(), compare=False)

    def median_accept_to_done_ms(self) -> float:
        return statistics.median(t.accept_to_done_ms for t in self.timings)


def summarize(events: Iterable[Event], tls_before: Mapping[str, int],
              tls_after: Mapping[str, int]) -> Evidence:
    events = sorted(events, key=lambda e: e.ts)
    count = {name: sum(e.event == name for e in events)
             for name in ("submit", "cmd_accept", "cmd_done")}
    tx = tls_after.get("TlsTxSw", 0) - tls_before.get("TlsTxSw", 0)
    rx = tls_after.get("TlsRxSw", 0) - tls_before.get("TlsRxSw", 0)
    return Evidence(
        submitted=count["submit"],
        submit_errors=tuple(sorted(e.value or 0 for e in events if e.event == "submit_err")),
        notify_errors=tuple(sorted(e.value or 0 for e in events if e.event == "notify_err")),
        accepted=count["cmd_accept"],
        done=count["cmd_done"],
        statuses=tuple(sorted(e.value or 0 for e in events if e.event == "complete")),
        ktls_installed=min(tx, rx),
        timings=tuple(_timings(events)),
    )


def _timings(events: list[Event]) -> Iterable[Timing]:
    """Pair each request's submit, ACCEPT and DONE up to its completion.

    ``handshake_req_submit`` fires its tracepoint after the READY multicast, so a quick agent's
    ``handshake_cmd_accept`` (on another CPU) can carry an earlier time than the request's own
    ``handshake_submit``: seen on 6.12 (2 of 30 requests in one NVMe loop). Such a request
    counts as accepted at once (0 ms in the queue)."""
    marks: dict[str, dict[str, float]] = {}
    for e in events:
        if e.event == "submit" and "submit" in marks.get(e.req, {}):
            marks[e.req] = {"submit": e.ts}  # a new request at a reused address
        elif e.event in ("submit", "cmd_accept", "cmd_done"):
            marks.setdefault(e.req, {}).setdefault(e.event, e.ts)
        elif e.event == "destruct":
            marks.pop(e.req, None)  # gone without completing (cancelled before ACCEPT)
        elif e.event == "complete":
            m = marks.pop(e.req, {})
            if {"submit", "cmd_accept", "cmd_done"} <= m.keys():
                yield Timing(max(0.0, m["cmd_accept"] - m["submit"]) * 1000,
                             (m["cmd_done"] - m["cmd_accept"]) * 1000, e.value or 0)


# --- what scripts/qemu/guest.sh and run-guest.sh leave in OUTDIR ----------------------------


def read_results(path: Path) -> dict[str, str]:
    """``RESULT key=value`` lines (``results``: ``scenario.key``; ``host-results``: ``key``)."""
    found: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"RESULT ([^=]+)=(.*)$", line)
            if m:
                found[m.group(1)] = m.group(2)
    return found


def scenario_evidence(out: Path, scenario: str) -> Evidence:
    """The kernel's evidence of one scenario: ``OUTDIR/<scenario>/`` trace and tls_stat."""
    d = out / scenario
    return summarize(parse_tracefs((d / "trace.txt").read_text()),
                     parse_tls_stat((d / "tls_stat.before").read_text()),
                     parse_tls_stat((d / "tls_stat.after").read_text()))
