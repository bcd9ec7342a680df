"""tlshd.agent.ratelimit: a few failure lines per source, then one summary."""

from tlshd.agent.ratelimit import FailureLimiter, source_of


def test_a_burst_passes_then_the_rest_is_counted_and_summed_up_once() -> None:
    limiter = FailureLimiter(burst=3, window_s=10.0)
    allowed = [limiter.allow("10.0.0.9", t * 0.1) for t in range(20)]
    assert allowed == [True] * 3 + [False] * 17
    assert limiter.due(5.0) == []  # the window is still open
    assert limiter.due(10.0) == [("10.0.0.9", 17)]
    assert limiter.due(30.0) == []  # said once
    assert limiter.allow("10.0.0.9", 30.0)  # a new window


def test_sources_are_counted_apart() -> None:
    limiter = FailureLimiter(burst=1, window_s=10.0)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert not limiter.allow("a", 1.0)
    assert limiter.due(11.0) == [("a", 1)]


def test_a_window_that_ends_on_the_next_failure_is_still_summed_up() -> None:
    limiter = FailureLimiter(burst=1, window_s=10.0)
    limiter.allow("a", 0.0)
    limiter.allow("a", 1.0)  # held
    assert limiter.allow("a", 12.0)  # a new window, and the old one is due
    assert limiter.due(12.5) == [("a", 1)]


def test_the_port_is_not_part_of_the_source() -> None:
    assert source_of("192.0.2.1:40000") == "192.0.2.1"
    assert source_of("[2001:db8::1]:2049") == "[2001:db8::1]"
    assert source_of("-") == "-"


def test_burst_zero_logs_every_failure() -> None:
    limiter = FailureLimiter(burst=0)
    assert all(limiter.allow("a", t * 0.01) for t in range(100))
    assert limiter.due(100.0) == []


def test_a_flood_of_sources_shares_one_entry_past_the_cap() -> None:
    limiter = FailureLimiter(burst=1, window_s=10.0, max_sources=3)
    assert [limiter.allow(f"10.0.0.{i}", 0.0) for i in range(6)] == [True] * 4 + [False] * 2
    assert len(limiter._windows) == 4  # three sources and the shared one, never more
    assert ("(other sources)", 2) in limiter.due(10.0)
