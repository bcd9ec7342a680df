"""tlshd.agent.stats: the CPU figures of successful requests (issue 16)."""

from __future__ import annotations

from tlshd.agent.events import App, Done, Start
from tlshd.agent.stats import CPU_SAMPLES, RECENT_APPS, Stats, format_status


def done(status: int = 0, cpu_ms: float = 2.0, tls_ms: float = 1.5) -> Done:
    return Done(role="client", auth="x509", peer="p", cipher="c", status=status, ms=10.0,
                what="ok", netns="n", tls_ms=tls_ms, cpu_ms=cpu_ms, pid=1)


def test_request_cpu_percentiles_count_successes_with_a_measured_cost_only() -> None:
    stats = Stats(started_at=0.0)
    for i in range(100):
        stats.apply(Start(pid=1), 0.0)
        stats.apply(done(cpu_ms=1.0 + i / 100, tls_ms=0.5), 0.0)
    stats.apply(done(status=13, cpu_ms=50.0), 0.0)  # a failure: not a cost sample
    stats.apply(done(cpu_ms=0.0), 0.0)  # not measured (a refusal before the handshake)
    stats.apply(Done(**{**done(cpu_ms=9.0).__dict__, "auth": "psk"}), 0.0)
    by_auth = stats.status_document(1.0)["request_cpu_ms"]
    assert by_auth["all"]["requests"] == 101 and by_auth["psk"]["requests"] == 1
    summary = by_auth["x509"]
    assert summary["requests"] == 100
    assert summary["p50"] == 1.5 and summary["p99"] == 1.99
    assert summary["own_p50"] == 1.0 and summary["own_p99"] == 1.49


def test_request_cpu_keeps_only_the_last_samples() -> None:
    stats = Stats(started_at=0.0)
    for _ in range(CPU_SAMPLES + 10):
        stats.apply(done(), 0.0)
    assert stats.status_document(1.0)["request_cpu_ms"]["all"]["requests"] == CPU_SAMPLES


def test_no_request_yet_gives_zeros() -> None:
    assert Stats(started_at=0.0).status_document(0.0)["request_cpu_ms"] == {"all": {
        "requests": 0, "p50": 0.0, "p99": 0.0, "own_p50": 0.0, "own_p99": 0.0}}


def test_session_tags_in_force_and_sessions_per_tag_are_in_the_status() -> None:
    from tlshd.agent.stats import format_status
    from tlshd.tags import parse_tag_texts

    stats = Stats(0.0)
    stats.set_tags(parse_tag_texts([("a.yml", "tags:\n  staff: {}\n  guest: {}\n"),
                                    ("b.yml", "tags: [oops]\n")]))
    for tags in (("guest", "staff"), ("staff",)):
        stats.apply(Start(pid=1), 0.0)
        stats.apply(Done(**{**done().__dict__, "tags": tags}), 1.0)
    stats.apply(Start(pid=1), 0.0)
    stats.apply(Done(**{**done(status=13).__dict__, "tags": ()}), 1.0)
    doc = stats.status_document(2.0)["session_tags"]
    assert doc["tags"] == ["guest", "staff"] and doc["files"] == ["a.yml", "b.yml"]
    assert doc["sessions"] == {"guest": 1, "staff": 2}
    assert len(doc["problems"]) == 1
    text = format_status(stats.status_document(2.0))
    assert "session tags: 2 from 2 file(s)" in text and "1 problem(s)" in text


def test_applications_connections_by_rule_and_the_last_ones_are_in_the_status() -> None:
    stats = Stats(started_at=0.0)
    for n in range(RECENT_APPS + 5):
        stats.apply(App(role="client", rule="web" if n % 2 else "", app_pid=100 + n,
                        executable="/usr/bin/curl", peer="CN=s" if n % 3 else "",
                        cipher="TLS_AES_128_GCM_SHA256" if n % 3 else "",
                        status=0 if n % 3 else 13), float(n))
    apps = stats.status_document(30.0)["applications"]
    counts = {(c["rule"], c["result"]): c["count"] for c in apps["connections"]}
    assert counts == {("-", "ok"): 8, ("-", "failed"): 5, ("web", "ok"): 8, ("web", "failed"): 4}
    assert len(apps["recent"]) == RECENT_APPS
    last = apps["recent"][-1]
    assert last == {"role": "client", "rule": "-", "app_pid": 100 + RECENT_APPS + 4,
                    "executable": "/usr/bin/curl", "peer": "", "cipher": "",
                    "status": "EACCES", "age_s": 6.0}
    text = format_status(stats.status_document(30.0))
    assert "  web                      client  failed  4" in text
    assert "rule=web pid=123 /usr/bin/curl peer=CN=s TLS_AES_128_GCM_SHA256 OK" in text
    assert "rule=- pid=124 /usr/bin/curl peer=- - EACCES" in text
