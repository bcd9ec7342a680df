"""tlshd.untrusted: what a peer chose reaches the log escaped and bounded."""

from tlshd.untrusted import LIMIT, show, show_all


def test_control_characters_cannot_forge_a_log_line() -> None:
    shown = show(b"id\nhandshake status=0 ok\r\x1b[2J")
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert "\\n" in shown and "\\x1b" in shown


def test_a_long_value_is_cut_and_the_cut_counted() -> None:
    shown = show(b"x" * 60_000)
    assert len(shown) < LIMIT + 40
    assert shown.endswith(f"...(+{60_000 - LIMIT} bytes)")


def test_invalid_utf8_is_escaped_not_dropped() -> None:
    assert show(b"a\xffb") == repr("a\\xffb")


def test_a_short_printable_value_reads_as_itself() -> None:
    assert show("NVMe0R01 host sub") == "'NVMe0R01 host sub'"


def test_a_long_list_keeps_a_few_and_counts_the_rest() -> None:
    shown = show_all([b"id%d" % i for i in range(1000)])
    assert shown.startswith("'id0', 'id1', 'id2', 'id3'")
    assert shown.endswith("(+996 more)") and len(shown) < 100
    assert show_all([]) == ""
