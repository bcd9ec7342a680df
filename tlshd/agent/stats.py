"""What the agent has been doing: events from workers, aggregated by the supervisor.

Workers report each request twice over a datagram socket: ``start`` (when it
was accepted) and ``done`` (role, auth mode, peer, cipher, DONE status,
duration). The supervisor folds them into ``Stats``, which answers
``tlshd status`` (a JSON document) and the Prometheus endpoint. Events carry
no key material: only names, numbers and error descriptions.

This module is pure: ``Stats.apply`` takes a decoded event (tlshd/agent/events.py) and a
timestamp.
"""

from __future__ import annotations

import errno
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from tlshd.agent.events import App, Done, Limit, Start
from tlshd.tags import TagSet

RECENT_FAILURES = 50
RECENT_APPS = 20  # the last application connections tlshd status shows
CPU_SAMPLES = 10_000  # the last successful requests whose CPU cost is kept for percentiles
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DONE_FIELDS = ("role", "auth", "peer", "cipher", "status", "ms", "what", "netns")


def status_name(status: int) -> str:
    return "OK" if status == 0 else errno.errorcode.get(status, str(status))


@dataclass
class Stats:
    started_at: float
    handshakes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    inflight: Counter[int] = field(default_factory=Counter)
    failures: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_FAILURES))
    reloads: int = 0
    reload_failures: int = 0
    workers: list[int] = field(default_factory=list)
    config_path: str = ""
    worker_problem: str = ""  # why workers keep dying, while they do ("" when they serve)
    worker_restarts: int = 0
    limits: Counter[str] = field(default_factory=Counter)  # limit name -> handshakes it ended
    # per successful request: (auth mode, CPU of the whole request, its own part: outside
    # OpenSSL)
    cpu_ms: deque[tuple[str, float, float]] = field(
        default_factory=lambda: deque(maxlen=CPU_SAMPLES))
    tagged: Counter[str] = field(default_factory=Counter)  # session tag -> sessions given it
    tag_files: dict[str, Any] = field(default_factory=dict)  # the load in force (set_tags)
    # applications' requests (tlshd.app, tlshd wrap): (rule, role, result) -> count, and the
    # last ones, each with its process, peer, cipher and status
    apps: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    recent_apps: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_APPS))

    def set_tags(self, tags: TagSet) -> None:
        """The session-tag files in force: at start and after each reload."""
        self.tag_files = {"directory": str(tags.directory), "files": list(tags.files),
                          "tags": sorted(tags.tags), "filters": len(tags.filters),
                          "problems": list(tags.problems)}

    def apply(self, event: Start | Done | App | Limit, now: float) -> None:
        if isinstance(event, Limit):
            self.limits[event.limit] += 1
            return
        if isinstance(event, App):
            result = "ok" if event.status == 0 else "failed"
            self.apps[(event.rule or "-", event.role, result)] += 1
            self.recent_apps.append({
                "at": now, "role": event.role, "rule": event.rule or "-",
                "app_pid": event.app_pid, "executable": event.executable, "peer": event.peer,
                "cipher": event.cipher, "status": status_name(event.status)})
            return
        if isinstance(event, Start):
            self.inflight[event.pid] += 1
            return
        self.inflight[event.pid] = max(0, self.inflight[event.pid] - 1)
        result = "ok" if event.status == 0 else "failed"
        self.handshakes[(event.role, event.auth, result)] += 1
        self.statuses[status_name(event.status)] += 1
        if event.status:
            self.failures.append({"at": now, **{k: getattr(event, k) for k in _DONE_FIELDS}})
        else:
            self.tagged.update(event.tags)
            if event.cpu_ms > 0:
                self.cpu_ms.append((event.auth, event.cpu_ms,
                                    max(0.0, event.cpu_ms - event.tls_ms)))

    def worker_gone(self, pid: int) -> None:
        """A worker exited: what it had in flight is no longer in flight (for us)."""
        self.inflight.pop(pid, None)

    def status_document(self, now: float) -> dict[str, Any]:
        return {
            "uptime_s": round(now - self.started_at, 3),
            "config": self.config_path,
            "workers": list(self.workers),
            "in_flight": sum(self.inflight.values()),
            "in_flight_by_worker": {str(pid): n for pid, n in self.inflight.items() if n},
            "handshakes": [{"role": r, "auth": a, "result": res, "count": n}
                           for (r, a, res), n in sorted(self.handshakes.items())],
            "done_statuses": dict(sorted(self.statuses.items())),
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "limits": dict(sorted(self.limits.items())),
            "worker_problem": self.worker_problem,
            "worker_restarts": self.worker_restarts,
            "request_cpu_ms": {auth: _cpu_summary([(t, o) for a, t, o in self.cpu_ms
                                                   if auth in ("all", a)])
                               for auth in ("all", *sorted({a for a, _, _ in self.cpu_ms}))},
            "session_tags": {**self.tag_files, "sessions": dict(sorted(self.tagged.items()))},
            "recent_failures": [_aged(f, now) for f in self.failures],
            "applications": {
                "connections": [{"rule": rule, "role": role, "result": result, "count": n}
                                for (rule, role, result), n in sorted(self.apps.items())],
                "recent": [_aged(a, now) for a in self.recent_apps]},
        }


