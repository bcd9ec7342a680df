"""[app] policy: rules, priorities, first match, fail closed, explain."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlshd.cli import main
from tlshd.policy import Facts, explain, load_policy, parse_policy_texts

SITE = """
rules:
  curl-to-web:
    priority: 100
    match:
      direction: outbound
      users: [root, 1000]
      executables: [/usr/bin/curl, "/opt/web/*"]
      remote: [10.0.0.0/8, "::1/128", 127.0.0.0/8]
      remote_ports: ["443", "8000-8999"]
    action: {tls: true, server_name: required}
  no-tls-to-lab:
    priority: 200
    match: {direction: outbound, remote: [10.9.0.0/16]}
    action: {tls: false}
  web-server:
    match:
      direction: inbound
      local_ports: ["8443"]
      cgroups: ["/system.slice/web.service"]
"""


def facts(**changes: object) -> Facts:
    base: dict[str, object] = {"direction": "outbound", "uid": 0,
                               "executable": "/usr/bin/curl", "cgroup": "/user.slice",
                               "remote": ("10.1.2.3", 443), "local": ("10.0.0.1", 40000)}
    return Facts(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def policy():
    made = parse_policy_texts([("site.yml", SITE)])
    assert made.problems == ()
    return made


def test_rules_are_tried_by_priority_and_the_first_match_decides(policy) -> None:
    assert [r.name for r in policy.rules] == ["no-tls-to-lab", "curl-to-web", "web-server"]
    decision = policy.decide(facts(), server_name="web.example")
    assert decision.allowed and decision.rule.name == "curl-to-web"
    lab = policy.decide(facts(remote=("10.9.1.1", 443)), server_name="lab")
    assert not lab.allowed and lab.rule.name == "no-tls-to-lab"  # priority 200 refuses


@pytest.mark.parametrize(("changes", "reason"), [
    ({"uid": 1001}, "no rule"),
    ({"executable": "/usr/bin/wget"}, "no rule"),
    ({"remote": ("192.168.1.1", 443)}, "no rule"),
    ({"remote": ("10.1.2.3", 22)}, "no rule"),
    ({"direction": "inbound"}, "no rule"),
])
def test_every_condition_must_hold(policy, changes: dict[str, object], reason: str) -> None:
    decision = policy.decide(facts(**changes), server_name="web.example")
    assert not decision.allowed and reason in decision.reason


def test_ports_ranges_ipv6_and_ipv4_mapped_addresses(policy) -> None:
    assert policy.decide(facts(remote=("::1", 8080)), server_name="x").allowed
    assert policy.decide(facts(remote=("::ffff:127.0.0.1", 8999)), server_name="x").allowed
    assert not policy.decide(facts(remote=("::1", 9000)), server_name="x").allowed


def test_a_required_server_name_and_an_inbound_rule(policy) -> None:
    assert "requires a server name" in policy.decide(facts()).reason
    server = facts(direction="inbound", executable="/usr/sbin/web", local=("0.0.0.0", 8443),
                   cgroup="/system.slice/web.service")
    assert policy.decide(server).rule.name == "web-server"
    assert not policy.decide(facts(direction="inbound", cgroup="/user.slice",
                                   local=("0.0.0.0", 8443))).allowed


@pytest.mark.parametrize(("text", "words"), [
    ("rules:\n  a: {match: {direction: sideways}}\n", "direction"),
    ("rules:\n  a: {match: {users: [nosuchuser-xyz]}}\n", "no user"),
    ("rules:\n  a: {match: {remote: [10.0.0.0/33]}}\n", "remote"),
    ("rules:\n  a: {match: {remote_ports: ['0']}}\n", "port range"),
    ("rules:\n  a: {match: {colour: red}}\n", "unexpected key"),
    ("rules:\n  a: {action: {tls: maybe}}\n", "action"),
    ("rules:\n  a: {priority: high}\n", "not a number"),
    ("rules:\n  a: {}\n  a: {}\n", "defined twice"),
    ("rules:\n  'bad name': {}\n", "rule name"),
    ("policy: {}\n", "only 'rules'"),
    ("rules: [\n", "does not end"),
])
def test_a_policy_with_a_problem_refuses_everything(text: str, words: str) -> None:
    policy = parse_policy_texts([("ok.yml", SITE), ("bad.yml", text)])
    assert len(policy.problems) == 1 and words in policy.problems[0], policy.problems
    assert policy.problems[0].startswith("bad.yml:")
    decision = policy.decide(facts(), server_name="web.example")
    assert not decision.allowed and "every request is refused" in decision.reason


def test_files_are_read_sorted_and_a_missing_directory_is_no_policy(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "none").rules == ()
    (tmp_path / "20-b.yaml").write_text("rules:\n  b: {}\n")
    (tmp_path / "10-a.yml").write_text("rules:\n  a: {}\n")
    (tmp_path / "notes.txt").write_text("rules: [")
    policy = load_policy(tmp_path)
    assert policy.files == ("10-a.yml", "20-b.yaml") and policy.problems == ()
    assert [r.name for r in policy.rules] == ["a", "b"]  # equal priority: reading order


def test_explain_shows_each_rule_tried_and_the_decision(policy) -> None:
    lines = explain(policy, facts(remote=("10.1.2.3", 443)), "web.example")
    text = "\n".join(lines)
    assert "rule no-tls-to-lab (priority 200, site.yml): does not match" in text
    assert "FAIL remote address 10.1.2.3" in text
    assert "rule curl-to-web (priority 100, site.yml): matches" in text
    assert "web-server" not in text  # not tried: the first match decided
    assert lines[-1] == "decision: allowed (rule curl-to-web)"


def test_policy_explain_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "site.yml").write_text(SITE)
    config = tmp_path / "config"
    config.write_text(f"[app]\npolicy_dir={tmp_path / 'policy.d'}\n")
    argv = ["policy", "explain", "-c", str(config), "--exe", "/usr/bin/curl",
            "--remote", "[::1]:443", "--server-name", "web.example"]
    assert main(argv) == 0
    assert "decision: allowed (rule curl-to-web)" in capsys.readouterr().out
    assert main([*argv[:-2], "--user", "1001"]) == 1
    assert "decision: refused (no rule allows it)" in capsys.readouterr().out
    assert main(["policy", "-c", str(config)]) == 2
    assert main(["policy", "explain", "-c", str(config), "--remote", "nonsense"]) == 2


def test_a_reload_that_breaks_the_policy_keeps_the_one_in_force(tmp_path: Path) -> None:
    from tlshd.agent.supervisor import _build_generation
    from tlshd.config import parse_config
    from tlshd.errors import ConfigError

    (tmp_path / "site.yml").write_text(SITE)
    config = parse_config(f"[app]\nenabled=true\npolicy_dir={tmp_path}\n")
    first = _build_generation(0, config)
    assert first.policy.rules[0].name == "no-tls-to-lab"
    (tmp_path / "zz.yml").write_text("rules:\n  x: {match: {direction: up}}\n")
    with pytest.raises(ConfigError, match=r"zz\.yml:2"):
        _build_generation(1, config, first)
    # at start there is nothing to keep: the broken policy refuses every request
    broken = _build_generation(0, config)
    assert broken.policy.problems and not broken.policy.decide(facts()).allowed
