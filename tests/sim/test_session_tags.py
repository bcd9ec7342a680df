"""Session tags end to end through kernel-sim: the agent's server handshakes get the tags of
the client's certificate in DONE on a kernel that declares them (the "tags" profile, the
posted series), in the log line and in ``tlshd status`` everywhere, and a reload rereads the
files. ktls-utils 1.4.0 matches tags in the x509 server handshake only."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from kernel_sim.consumer import HandshakeOutcome, TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.profile import LINUX_7_3, TAGS
from tests.pki import PKI
from tests.sim.harness import Agent, start_agent, unique_endpoint, write_config
from tlshd.agent.control import query_status

pytestmark = pytest.mark.sim

FILES = """
filters:
  our-ca: {type: x509.tbs.issuer, pattern: "CN=tlshd test CA,*"}
  client: {type: x509.tbs.subject, pattern: "CN=client.test,*"}
  self: {type: x509.derived.selfSigned}
  v1: {type: x509.tbs.version, pattern: "1"}
tags:
  staff: {filter: [our-ca, client]}
  not-self-signed: {filter: ["not self"]}
  legacy: {filter: [v1]}
"""


def handshake_pair(kernel: Kernel) -> tuple[HandshakeOutcome, HandshakeOutcome]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    box: dict[str, HandshakeOutcome] = {}
    thread = threading.Thread(target=lambda: box.update(s=TLSConsumer(kernel).server(server)))
    thread.start()
    client_out = TLSConsumer(kernel).client(client, peername="localhost")
    thread.join(20)
    kernel.sock_release(client)
    kernel.sock_release(server)
    return client_out, box["s"]


def logged(agent: Agent, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in agent.log):
            return True
        time.sleep(0.1)
    return False


def status_when(kernel: Kernel, ready, timeout: float = 10.0) -> dict:
    """The agent's status once ``ready`` holds: a Done event reaches the supervisor after the
    consumer has its DONE."""
    deadline = time.monotonic() + timeout
    while True:
        doc = query_status(f"\0tlshd-test/{kernel.endpoint}".encode())
        if ready(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def tagged_agent(kernel: Kernel, pki: PKI, tmp_path: Path, *, privsep: bool = True):
    tags_dir = tmp_path / "tags.d"
    tags_dir.mkdir(exist_ok=True)
    (tags_dir / "site.yml").write_text(FILES)
    config = write_config(tmp_path, pki, kernel.endpoint, require_client_cert=True,
                          extra=f"tags_dir={tags_dir}\nprivsep={'true' if privsep else 'false'}\n")
    return start_agent(kernel, config), tags_dir, config


@pytest.mark.parametrize("privsep", [True, False], ids=["privsep", "no-privsep"])
def test_done_carries_the_client_certificates_tags_on_a_kernel_that_takes_them(
        pki: PKI, tmp_path: Path, privsep: bool) -> None:
    with Kernel(endpoint=unique_endpoint(), profile=TAGS) as kernel:
        kernel.add_netns(None)
        agent, _, config = tagged_agent(kernel, pki, tmp_path, privsep=privsep)
        try:
            client, server = handshake_pair(kernel)
            assert (client.status, server.status) == (0, 0)
            assert server.tags == ("not-self-signed", "staff")
            assert client.tags == ()  # the client role is never tagged (as ktls-utils)
            assert logged(agent, "tags=not-self-signed,staff", 10), "\n".join(agent.log)
            doc = status_when(kernel, lambda d: d["session_tags"]["sessions"])
            assert doc["session_tags"]["sessions"] == {"not-self-signed": 1, "staff": 1}
            assert doc["session_tags"]["tags"] == ["legacy", "not-self-signed", "staff"]
            assert doc["session_tags"]["problems"] == []
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)
    assert config.exists()


def test_a_kernel_without_the_attribute_gets_no_tags_but_the_log_and_status_have_them(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint(), profile=LINUX_7_3) as kernel:
        kernel.add_netns(None)
        agent, _, _ = tagged_agent(kernel, pki, tmp_path)
        try:
            client, server = handshake_pair(kernel)
            assert (client.status, server.status) == (0, 0)  # DONE was not refused (EINVAL)
            assert server.tags == ()
            assert logged(agent, "tags=not-self-signed,staff", 10), "\n".join(agent.log)
            doc = status_when(kernel, lambda d: d["session_tags"]["sessions"])
            assert doc["session_tags"]["sessions"] == {"not-self-signed": 1, "staff": 1}
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_a_reload_rereads_the_tag_files_and_a_broken_file_is_reported(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint(), profile=TAGS) as kernel:
        kernel.add_netns(None)
        agent, tags_dir, _ = tagged_agent(kernel, pki, tmp_path)
        try:
            assert handshake_pair(kernel)[1].tags == ("not-self-signed", "staff")
            (tags_dir / "site.yml").write_text(FILES.replace("staff:", "faculty:"))
            (tags_dir / "zz-broken.yaml").write_text("tags:\n  x: {filter: [nowhere]}\n")
            os.kill(agent.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                doc = query_status(f"\0tlshd-test/{kernel.endpoint}".encode())
                if doc["reloads"] >= 1 and len(doc["workers"]) == 1:
                    break
                time.sleep(0.2)
            assert doc["session_tags"]["tags"] == ["faculty", "legacy", "not-self-signed"]
            assert doc["session_tags"]["problems"][0].startswith("zz-broken.yaml:2: tag x names")
            assert logged(agent, "session tags: zz-broken.yaml:2", 10)
            deadline = time.monotonic() + 20
            server = handshake_pair(kernel)[1]
            while server.tags != ("faculty", "not-self-signed") and time.monotonic() < deadline:
                time.sleep(0.3)  # an old worker may still take a request while it drains
                server = handshake_pair(kernel)[1]
            assert server.tags == ("faculty", "not-self-signed")
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)