def _aged(item: dict[str, Any], now: float) -> dict[str, Any]:
    """A recorded item with its age (``age_s``) in place of its time (``at``)."""
    aged = {key: value for key, value in item.items() if key != "at"}
    aged["age_s"] = round(now - item.get("at", now), 3)
    return aged


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def _cpu_summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    """CPU per successful request (the handshake process's, ACCEPT reply to DONE) and its
    own part (outside OpenSSL: the agent's overhead), over the last ``CPU_SAMPLES``: all of
    them, and per auth mode."""
    total = sorted(t for t, _ in samples)
    own = sorted(o for _, o in samples)
    return {"requests": len(total), "p50": _percentile(total, 0.5),
            "p99": _percentile(total, 0.99), "own_p50": _percentile(own, 0.5),
            "own_p99": _percentile(own, 0.99)}


def format_status(doc: dict[str, Any]) -> str:
    """``tlshd status`` for people."""
    lines = [
        f"tlshd: up {doc['uptime_s']:.0f} s, workers {', '.join(map(str, doc['workers']))}, "
        f"config {doc['config'] or '(defaults)'}",
        f"in flight: {doc['in_flight']}   reloads: {doc['reloads']} "
        f"(failed {doc['reload_failures']})",
        "handshakes:",
    ]
    if doc.get("worker_problem"):
        lines.insert(2, f"WORKERS CANNOT SERVE: {doc['worker_problem']} "
                        f"({doc.get('worker_restarts', 0)} restart(s))")
    lines += [f"  {h['role']:<7} {h['auth']:<7} {h['result']:<7} {h['count']}"
              for h in doc["handshakes"]] or ["  none yet"]
    lines.append("DONE statuses: " + (", ".join(f"{k} {v}" for k, v in
                                              doc["done_statuses"].items()) or "none"))
    if doc.get("limits"):
        lines.append("limits hit: " + ", ".join(f"{k} {v}" for k, v in doc["limits"].items()))
    tags = doc.get("session_tags") or {}
    if tags.get("files") or tags.get("sessions"):
        lines.append(f"session tags: {len(tags.get('tags', []))} from "
                     f"{len(tags.get('files', []))} file(s) in {tags.get('directory')}"
                     + (f", {len(tags['problems'])} problem(s)" if tags.get("problems") else ""))
        lines += [f"  {name:<24} {count}" for name, count in tags.get("sessions", {}).items()]
    lines.append("recent failures:")
    lines += [f"  {f['age_s']:.0f} s ago: {f['role']} {f['auth']} peer={f['peer']} "
              f"status={f['status']} ({status_name(f['status'])}) {f['what']}"
              for f in doc["recent_failures"][-10:]] or ["  none"]
    apps = doc.get("applications") or {}
    if apps.get("connections"):
        lines.append("applications (rule, role, result):")
        lines += [f"  {c['rule']:<24} {c['role']:<7} {c['result']:<7} {c['count']}"
                  for c in apps["connections"]]
        lines += [f"  {a['age_s']:.0f} s ago: {a['role']} rule={a['rule']} pid={a['app_pid']} "
                  f"{a['executable'] or '-'} peer={a['peer'] or '-'} {a['cipher'] or '-'} "
                  f"{a['status']}" for a in apps.get("recent", [])[-10:]]
    return "\n".join(lines) + "\n"
